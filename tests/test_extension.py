"""Where the C++ backend comes from (fastcdml/_extension.py): prebuilt, compiled on first use into the cache and
reused, or unavailable with one warning that names the cause and the fix, attributed to the user's line.

The first-use tests run a copy of the package laid out as a default-isolation wheel installs it (no
``fastcdml._C``, the sources in ``fastcdml/csrc``) in fresh interpreters started with ``-S`` (so the editable
install of this checkout cannot supply its prebuilt extension) and a private ``TORCH_EXTENSIONS_DIR``.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import warnings
from pathlib import Path

import pytest
import torch

import fastcdml
from fastcdml import _backend, _extension
from fastcdml.functional import center_contrastive_loss, contrastive_bayesian_loss

ROOT = Path(__file__).resolve().parent.parent
HAVE_TOOLS = _extension._missing_tool() is None
USER_SCRIPT = """\
import sys, warnings
import torch
import fastcdml
from fastcdml import _extension
from fastcdml.functional import center_contrastive_loss, contrastive_bayesian_loss
warnings.simplefilter("always")
x, y = torch.randn(6, 8), torch.tensor([0, 1, 2, 0, 1, 2])
backend = sys.argv[1]
with warnings.catch_warnings(record=True) as caught:
    center_contrastive_loss(x, y, torch.randn(3, 8), backend=backend)
    contrastive_bayesian_loss(x, y, backend=backend)
module, origin, reason = _extension.load()
print("ORIGIN", origin)
for w in caught:
    print("WARNING", w.filename, w.lineno, w.message)
"""


@pytest.fixture
def wheel_layout(tmp_path_factory):
    """A copy of the package as a default-isolation wheel installs it: no prebuilt _C, sources in fastcdml/csrc."""
    root = tmp_path_factory.mktemp("site")
    shutil.copytree(ROOT / "fastcdml", root / "fastcdml",
                    ignore=shutil.ignore_patterns("*.so", "*.pyd", "__pycache__", "csrc"))
    shutil.copytree(ROOT / "csrc", root / "fastcdml" / "csrc")
    return root


def _run(site: Path, env: dict, *args: str, cwd: Path | None = None, wait: bool = True):
    """``python -S`` with only ``site`` and the venv's site-packages on the path (no .pth: no editable finder)."""
    paths = [str(site), sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    full = {k: v for k, v in os.environ.items() if k not in ("FASTCDML_SKIP_EXT", "TRITON_INTERPRET")}
    full.update(PYTHONPATH=os.pathsep.join(dict.fromkeys(paths)), **env)
    proc = subprocess.Popen([sys.executable, "-S", *args], cwd=cwd or site, env=full, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if not wait:
        return proc
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err
    return out, err


def _user_run(site: Path, env: dict, backend: str = "auto", wait: bool = True):
    script = site / "user_train.py"
    script.write_text(USER_SCRIPT)
    return _run(site, env, str(script), backend, wait=wait)


def test_the_in_tree_install_reports_its_origin():
    module, origin, reason = _extension.load()
    if module is None:
        assert origin == "unavailable" and reason
    else:
        assert origin in ("prebuilt", "jit-cached", "jit-built") and reason is None
        assert module.build_info()["torch"] == torch.__version__
    assert _extension.describe().split(" ")[0] in ("prebuilt", "JIT-compiled", "unavailable:")


def test_the_build_folder_follows_sources_torch_and_python(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    sources = _extension.source_files(ROOT / "csrc")
    folder = _extension.build_dir(sources)
    assert folder.parent == tmp_path / "fastcdml" and f"torch{torch.__version__}" in folder.name
    assert folder.name.startswith(f"py{sys.version_info.major}{sys.version_info.minor}")
    changed = tmp_path / "changed.cpp"
    changed.write_text("// another source\n")
    assert _extension.build_dir([*sources, changed]) != folder


def test_the_sources_ship_with_the_package():
    assert _extension.source_dir() is not None
    assert {"fastcdml.cpp", "ccl_cpu.cpp", "cbml_cpu.cpp", "common.h"} <= {
        p.name for p in _extension.source_dir().iterdir()}
    manifest = (ROOT / "MANIFEST.in").read_text()
    assert "graft csrc" in manifest and "BuildPyWithSources" in (ROOT / "setup.py").read_text()


def test_fallback_warns_once_at_the_users_line(monkeypatch):
    """Unavailable C++ kernels: the reference runs both losses, with a single warning pointing here."""
    monkeypatch.setattr(_extension, "_STATE", (None, "unavailable", "simulated: no compiler. Fix: install one"))
    monkeypatch.setattr(_extension, "_WARNED", set())
    _backend._resolve_name.cache_clear()
    x, y = torch.randn(6, 8), torch.tensor([0, 1, 2, 0, 1, 2])
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            center_contrastive_loss(x, y, torch.randn(3, 8))
            fastcdml.CenterContrastiveLoss(3, 8)(x, y)
            contrastive_bayesian_loss(x, y)
        with pytest.raises(fastcdml.BackendUnavailable, match="simulated: no compiler"):
            contrastive_bayesian_loss(x, y, backend="cpp")
    finally:
        _backend._resolve_name.cache_clear()
    assert len(caught) == 1, [str(w.message) for w in caught]
    assert caught[0].filename == __file__
    assert "falls back" in str(caught[0].message) or "fall back" in str(caught[0].message)
    assert "Fix: install one" in str(caught[0].message)


def test_skip_ext_turns_the_cpp_backend_off_at_run_time_and_from_the_build(wheel_layout, tmp_path):
    out, err = _run(wheel_layout, {"FASTCDML_SKIP_EXT": "1", "TORCH_EXTENSIONS_DIR": str(tmp_path)},
                    "-m", "fastcdml", "info")
    assert "C++ extension: unavailable: FASTCDML_SKIP_EXT=1" in out and "compiling" not in err
    (wheel_layout / "fastcdml" / "csrc" / _extension.SKIP_MARK).write_text("installed with FASTCDML_SKIP_EXT=1\n")
    out, err = _run(wheel_layout, {"TORCH_EXTENSIONS_DIR": str(tmp_path)}, "-m", "fastcdml", "info")
    assert "C++ extension: unavailable: fastcdml was installed with FASTCDML_SKIP_EXT=1" in out
    assert "compiling" not in err and not (tmp_path / "fastcdml").exists()


def test_no_compiler_falls_back_with_cause_and_fix(wheel_layout, tmp_path):
    out, err = _user_run(wheel_layout, {"CXX": "/nonexistent/c++", "TORCH_EXTENSIONS_DIR": str(tmp_path)})
    assert "ORIGIN unavailable" in out
    warned = [line for line in out.splitlines() if line.startswith("WARNING")]
    assert len(warned) == 1, out
    assert f"{wheel_layout / 'user_train.py'} 10 " in warned[0]  # the user's first loss call
    assert "need a C++ compiler" in warned[0] and "Fix: install one" in warned[0]
    assert "--no-build-isolation" in warned[0]


@pytest.mark.skipif(not HAVE_TOOLS, reason="no C++ compiler, ninja or Python headers here")
def test_first_use_compiles_once_across_processes_and_reuses_it(wheel_layout, tmp_path, monkeypatch):
    """Two processes start at once on an empty cache holding a stale lock file (a killed builder's): one
    compiles, the other waits and loads the result; a third process loads it without compiling."""
    env = {"TORCH_EXTENSIONS_DIR": str(tmp_path)}
    sources = _extension.source_files(wheel_layout / "fastcdml" / "csrc")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    folder = _extension.build_dir(sources)
    folder.mkdir(parents=True)
    (folder / "lock").touch()
    procs = [_user_run(wheel_layout, env, "cpp", wait=False) for _ in range(2)]
    results = [p.communicate(timeout=900) for p in procs]
    assert all(p.returncode == 0 for p in procs), [r[1] for r in results]
    origins = sorted(line for out, _ in results for line in out.splitlines() if line.startswith("ORIGIN"))
    assert origins == ["ORIGIN jit-built", "ORIGIN jit-cached"], results
    compiled = [line for _, err in results for line in err.splitlines() if "compiling the C++ CPU kernels" in line]
    assert len(compiled) == 1 and " done in " in compiled[0], results
    assert not any(line.startswith("WARNING") for out, _ in results for line in out.splitlines())
    out, err = _user_run(wheel_layout, env, "cpp")
    assert "ORIGIN jit-cached" in out and "compiling" not in err
    out, _ = _run(wheel_layout, env, "-m", "fastcdml", "info")
    assert "C++ extension: JIT-compiled earlier, cached" in out and "cpp: available" in out


@pytest.mark.parametrize("skip", [False, True], ids=["default", "skip-ext"])
def test_the_wheel_ships_the_sources_and_remembers_skip_ext(tmp_path, skip):
    """A wheel built without torch in reach (FASTCDML_SKIP_EXT=1 stands in for an isolated build, which builds
    no extension either) holds fastcdml/csrc; with FASTCDML_SKIP_EXT=1 it also holds the mark that keeps the
    installed package from compiling on first use."""
    import zipfile

    tree = tmp_path / "tree"
    tree.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md", "MANIFEST.in"):
        shutil.copy2(ROOT / name, tree / name)
    shutil.copytree(ROOT / "csrc", tree / "csrc")
    shutil.copytree(ROOT / "fastcdml", tree / "fastcdml", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    env = {**os.environ, "FASTCDML_SKIP_EXT": "1", "PIP_NO_INDEX": "1"}
    if not skip:  # hide torch from setup.py as build isolation does
        env["PYTHONPATH"] = str(tmp_path / "no-torch")
        (tmp_path / "no-torch").mkdir()
        (tmp_path / "no-torch" / "torch.py").write_text("raise ImportError('hidden, as in an isolated build')\n")
        env.pop("FASTCDML_SKIP_EXT")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "dist"), str(tree)], check=True, env=env, capture_output=True, timeout=600)
    (wheel,) = (tmp_path / "dist").glob("fastcdml-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"fastcdml/csrc/{n}" for n in ("fastcdml.cpp", "ccl_cpu.cpp", "cbml_cpu.cpp", "common.h")} <= names
    assert not [n for n in names if n.endswith((".so", ".pyd"))]
    assert (f"fastcdml/csrc/{_extension.SKIP_MARK}" in names) == skip


@pytest.mark.skipif(not HAVE_TOOLS, reason="no C++ compiler, ninja or Python headers here")
def test_a_failed_compile_falls_back_naming_the_error_and_the_log(wheel_layout, tmp_path):
    for source in (wheel_layout / "fastcdml" / "csrc").glob("*.cpp"):  # a missing include is fatal at once
        source.write_text('#include "deliberately_broken.h"\n' + source.read_text())
    out, err = _user_run(wheel_layout, {"TORCH_EXTENSIONS_DIR": str(tmp_path)})
    assert "ORIGIN unavailable" in out and " failed" in err
    (warned,) = [line for line in out.splitlines() if line.startswith("WARNING")]
    assert "compiling the C++ kernels failed" in warned and "deliberately_broken.h" in warned
    assert "build-error.log" in warned and "--no-build-isolation" in warned
    (log,) = tmp_path.glob("fastcdml/*/build-error.log")
    assert "deliberately_broken.h" in log.read_text()


def test_a_stale_build_is_refused_with_a_reason_not_a_crash(tmp_path):
    """A prebuilt ``fastcdml._C`` whose kernels do not match the package's op schemas (an in-place build left from
    older sources) is not registered: ``import fastcdml`` works and the prebuilt extension is refused with a
    reason. (Registering at load time, torch aborted the whole process inside dlopen.)"""
    built = sorted((ROOT / "fastcdml").glob("_C.*"))
    if not built:
        pytest.skip("no in-place prebuilt fastcdml._C in this checkout")
    site = tmp_path / "site"
    shutil.copytree(ROOT / "fastcdml", site / "fastcdml", ignore=shutil.ignore_patterns("__pycache__"))
    ops = site / "fastcdml" / "ops" / "ccl.py"
    schema = 'UPDATE = "(Tensor(a!) centers, Tensor x, Tensor labels, float momentum, int sub_centers=1) -> ()"'
    assert schema in ops.read_text()
    ops.write_text(ops.read_text().replace(schema, schema.replace("int sub_centers=1", "int sub_centers=1, "
                                                                                        "bool extra=False")))
    out, _ = _run(site, {"FASTCDML_SKIP_EXT": "0"}, "-c",
                  "import fastcdml; from fastcdml import _extension; print('PREBUILT', _extension._prebuilt())")
    line = next(ln for ln in out.splitlines() if ln.startswith("PREBUILT"))
    assert "PREBUILT (None, " in line and "built from other sources than this fastcdml" in line, out

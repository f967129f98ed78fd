"""Where the C++ CPU kernels come from: the prebuilt ``fastcdml._C``, or a copy compiled on first use.

``pip install --no-build-isolation`` compiles ``fastcdml._C`` against the torch that runs it ("prebuilt"). A
plain ``pip install`` builds in an isolated environment without torch, so the wheel has no extension; the first
CPU op that needs the C++ backend then compiles the shipped sources (``fastcdml/csrc``, or ``csrc/`` in a source
checkout) with ``torch.utils.cpp_extension.load`` (ninja) into the torch extensions cache ("jit-built"), and
later processes load that copy without compiling ("jit-cached"). When neither is possible the CPU ops run on the
PyTorch reference and :func:`load` says why ("unavailable").

The cache folder is ``$TORCH_EXTENSIONS_DIR`` (default: torch's ``~/.cache/torch_extensions``) /
``fastcdml/<python>-torch<version>-<hash of sources and flags>``: another torch, Python or source change builds
into another folder instead of reusing a stale binary. Parallel processes (DDP ranks, pytest-xdist workers)
build once: ``cpp_extension.load`` serialises its own build with a lock file that a killed builder leaves
behind (and then every later process waits forever), so the whole check-build-import sequence here runs under
an OS file lock (``fcntl.flock``, released when its holder dies), which also makes such a leftover lock file
provably stale.

This module imports only torch; ``torch.utils.cpp_extension`` (which imports setuptools) is imported only to
compile. ``FASTCDML_SKIP_EXT=1`` turns the C++ backend off at run time; at build time it builds no extension and
leaves a mark in the package that turns it off for good.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.machinery
import importlib.util
import json
import os
import re
import shlex
import shutil
import sys
import sysconfig
import threading
import time
import types
import warnings
from pathlib import Path

import torch

NAME = "fastcdml_C"  # the JIT module's name (the prebuilt one is fastcdml._C)
SKIP_MARK = "SKIP_EXT"  # in fastcdml/csrc when the package was built with FASTCDML_SKIP_EXT=1 (setup.py)
PACKAGE = Path(__file__).resolve().parent
ALTERNATIVE = ("or install fastcdml with `pip install --no-build-isolation` next to this torch (prebuilt kernels); "
               "FASTCDML_SKIP_EXT=1 uses the reference without trying")

_LOCK = threading.Lock()
_STATE: tuple | None = None  # the final (module, origin, reason), once known
_WARNED: set[str] = set()


def source_dir() -> Path | None:
    """The C++ sources: shipped in the wheel as ``fastcdml/csrc``, or ``csrc/`` beside the package in a checkout."""
    for candidate in (PACKAGE / "csrc", PACKAGE.parent / "csrc"):
        if (candidate / "fastcdml.cpp").is_file():
            return candidate
    return None


def source_files(folder: Path) -> list[Path]:
    """The ``.cpp`` and ``.h`` files of ``folder``, sorted (what is compiled and hashed)."""
    return sorted(p for p in folder.iterdir() if p.suffix in (".cpp", ".h"))


def _flags() -> tuple[list[str], list[str]]:
    """(cflags, ldflags): those setup.py uses for the prebuilt extension."""
    openmp = [] if sys.platform == "darwin" else ["-fopenmp"]
    version = shlex.quote(f'-DFASTCDML_TORCH_VERSION="{torch.__version__}"')  # ninja runs it through a shell
    return ["-O3", "-std=c++17", *openmp, version], openmp


def build_dir(sources: list[Path]) -> Path:
    """The cache folder for these sources, this torch and this Python (see the module docstring)."""
    digest = hashlib.sha256()
    for path in sources:
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    digest.update(json.dumps([_flags(), os.environ.get("CXX", "")]).encode())
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if not root:
        try:
            from torch import _appdirs

            root = _appdirs.user_cache_dir(appname="torch_extensions")
        except Exception:  # noqa: BLE001 - any failure: the conventional place
            root = os.path.join(os.path.expanduser("~"), ".cache", "torch_extensions")
    tag = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
    return Path(root) / "fastcdml" / f"{tag}-torch{torch.__version__}-{digest.hexdigest()[:16]}"


def _library(folder: Path) -> Path:
    suffix = ".pyd" if sys.platform == "win32" else ".so"
    return folder / f"{NAME}{suffix}"


def _import_file(path: Path) -> types.ModuleType:
    loader = importlib.machinery.ExtensionFileLoader(NAME, str(path))
    spec = importlib.util.spec_from_file_location(NAME, str(path), loader=loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def _check(module: types.ModuleType, what: str) -> str | None:
    """Why ``module`` cannot serve, or None after registering its kernels with the ops: built for another torch,
    or from sources whose kernels do not match this package's op schemas (a stale in-place build)."""
    built = module.build_info().get("torch")
    if built != torch.__version__:
        return f"{what} was built for torch {built} but torch {torch.__version__} is running"
    try:
        module.register_kernels()
    except (AttributeError, RuntimeError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        return f"{what} was built from other sources than this fastcdml ({first}); rebuild it"
    return None


def _prebuilt() -> tuple[types.ModuleType | None, str]:
    """The ahead-of-time extension, or (None, why not)."""
    if importlib.util.find_spec("fastcdml._C") is None:
        return None, "no prebuilt fastcdml._C (pip built the package without torch, i.e. with build isolation)"
    try:
        module = importlib.import_module("fastcdml._C")
    except ImportError as err:
        return None, f"the prebuilt fastcdml._C does not load ({err})"
    reason = _check(module, "the prebuilt fastcdml._C")
    return (None, reason) if reason else (module, "")


def _cached(folder: Path) -> types.ModuleType | None:
    """The JIT copy in ``folder`` if a completed build left it there (the stamp is written last)."""
    library = _library(folder)
    if not (folder / "stamp.json").is_file() or not library.is_file():
        return None
    try:
        module = _import_file(library)
    except ImportError:
        return None
    return None if _check(module, str(library)) else module


def _missing_tool() -> str | None:
    """Why compiling cannot even start (checked up front: a doomed build would take seconds to say so)."""
    cxx = shlex.split(os.environ.get("CXX", "c++") or "c++")[0]
    if shutil.which(cxx) is None:
        how = "e.g. `apt install g++`" if sys.platform.startswith("linux") else "e.g. `xcode-select --install`"
        return (f"the C++ kernels need a C++ compiler and none was found (`{cxx}`; CXX chooses one). "
                f"Fix: install one ({how}), {ALTERNATIVE}")
    if _ninja_dir() is None:
        return f"the C++ kernels need ninja to compile and it is not installed. Fix: `pip install ninja`, {ALTERNATIVE}"
    include = sysconfig.get_paths().get("include")
    if not include or not Path(include, "Python.h").is_file():
        major_minor = f"{sys.version_info.major}.{sys.version_info.minor}"
        return (f"the C++ kernels need the Python headers and {include} has no Python.h. Fix: install them "
                f"(e.g. `apt install python{major_minor}-dev`), {ALTERNATIVE}")
    return None


def _ninja_dir() -> str | None:
    """The folder holding the ninja executable: on PATH, beside this Python (a venv used without activating
    it), or the ``ninja`` package's."""
    found = shutil.which("ninja")
    if found:
        return os.path.dirname(found)
    scripts = sysconfig.get_path("scripts")
    if scripts and shutil.which("ninja", path=scripts):
        return scripts
    with contextlib.suppress(Exception):
        import ninja

        if shutil.which("ninja", path=ninja.BIN_DIR):
            return ninja.BIN_DIR
    return None


@contextlib.contextmanager
def _file_lock(path: Path):
    """Hold an exclusive OS lock on ``path`` (blocks); yields whether it had to wait for another process."""
    try:
        import fcntl
    except ImportError:  # Windows: cpp_extension's own lock file is all there is
        yield False
        return
    with open(path, "a+") as handle:
        waited = False
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            waited = True
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield waited
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _compile(sources: list[Path], folder: Path) -> types.ModuleType:
    from torch.utils import cpp_extension  # imports setuptools: only when compiling

    cflags, ldflags = _flags()
    stale = folder / "lock"  # cpp_extension's lock file; we hold the OS lock, so no live process owns it
    with contextlib.suppress(FileNotFoundError):
        stale.unlink()
    path = os.environ.get("PATH", "")
    ninja_dir = _ninja_dir()
    try:
        if ninja_dir and shutil.which("ninja") is None:
            os.environ["PATH"] = ninja_dir + os.pathsep + path
        return cpp_extension.load(NAME, [str(s) for s in sources if s.suffix == ".cpp"], extra_cflags=cflags,
                                  extra_ldflags=ldflags, build_directory=str(folder), with_cuda=False,
                                  is_python_module=True, verbose=False)
    finally:
        os.environ["PATH"] = path


def _jit(build: bool) -> tuple[types.ModuleType | None, str, str | None]:
    src = source_dir()
    if src is None:
        return None, "unavailable", (f"the C++ sources are not installed (no csrc/ in {PACKAGE}). Fix: reinstall "
                                     f"fastcdml, {ALTERNATIVE}")
    sources = source_files(src)
    folder = build_dir(sources)
    module = _cached(folder)
    if module is not None:
        return module, "jit-cached", None
    if not build:
        return None, "unavailable", "not compiled yet (it is compiled on the first CPU op that needs it)"
    missing = _missing_tool()
    if missing:
        return None, "unavailable", missing
    folder.mkdir(parents=True, exist_ok=True)
    with _file_lock(folder / "fastcdml.lock") as waited:
        module = _cached(folder)  # another process may have finished it while we waited
        if module is not None:
            return module, "jit-cached", None
        sys.stdout.flush()  # keep the line in order with what the program printed before it
        print(f"fastcdml: compiling the C++ CPU kernels for torch {torch.__version__} into {folder} "
              f"(first use only){' after waiting for another process' if waited else ''} ...",
              end="", file=sys.stderr, flush=True)
        start = time.perf_counter()
        try:
            module = _compile(sources, folder)
            reason = _check(module, "the compiled extension")
        except Exception as err:  # noqa: BLE001 - a failed build must leave the reference working
            print(" failed", file=sys.stderr, flush=True)
            log = folder / "build-error.log"
            log.write_text(f"{type(err).__name__}: {err}\n")
            text = str(err).strip() or type(err).__name__
            diagnostics = [line.strip() for line in text.splitlines() if re.search(r"\berror\b", line)
                           and not line.startswith("Error building extension")]
            first = (diagnostics or text.splitlines())[0][:200]
            return None, "unavailable", (f"compiling the C++ kernels failed ({first}; full log: {log}). "
                                         f"Fix: see the log, {ALTERNATIVE}")
        seconds = time.perf_counter() - start
        print(f" done in {seconds:.1f} s", file=sys.stderr, flush=True)
        if reason:
            return None, "unavailable", reason
        (folder / "stamp.json").write_text(json.dumps({"torch": torch.__version__, "seconds": round(seconds, 1),
                                                       "sources": str(src)}) + "\n")
        return module, "jit-built", None


def load(build: bool = True) -> tuple[types.ModuleType | None, str, str | None]:
    """``(module, origin, reason)`` of the C++ CPU kernels, registered with torch (``register_kernels``).

    ``origin`` is ``"prebuilt"`` (fastcdml._C), ``"jit-cached"`` (compiled by an earlier process),
    ``"jit-built"`` (compiled just now) or ``"unavailable"``, with ``reason`` saying why and how to fix it.
    ``build=False`` never compiles (for import time): it loads what exists and does not remember a miss.
    """
    global _STATE
    with _LOCK:
        if _STATE is not None:
            return _STATE
        if os.environ.get("FASTCDML_SKIP_EXT") == "1":
            _STATE = (None, "unavailable", "FASTCDML_SKIP_EXT=1 is set")
            return _STATE
        if (PACKAGE / "csrc" / SKIP_MARK).is_file():
            _STATE = (None, "unavailable", "fastcdml was installed with FASTCDML_SKIP_EXT=1 (no C++ backend); "
                                           "reinstall without it to have one")
            return _STATE
        module, why_not = _prebuilt()
        if module is not None:
            _STATE = (module, "prebuilt", None)
            return _STATE
        try:
            module, origin, reason = _jit(build)
        except Exception as err:  # noqa: BLE001 - e.g. an unwritable cache: never break the import or the op
            module, origin, reason = None, "unavailable", f"loading the C++ kernels failed ({err!r}), {ALTERNATIVE}"
        if module is None and not build:
            return module, origin, reason
        if module is None and not why_not.startswith("no prebuilt"):
            reason = f"{why_not}; {reason}"
        _STATE = (module, origin, reason)
        return _STATE


def describe() -> str:
    """One line for ``python -m fastcdml info``: where the C++ backend came from, or why it is missing."""
    module, origin, reason = load()
    if module is None:
        return f"unavailable: {reason}"
    where = getattr(module, "__file__", "?")
    label = {"prebuilt": "prebuilt", "jit-cached": "JIT-compiled earlier, cached",
             "jit-built": "JIT-compiled just now, cached"}[origin]
    return f"{label} ({where}) {json.dumps(module.build_info())}"


def warn_user(message: str, category: type[Warning] = UserWarning) -> None:
    """Warn once per message, attributed to the first caller outside fastcdml and torch (the user's line)."""
    if message in _WARNED:
        return
    _WARNED.add(message)
    skip = tuple({os.path.join(os.path.dirname(os.path.abspath(f)), "") for f in (__file__, torch.__file__)}
                 | {os.path.join(str(Path(f).resolve().parent), "") for f in (__file__, torch.__file__)})
    frame, level = sys._getframe(1), 2
    while frame is not None and frame.f_code.co_filename.startswith(skip):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)

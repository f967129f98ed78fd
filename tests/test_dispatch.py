"""The single dispatch point: which backend runs, forced backends failing clearly, and the CLI's info."""
import subprocess
import sys
import warnings

import pytest
import torch

import fastcdml
from fastcdml import _backend, _extension
from fastcdml.functional import center_contrastive_loss, contrastive_bayesian_loss


@pytest.fixture
def fresh_cache():
    _backend._resolve_name.cache_clear()
    _extension._WARNED.clear()  # the fallback warning is given once per message
    yield
    _backend._resolve_name.cache_clear()


@pytest.mark.parametrize("loss", ["ccl", "cbml"])
def test_auto_on_cpu_prefers_cpp_and_otherwise_warns(loss, fresh_cache):
    reason = _backend.unavailable_reason("cpp", loss, "cpu")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        backend = _backend.resolve("auto", loss, torch.device("cpu"))
    if reason is None:
        assert (backend.name, backend.namespace) == ("cpp", "fastcdml") and not caught
    else:
        assert backend.name == "reference"
        assert len(caught) == 1 and reason in str(caught[0].message)
        assert caught[0].filename == __file__  # attributed to the caller's line, not to fastcdml


def test_forced_backends_fail_clearly_when_unavailable(monkeypatch, fresh_cache):
    with pytest.raises(_backend.BackendUnavailable, match="C\\+\\+ backend runs on CPU tensors"):
        _backend.resolve("cpp", "ccl", torch.device("cuda"))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(_backend.BackendUnavailable, match="backend='triton' is unavailable for ccl"):
        _backend.resolve("triton", "ccl", torch.device("cpu"))
    with pytest.raises(ValueError, match="backend must be one of"):
        _backend.resolve("cuda", "ccl", torch.device("cpu"))
    with pytest.raises(ValueError, match="backend must be one of"):
        center_contrastive_loss(torch.randn(2, 3), torch.tensor([0, 1]), torch.randn(2, 3), backend="fast")


def test_reference_is_always_available_and_interpreter_maps_to_its_namespace(fresh_cache):
    assert _backend.resolve("reference", "cbml", torch.device("cpu")).name == "reference"
    if _backend.unavailable_reason("triton", "ccl", "cpu") is None:
        backend = _backend.resolve("triton", "ccl", torch.device("cpu"))
        assert (backend.name, backend.namespace) == ("triton", "fastcdml_interpret")


def test_backends_report_covers_every_loss_and_device():
    report = fastcdml.backends()
    assert set(report) == {f"{loss}/{device}" for loss in ("ccl", "cbml", "pair", "proxy_anchor") for device in ("cpu", "cuda")}
    assert all(r["reference"] == "available" for r in report.values())


def test_forced_backend_is_what_runs(monkeypatch, fresh_cache):
    """A forced reference never touches the ops; a kernel backend never calls the reference."""
    import fastcdml.reference.cbml as ref_cbml
    import fastcdml.reference.ccl as ref_ccl

    calls = []
    monkeypatch.setattr(ref_ccl, "ccl_loss_rows", lambda *a, **k: calls.append("ccl") or torch.zeros(2))
    monkeypatch.setattr(ref_cbml, "cbml_loss", lambda *a, **k: calls.append("cbml") or torch.zeros(()))
    x, y = torch.randn(2, 3), torch.tensor([0, 1])
    center_contrastive_loss(x, y, torch.randn(2, 3), backend="reference")
    contrastive_bayesian_loss(x, y, backend="reference")
    assert calls == ["ccl", "cbml"]
    for loss, run in (("ccl", lambda b: center_contrastive_loss(x, y, torch.randn(2, 3), backend=b)),
                      ("cbml", lambda b: contrastive_bayesian_loss(x, y, backend=b))):
        for backend in ("triton", "cpp"):
            if _backend.unavailable_reason(backend, loss, "cpu") is None:
                calls.clear()
                run(backend)
                assert calls == [], f"{backend} fell back to the reference"


def test_cli_info_runs():
    out = subprocess.run([sys.executable, "-m", "fastcdml", "info"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "ccl/cpu" in out.stdout and "C++ extension" in out.stdout

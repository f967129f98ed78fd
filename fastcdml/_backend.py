"""The one place that chooses a backend: ``"triton"`` on CUDA tensors, ``"cpp"`` on CPU tensors when the C++
extension is built, ``"reference"`` (eager PyTorch) otherwise. ``backend=`` forces one and fails clearly."""
from __future__ import annotations

import importlib.util
from functools import lru_cache

import torch

from . import _extension
from ._runtime import interpreter_active
from .ops._registry import INTERPRET, MAIN, has_kernel

BACKENDS = ("auto", "triton", "cpp", "reference")
_FIRST_OP = {"ccl": "ccl_fwd", "cbml": "cbml_fwd"}


class BackendUnavailable(RuntimeError):
    """A forced backend cannot run here; the message says why."""


def load_extension(build: bool = True):
    """``(module, None)`` or ``(None, reason)``: the C++ CPU kernels, prebuilt or compiled on first use
    (``build=False``: never compile); see :mod:`fastcdml._extension`."""
    ext, _, reason = _extension.load(build)
    return ext, reason


def _triton_reason(loss: str, device_type: str) -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if importlib.util.find_spec(f"fastcdml.kernels.{loss}") is None:
        return f"fastcdml has no Triton kernels for {loss} yet"
    if device_type == "cpu" and not interpreter_active():
        return "Triton kernels need a CUDA tensor (or TRITON_INTERPRET=1 to interpret them on the CPU)"
    if device_type not in ("cuda", "cpu"):
        return f"Triton kernels do not run on {device_type} tensors"
    if device_type == "cuda" and not torch.cuda.is_available():
        return "no CUDA device"
    return None


def _cpp_reason(loss: str, device_type: str) -> str | None:
    if device_type != "cpu":
        return f"the C++ backend runs on CPU tensors, got a {device_type} tensor"
    _, reason = load_extension()
    if reason is not None:
        return reason
    if not has_kernel(MAIN, _FIRST_OP[loss], "CPU"):
        return f"fastcdml._C has no CPU kernel for {loss}"
    return None


def unavailable_reason(backend: str, loss: str, device_type: str) -> str | None:
    """Why ``backend`` cannot compute ``loss`` on ``device_type`` tensors, or None if it can."""
    if backend == "reference":
        return None
    return (_triton_reason if backend == "triton" else _cpp_reason)(loss, device_type)


@torch.compiler.assume_constant_result
def _resolve_cached(backend: str, loss: str, device_type: str) -> str:
    return _resolve(backend, loss, device_type)


@lru_cache(maxsize=None)
def _resolve(backend: str, loss: str, device_type: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        reason = unavailable_reason(backend, loss, device_type)
        if reason is not None:
            raise BackendUnavailable(f"backend={backend!r} is unavailable for {loss}: {reason}")
        return backend
    preferred = {"cuda": "triton", "cpu": "cpp"}.get(device_type)
    if preferred is None:
        return "reference"
    reason = unavailable_reason(preferred, loss, device_type)
    if reason is None:
        return preferred
    _extension.warn_user(f"fastcdml: {device_type} tensors fall back to the PyTorch reference: {reason}")
    return "reference"


def resolve(backend: str, loss: str, device: torch.device) -> tuple[str, str | None]:
    """``(backend name, op namespace or None for the reference)`` for ``loss`` on ``device``."""
    name = _resolve_cached(backend, loss, device.type)
    if name == "reference":
        return name, None
    return name, INTERPRET if device.type == "cpu" and name == "triton" else MAIN


def available() -> dict[str, dict[str, str]]:
    """For each loss and device type: the backend ``auto`` picks, or why a backend is missing."""
    report = {}
    for loss in _FIRST_OP:
        for device_type in ("cpu", "cuda"):
            report[f"{loss}/{device_type}"] = {
                name: unavailable_reason(name, loss, device_type) or "available" for name in BACKENDS[1:]
            }
    return report

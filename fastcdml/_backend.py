"""The one place that chooses where a loss family runs; it knows no family.

:func:`resolve` returns a :class:`Backend`: the fused ops (``"triton"`` on CUDA tensors, ``"cpp"`` on CPU tensors
when the C++ extension is there) or the eager PyTorch reference (``"reference"``, everywhere). ``backend="auto"``
prefers the fused op for the tensor's device and falls back to the reference with one warning that says why;
a forced backend that cannot run raises :class:`BackendUnavailable` with the reason. ``backend.bind(ops_module,
reference_module)`` then gives the family's functions on it.

Under ``torch.compile`` the resolution is a constant of the graph: :func:`_resolve_key` is marked as such (the
marker that ``torch.compiler.assume_constant_result`` sets, set directly so that importing fastcdml does not
import ``torch._dynamo``; ``tests/test_compile.py`` fails if the marker stops working).
"""
from __future__ import annotations

import functools
import importlib.util
from functools import lru_cache
from types import ModuleType, SimpleNamespace

import torch

from . import _extension
from ._runtime import interpreter_active
from .ops._registry import INTERPRET, MAIN, cpp_operand_dtype, families, has_kernel, triton_operand_dtype

BACKENDS = ("auto", "triton", "cpp", "reference")
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class BackendUnavailable(RuntimeError):
    """A forced backend cannot run here; the message says why."""


class Backend:
    """Where a loss family's operations run. It knows no family: :meth:`bind` gives the family's functions on this
    backend, from the family's op module (``fastcdml.ops.<stem>``) and reference module
    (``fastcdml.reference.<stem>``), which define the same functions under the same names with the same arguments
    (the op wrappers first take the bound op namespace).

    ``name``: ``"triton"``, ``"cpp"`` or ``"reference"``. ``dtypes``: the embedding dtypes it takes.
    ``updates_in_place``: whether a momentum update writes into the bank it is given (the fused ops, whose query
    gradient was computed in the forward) or returns a new bank (the reference: autograd still holds the old
    one, so the module must swap its buffer instead of writing into it). ``operand_dtype(x_dtype, bank_dtype)``:
    the dtype its forward products round the bank rows to, so that a caller combining partial results with bank
    rows of its own (the sharded loss's ``W_y``) rounds them alike.
    """

    name: str
    dtypes: tuple
    updates_in_place: bool

    def bind(self, ops_module: ModuleType, reference_module: ModuleType):
        """The family's functions on this backend (attributes named as in both modules)."""
        raise NotImplementedError

    def operand_dtype(self, x_dtype: torch.dtype, bank_dtype: torch.dtype) -> torch.dtype:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<fastcdml backend {self.name!r}>"


class ReferenceBackend(Backend):
    """The eager PyTorch specification (``fastcdml.reference``): any device, float64 too."""

    name, dtypes, updates_in_place = "reference", KERNEL_DTYPES + (torch.float64,), False

    def bind(self, ops_module, reference_module):
        return reference_module

    def operand_dtype(self, x_dtype, bank_dtype):
        return torch.float64 if torch.float64 in (x_dtype, bank_dtype) else torch.float32


class FusedBackend(Backend):
    """The ``torch.library`` ops of one namespace, bound once as ``ops``: the Triton kernels (CUDA, or the CPU
    under the interpreter) or the C++ kernels (CPU). Each op module lists its wrappers in ``__all__``."""

    dtypes, updates_in_place = KERNEL_DTYPES, True

    def __init__(self, name: str, namespace: str, operand_dtype):
        self.name, self.namespace, self.ops = name, namespace, getattr(torch.ops, namespace)
        self.operand_dtype = operand_dtype
        self._bound: dict[str, SimpleNamespace] = {}

    def bind(self, ops_module, reference_module):
        if ops_module.__name__ not in self._bound:
            self._bound[ops_module.__name__] = SimpleNamespace(
                **{name: functools.partial(getattr(ops_module, name), self.ops) for name in ops_module.__all__})
        return self._bound[ops_module.__name__]


_INSTANCES = {
    ("reference", None): ReferenceBackend(),
    ("cpp", MAIN): FusedBackend("cpp", MAIN, cpp_operand_dtype),
    ("triton", MAIN): FusedBackend("triton", MAIN, triton_operand_dtype),
    ("triton", INTERPRET): FusedBackend("triton", INTERPRET, triton_operand_dtype),
}


def load_extension(build: bool = True):
    """``(module, None)`` or ``(None, reason)``: the C++ CPU kernels, prebuilt or compiled on first use
    (``build=False``: never compile); see :mod:`fastcdml._extension`."""
    ext, _, reason = _extension.load(build)
    return ext, reason


def _triton_reason(loss: str, device_type: str) -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
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
    ext, reason = load_extension()
    if ext is None:
        return reason
    if not has_kernel(MAIN, f"{loss}_fwd", "CPU"):
        return f"fastcdml._C has no CPU kernel for {loss}"
    return None


def unavailable_reason(backend: str, loss: str, device_type: str) -> str | None:
    """Why ``backend`` cannot compute ``loss`` on ``device_type`` tensors, or None if it can."""
    if backend == "reference":
        return None
    return (_triton_reason if backend == "triton" else _cpp_reason)(loss, device_type)


@lru_cache(maxsize=None)
def _resolve_name(backend: str, loss: str, device_type: str) -> str:
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
    _extension.warn_user(f"fastcdml: {device_type} tensors fall back to the PyTorch reference (slower, more "
                         f"memory): {reason}")
    return "reference"


def _resolve_key(backend: str, loss: str, device_type: str) -> tuple[str, str | None]:
    name = _resolve_name(backend, loss, device_type)
    if name == "reference":
        return name, None
    return name, INTERPRET if device_type == "cpu" and name == "triton" else MAIN


_resolve_key._dynamo_marked_constant = True  # what torch.compiler.assume_constant_result does, without importing dynamo


def resolve(backend: str, loss: str, device: torch.device) -> Backend:
    """The :class:`Backend` that computes the loss family ``loss`` (an op module's stem: ``"ccl"``, ``"cbml"``, …)
    on ``device``'s tensors; its ops are ``<loss>_fwd`` and the rest of ``fastcdml.ops.<loss>``."""
    return _INSTANCES[_resolve_key(backend, loss, device.type)]


def available() -> dict[str, dict[str, str]]:
    """For each loss and device type: the backend ``auto`` picks, or why a backend is missing."""
    report = {}
    for loss in families():
        for device_type in ("cpu", "cuda"):
            report[f"{loss}/{device_type}"] = {
                name: unavailable_reason(name, loss, device_type) or "available" for name in BACKENDS[1:]
            }
    return report

"""The one place that chooses a backend, and the two implementations of what the modules need from one.

:func:`resolve` returns a :class:`Backend`: the fused ops (``"triton"`` on CUDA tensors, ``"cpp"`` on CPU tensors
when the C++ extension is there) or the eager PyTorch reference (``"reference"``, everywhere). ``backend="auto"``
prefers the fused op for the tensor's device and falls back to the reference with one warning that says why;
a forced backend that cannot run raises :class:`BackendUnavailable` with the reason.

Under ``torch.compile`` the resolution is a constant of the graph: :func:`_resolve_key` is marked as such (the
marker that ``torch.compiler.assume_constant_result`` sets, set directly so that importing fastcdml does not
import ``torch._dynamo``; ``tests/test_compile.py`` fails if the marker stops working).
"""
from __future__ import annotations

import importlib.util
from functools import lru_cache

import torch

from . import _extension
from ._runtime import interpreter_active
from .ops import cbml as cbml_ops
from .ops import ccl as ccl_ops
from .ops._registry import INTERPRET, MAIN, has_kernel
from .params import BayesianParams, CenterParams
from .reference import cbml as cbml_reference
from .reference import ccl as ccl_reference

BACKENDS = ("auto", "triton", "cpp", "reference")
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_FIRST_OP = {"ccl": "ccl_fwd", "cbml": "cbml_fwd"}


class BackendUnavailable(RuntimeError):
    """A forced backend cannot run here; the message says why."""


class Backend:
    """What a loss module needs from a backend: one method per operation of each loss family, named as the
    function that computes it in the family's reference (``fastcdml.reference.<family>``) and op
    (``fastcdml.ops.<family>``) modules, which take the same arguments (the op wrappers first take the bound op
    namespace); the hyper-parameters arrive here as the family's params dataclass.

    ``name``: ``"triton"``, ``"cpp"`` or ``"reference"``. ``dtypes``: the embedding dtypes it takes.
    ``updates_in_place``: whether :meth:`ccl_momentum_update` writes into the bank it is given (the fused ops,
    whose query gradient was computed in the forward) or returns a new bank (the reference: autograd still holds
    the old one, so the module must swap its buffer instead of writing into it).
    """

    name: str
    dtypes: tuple
    updates_in_place: bool

    def ccl_loss_rows(self, x, labels, centers, params: CenterParams) -> torch.Tensor:
        """Per-row CCL losses (B,) float32 (float64 for float64 reference inputs), differentiable in ``x`` and
        ``centers`` (the proxy gradient of the learnable-proxy mode flows through ``centers``)."""
        raise NotImplementedError

    def ccl_momentum_update(self, centers, x, labels, momentum: float, sub_centers: int = 1) -> torch.Tensor:
        """The bank after one momentum step (``centers`` itself when ``updates_in_place``); with ``sub_centers``
        K > 1 each query moves the sub-center of its class it is most similar to."""
        raise NotImplementedError

    def ccl_partials(self, x, labels, centers, params: CenterParams, compute_grad: bool
                     ) -> ccl_reference.SlicePartials:
        """The online-softmax partials of ``x`` over the bank slice ``centers`` (labels outside ``[0, C)`` belong
        to other slices; ``fastcdml.reference.ccl.ccl_partials``), no autograd."""
        raise NotImplementedError

    def ccl_operand_dtype(self, x_dtype: torch.dtype, bank_dtype: torch.dtype) -> torch.dtype:
        """The dtype this backend's forward products round the bank rows to: a caller that combines
        ``ccl_partials`` with bank rows of its own (the label's ``W_y``) rounds them alike, so that the label's
        term cancels exactly as in the fused epilogue."""
        raise NotImplementedError

    def ccl_slice_centers_grad(self, x, labels, centers, lse, label_q, grad_rows, params: CenterParams
                               ) -> torch.Tensor:
        """``Σ_i g_i ∂L_i/∂W`` for the bank slice ``centers`` from the rows' global lse and 1 − p_y
        (``fastcdml.reference.ccl.ccl_slice_centers_grad``)."""
        raise NotImplementedError

    def cbml_loss(self, x, labels, ref, ref_labels, include_self: bool, params: BayesianParams,
                  pair_mask=None) -> torch.Tensor:
        """The CBML loss ``Σ_i L_i / B`` (0-d) of ``x`` against ``[x if include_self] ++ ref`` (``ref`` (M, D),
        M may be 0), differentiable in ``x`` and ``ref``; ``pair_mask`` restricts the positive and negative sets
        to mined pairs (``fastcdml.reference.cbml.pack_pairs``)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<fastcdml backend {self.name!r}>"


class ReferenceBackend(Backend):
    """The eager PyTorch specification (``fastcdml.reference``): any device, float64 too."""

    name, dtypes, updates_in_place = "reference", KERNEL_DTYPES + (torch.float64,), False

    def ccl_loss_rows(self, x, labels, centers, params):
        return ccl_reference.ccl_loss_rows(x, labels, centers, *params.as_args(), gamma=params.gamma)

    def ccl_momentum_update(self, centers, x, labels, momentum, sub_centers=1):
        return ccl_reference.ccl_momentum_update(centers, x.detach(), labels, momentum, sub_centers)

    def ccl_partials(self, x, labels, centers, params, compute_grad):
        return ccl_reference.ccl_partials(x, labels, centers, params.temperature, params.margin, compute_grad,
                                          params.margin_type, params.sub_centers)

    def ccl_operand_dtype(self, x_dtype, bank_dtype):
        return torch.float64 if torch.float64 in (x_dtype, bank_dtype) else torch.float32

    def ccl_slice_centers_grad(self, x, labels, centers, lse, label_q, grad_rows, params):
        return ccl_reference.ccl_slice_centers_grad(x, labels, centers, lse, label_q, grad_rows, *params.as_args())

    def cbml_loss(self, x, labels, ref, ref_labels, include_self, params, pair_mask=None):
        return cbml_reference.cbml_loss(x, labels, ref if ref.shape[0] else None, ref_labels, pair_mask=pair_mask,
                                        include_self=include_self, **params.as_kwargs())


class FusedBackend(Backend):
    """The ``torch.library`` ops of one namespace, bound once as ``ops``: the Triton kernels (CUDA, or the CPU
    under the interpreter) or the C++ kernels (CPU). ``operand_dtype``: what its forward products round to."""

    dtypes, updates_in_place = KERNEL_DTYPES, True

    def __init__(self, name: str, namespace: str, operand_dtype):
        self.name, self.namespace, self.ops = name, namespace, getattr(torch.ops, namespace)
        self.ccl_operand_dtype = operand_dtype

    def ccl_loss_rows(self, x, labels, centers, params):
        return ccl_ops.ccl_loss_rows(self.ops, x, labels, centers, *params.as_args(), gamma=params.gamma)

    def ccl_momentum_update(self, centers, x, labels, momentum, sub_centers=1):
        return ccl_ops.ccl_momentum_update_(self.ops, centers, x, labels, momentum, sub_centers)

    def ccl_partials(self, x, labels, centers, params, compute_grad):
        return ccl_reference.SlicePartials(*ccl_ops.ccl_partials(
            self.ops, x, labels, centers, params.temperature, params.margin, compute_grad, params.margin_type,
            params.sub_centers))

    def ccl_slice_centers_grad(self, x, labels, centers, lse, label_q, grad_rows, params):
        return ccl_ops.ccl_slice_centers_grad(self.ops, x, labels, centers, lse, label_q, grad_rows,
                                              *params.as_args())

    def cbml_loss(self, x, labels, ref, ref_labels, include_self, params, pair_mask=None):
        return cbml_ops.cbml_loss(self.ops, x, labels, ref, ref_labels, pair_mask=pair_mask,
                                  include_self=include_self, **params.as_kwargs())


_INSTANCES = {
    ("reference", None): ReferenceBackend(),
    ("cpp", MAIN): FusedBackend("cpp", MAIN, ccl_ops.cpp_operand_dtype),
    ("triton", MAIN): FusedBackend("triton", MAIN, ccl_ops.triton_operand_dtype),
    ("triton", INTERPRET): FusedBackend("triton", INTERPRET, ccl_ops.triton_operand_dtype),
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
    if not has_kernel(MAIN, _FIRST_OP[loss], "CPU"):
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
    """The :class:`Backend` that computes ``loss`` (``"ccl"`` or ``"cbml"``) on ``device``'s tensors."""
    return _INSTANCES[_resolve_key(backend, loss, device.type)]


def available() -> dict[str, dict[str, str]]:
    """For each loss and device type: the backend ``auto`` picks, or why a backend is missing."""
    report = {}
    for loss in _FIRST_OP:
        for device_type in ("cpu", "cuda"):
            report[f"{loss}/{device_type}"] = {
                name: unavailable_reason(name, loss, device_type) or "available" for name in BACKENDS[1:]
            }
    return report

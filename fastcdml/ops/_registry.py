"""Where the ``torch.library`` ops are defined: one schema per op, shared by every namespace and backend.

Two namespaces carry the same ops:

* ``fastcdml``: the ops users run. CUDA → the Triton kernels; CPU → the C++ kernels, which ``csrc/`` registers
  (``register_kernels()``, called by ``fastcdml._extension`` once it has checked the build). The schemas live
  here rather than in C++ so that ``import fastcdml`` (and the CUDA ops) work without the extension.
* ``fastcdml_interpret``: defined only when ``TRITON_INTERPRET=1``; CPU → the same Triton kernels run by the
  interpreter. It lets CI exercise the Triton code through the real op, fake and autograd machinery.
"""
from __future__ import annotations

from typing import Callable

import torch

from .._runtime import interpreter_active

MAIN = "fastcdml"
INTERPRET = "fastcdml_interpret"


def namespaces() -> dict[str, str]:
    """Namespace -> device type its Triton kernels are registered for."""
    return {MAIN: "cuda", **({INTERPRET: "cpu"} if interpreter_active() else {})}


_LIBS: dict[str, torch.library.Library] = {}
_FAMILIES: list[str] = []  # the stems of the ``<stem>_fwd`` ops defined so far, in order

def _library(ns: str) -> torch.library.Library:
    if ns not in _LIBS:
        _LIBS[ns] = torch.library.Library(ns, "DEF")
    return _LIBS[ns]


def define(
    ns: str,
    name: str,
    schema: str,
    fake: Callable,
    triton_impl: Callable | None,
    backward: Callable | None = None,
    setup_context: Callable | None = None,
) -> None:
    """Define ``ns::name`` with its fake, its Triton kernel for ``namespaces()[ns]`` (None: an op with C++ CPU
    kernels only) and optional autograd."""
    lib = _library(ns)
    lib.define(name + schema)
    if ns == MAIN and name.endswith("_fwd"):
        _FAMILIES.append(name[: -len("_fwd")])
    qualname = f"{ns}::{name}"
    torch.library.register_fake(qualname, fake, lib=lib)
    if triton_impl is not None:
        torch.library.impl(qualname, namespaces()[ns], triton_impl, lib=lib)
    if backward is not None:
        torch.library.register_autograd(qualname, backward, setup_context=setup_context, lib=lib)


def has_kernel(ns: str, name: str, dispatch_key: str) -> bool:
    """Whether ``ns::name`` has a kernel for ``dispatch_key`` ("CPU" or "CUDA")."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"{ns}::{name}", dispatch_key)


def forward_gradient_fake(x, ref, grad_x: bool, grad_ref: bool):
    """The outputs ``(loss, grad_x, grad_ref)`` of such an op, as empty tensors: () fp32, (B or 0, D) and
    (R or 0, D) fp32."""
    f32 = torch.float32
    return (x.new_empty((), dtype=f32), x.new_empty((x.shape[0] if grad_x else 0, x.shape[1]), dtype=f32),
            x.new_empty((ref.shape[0] if grad_ref else 0, x.shape[1]), dtype=f32))


def forward_gradient_autograd(name: str, num_inputs: int) -> tuple[Callable, Callable]:
    """``(backward, setup_context)`` of an op ``(x, labels, ref, …, grad_x, grad_ref) -> (loss, grad_x, grad_ref)``
    that computes its gradients in the forward when the two flags ask for them: backward scales them by
    grad_output (in the inputs' dtypes) and raises if an input needs a gradient its flag did not compute."""

    def setup_context(ctx, inputs, output):
        ctx.dtypes = (inputs[0].dtype, inputs[2].dtype)
        ctx.computed = (inputs[-2], inputs[-1])
        ctx.save_for_backward(output[1], output[2])

    def backward(ctx, grad_loss, _g1, _g2):
        grad_x, grad_ref = ctx.saved_tensors
        gx = gr = None
        for i in (0, 2):
            if ctx.needs_input_grad[i] and not ctx.computed[i // 2]:
                raise RuntimeError(f"{name} ran without the gradient flag for an input that now needs a gradient")
        if ctx.needs_input_grad[0]:
            gx = (grad_loss * grad_x).to(ctx.dtypes[0])
        if ctx.needs_input_grad[2]:
            gr = (grad_loss * grad_ref).to(ctx.dtypes[1])
        return (gx, None, gr) + (None,) * (num_inputs - 3)

    return backward, setup_context


def families() -> tuple[str, ...]:
    """The loss families that have ops: each op module defines its first op as ``<stem>_fwd``."""
    return tuple(_FAMILIES)


def cpp_operand_dtype(x_dtype: torch.dtype, bank_dtype: torch.dtype) -> torch.dtype:
    """The dtype the C++ kernels' products round their operands to: they multiply in fp32."""
    return torch.float32


def triton_operand_dtype(x_dtype: torch.dtype, bank_dtype: torch.dtype) -> torch.dtype:
    """The dtype the Triton kernels' products round their operands to (the precision policy,
    ``fastcdml.kernels._tuning.operand_dtype``; read without importing triton)."""
    from ..kernels import _tuning

    return _tuning.operand_dtype(x_dtype, bank_dtype)

"""Where the ``torch.library`` ops are defined: one schema per op, shared by every namespace and backend.

Two namespaces carry the same ops:

* ``fastcdml``: the ops users run. CUDA → the Triton kernels; CPU → the C++ kernels, which ``csrc/`` registers
  (``register_kernels()``, called by ``fastcdml._extension`` once it has checked the build). The schemas live
  here rather than in C++ so that ``import fastcdml`` (and the CUDA ops) work without the extension.
* ``fastcdml_interpret``: defined only when ``TRITON_INTERPRET=1``; CPU → the same Triton kernels run by the
  interpreter. It lets CI exercise the Triton code through the real op, fake and autograd machinery.
"""
from __future__ import annotations

import importlib
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


def define_forward_gradient(stem: str, schema: str) -> None:
    """Define ``<stem>_fwd`` in every namespace: an op ``(x, labels, ref, …, grad_x, grad_ref) -> (loss, grad_x,
    grad_ref)`` that computes its gradients in the forward when the two flags ask for them. Outputs: loss () fp32,
    grad_x (B or 0, D) fp32, grad_ref (R or 0, D) fp32. Its Triton kernel is ``fastcdml.kernels.<stem>.<stem>_fwd``
    (imported on first call: it needs triton).

    Backward scales the saved gradients by grad_output and casts them to the inputs' dtypes; it raises if an input
    needs a gradient its flag did not compute. The scaling is in place when running eagerly (a second (R, D) buffer
    would double the op's peak memory; a second backward through the same graph then fails autograd's check of the
    saved tensors' versions) and out of place when traced (torch.compile, whose partitioner cannot return a mutated
    saved tensor)."""
    name = stem + "_fwd"
    num_inputs = len(torch._C.parse_schema(name + schema).arguments)

    def fake(*args):
        x, ref, grad_x, grad_ref = args[0], args[2], args[-2], args[-1]
        f32 = torch.float32
        return (x.new_empty((), dtype=f32), x.new_empty((x.shape[0] if grad_x else 0, x.shape[1]), dtype=f32),
                x.new_empty((ref.shape[0] if grad_ref else 0, x.shape[1]), dtype=f32))

    def triton_impl(*args):
        return getattr(importlib.import_module(f"..kernels.{stem}", __package__), name)(*args)

    def setup_context(ctx, inputs, output):
        ctx.dtypes = (inputs[0].dtype, inputs[2].dtype)
        ctx.computed = (inputs[-2], inputs[-1])
        ctx.save_for_backward(output[1], output[2])

    def backward(ctx, grad_loss, _g1, _g2):
        grads = [None] * num_inputs
        for i, saved, computed, dtype in zip((0, 2), ctx.saved_tensors, ctx.computed, ctx.dtypes):
            if ctx.needs_input_grad[i]:
                if not computed:
                    raise RuntimeError(f"{name} ran without the gradient flag for an input that now needs a gradient")
                grads[i] = scale_saved(saved, grad_loss).to(dtype)
        return tuple(grads)

    for ns in namespaces():
        define(ns, name, schema, fake, triton_impl, backward, setup_context)


def scale_saved(grad: torch.Tensor, grad_loss: torch.Tensor) -> torch.Tensor:
    """``grad_loss · grad`` for a gradient saved by a forward: in place when running eagerly, out of place when
    traced (see :func:`define_forward_gradient`)."""
    return grad.mul_(grad_loss) if type(grad) is torch.Tensor else grad * grad_loss


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

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
    triton_impl: Callable,
    backward: Callable | None = None,
    setup_context: Callable | None = None,
) -> None:
    """Define ``ns::name`` with its fake, its Triton kernel for ``namespaces()[ns]`` and optional autograd."""
    lib = _library(ns)
    lib.define(name + schema)
    if ns == MAIN and name.endswith("_fwd"):
        _FAMILIES.append(name[: -len("_fwd")])
    qualname = f"{ns}::{name}"
    torch.library.register_fake(qualname, fake, lib=lib)
    torch.library.impl(qualname, namespaces()[ns], triton_impl, lib=lib)
    if backward is not None:
        torch.library.register_autograd(qualname, backward, setup_context=setup_context, lib=lib)


def has_kernel(ns: str, name: str, dispatch_key: str) -> bool:
    """Whether ``ns::name`` has a kernel for ``dispatch_key`` ("CPU" or "CUDA")."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"{ns}::{name}", dispatch_key)


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

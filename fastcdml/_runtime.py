"""The runtime leaf that the kernels and the ops both import: where Triton runs, and how outputs are allocated.

It imports only torch, so a kernel module never depends on the op layer.
"""
from __future__ import annotations

import os

import torch


def interpreter_active() -> bool:
    """True when Triton kernels run on the CPU through the interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


POISON = False  # tests set this: outputs start as NaN (int: -1) so an element a kernel forgets to write fails


def new_output(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """Allocate a kernel output: ``torch.empty``, or NaN / -1 filled while ``POISON`` is set."""
    if not POISON:
        return torch.empty(shape, dtype=dtype, device=device)
    return torch.full(shape, float("nan") if dtype.is_floating_point else -1, dtype=dtype, device=device)

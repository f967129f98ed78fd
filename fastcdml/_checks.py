"""Input validation shared by the functional API and the modules. Every message names the argument."""
from __future__ import annotations

import torch

LABEL_DTYPES = (torch.int64, torch.int32)
REDUCTIONS = ("mean", "sum", "none")


def _assert(cond: torch.Tensor, message: str, detail=None) -> None:
    """Raise ``ValueError(message + detail())`` if ``cond`` is False. Under torch.compile it is traced as an
    assert (no graph break) that raises with ``message`` alone, as a RuntimeError."""
    if torch.compiler.is_compiling():
        torch._assert_async(cond, message)
    elif not bool(cond):
        raise ValueError(message + (detail() if detail else ""))


def tensor(x, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def embeddings(x, name: str, backend, dim: int | None = None, check_values: bool = True) -> None:
    """2-D float tensor (B, D) of a dtype ``backend`` takes (float64 only on the reference); finite values when
    ``check_values``."""
    tensor(x, name)
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D (batch, dim), got shape {tuple(x.shape)}")
    if x.dtype not in backend.dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in backend.dtypes]} for backend "
                        f"{backend.name!r}, got {x.dtype}")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"{name} has dimension {x.shape[1]} but the loss was built with embedding_size={dim}")
    if check_values and x.numel():
        _assert(torch.isfinite(x).all(), f"{name} contains NaN or inf")


def labels(y, name: str, x: torch.Tensor, x_name: str, num_classes: int | None = None,
           check_values: bool = True, non_negative: bool = False) -> None:
    """1-D int32/int64 tensor with one label per row of ``x``, on its device, in ``[0, num_classes)`` (or ≥ 0
    with ``non_negative``: CBML reserves negative labels for empty memory slots)."""
    tensor(y, name)
    if y.dim() != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(f"{name} must have shape ({x.shape[0]},) to match {x_name}, got {tuple(y.shape)}")
    if y.dtype not in LABEL_DTYPES:
        raise TypeError(f"{name} must be int64 or int32, got {y.dtype}")
    if y.device != x.device:
        raise ValueError(f"{name} is on {y.device} but {x_name} is on {x.device}")
    if check_values and num_classes is not None and y.numel():
        _assert(((y >= 0) & (y < num_classes)).all(), f"{name} must lie in [0, {num_classes})",
                lambda: f"; got values from {int(y.min())} to {int(y.max())}")
    elif check_values and non_negative and y.numel():
        _assert((y >= 0).all(), f"{name} must be >= 0 (negative labels mark empty memory slots)",
                lambda: f"; got {int(y.min())}")


def same_device(t: torch.Tensor, name: str, x: torch.Tensor, x_name: str, hint: str = "") -> None:
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but {x_name} is on {x.device}{hint}")


def reduce(rows: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return rows.mean()
    if reduction == "sum":
        return rows.sum()
    return rows


def choice(value, name: str, options) -> None:
    if value not in options:
        raise ValueError(f"{name} must be one of {tuple(options)}, got {value!r}")



def embedding_size_alias(embedding_size: int | None, options: dict, required: bool = True) -> int | None:
    """``embedding_size``, also accepted under its former keyword ``embedding_dim`` (popped from ``options``)."""
    if "embedding_dim" in options:
        if embedding_size is not None:
            raise TypeError("pass embedding_size or its alias embedding_dim, not both")
        embedding_size = options.pop("embedding_dim")
    if embedding_size is None and required:
        raise TypeError("missing required argument: embedding_size")
    return embedding_size

"""Center Contrastive Loss: the eager PyTorch specification (``docs/spec.md``).

This module is the correctness oracle for every backend and the fallback on any device. It imports only torch.

Shapes: ``x`` (B, D) float, ``labels`` (B,) int32/int64, ``centers`` (C, D). Math, with
``x̂ = x / max(‖x‖₂, 1e-12)`` computed in fp32 or wider::

    s_ij = x̂_i · W_j
    z_ij = (s_ij − m·[j = y_i]) / τ
    L_i  = logsumexp_j z_ij − z_{i,y_i} − 2λ·s_{i,y_i}

Computation dtype: float64 when any input is float64, else float32 (bf16/fp16 inputs are upcast), so the
returned per-row losses are float32 or float64. Rows whose label lies outside ``[0, C)`` get a NaN loss (the
caller's input checks normally reject them first).
"""
from __future__ import annotations

import torch

EPS = 1e-12


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any tensor is float64, else float32 (the accumulation dtype the spec requires)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def normalize_rows(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``x / max(‖x‖₂, eps)`` row-wise, computed in ``dtype`` (default: fp32, or fp64 for fp64 input)."""
    x = x.to(dtype or compute_dtype(x))
    return x / x.norm(dim=1, keepdim=True).clamp_min(EPS)


def ccl_loss_rows(
    x: torch.Tensor,
    labels: torch.Tensor,
    centers: torch.Tensor,
    temperature: float = 0.05,
    margin: float = 0.1,
    center_weight: float = 1.0,
) -> torch.Tensor:
    """Per-row CCL losses ``L_i`` (B,), differentiable in ``x`` and ``centers``.

    ``centers`` is used as given (the module normalises it in learnable-proxy mode). The caller must not
    update ``centers`` in place before backward: autograd saves it (pass a clone if it will be updated).
    """
    dtype = compute_dtype(x, centers)
    xh = normalize_rows(x, dtype)
    w = centers.to(dtype)
    num_classes = w.shape[0]
    valid = (labels >= 0) & (labels < num_classes)
    y = torch.where(valid, labels, torch.zeros_like(labels)).long()
    s = xh @ w.t()
    s_y = s.gather(1, y[:, None]).squeeze(1)
    z = s.scatter_add(1, y[:, None], torch.full_like(s_y[:, None], -margin)) / temperature
    z_y = (s_y - margin) / temperature
    loss = torch.logsumexp(z, dim=1) - z_y - 2.0 * center_weight * s_y
    return torch.where(valid, loss, torch.full_like(loss, float("nan")))


@torch.no_grad()
def ccl_momentum_update(
    centers: torch.Tensor, x: torch.Tensor, labels: torch.Tensor, momentum: float = 0.9
) -> torch.Tensor:
    """The bank after one momentum step, out of place (same dtype as ``centers``)::

        W_k ← normalize(μ·W_k + (1 − μ)·mean_{i: y_i = k} x̂_i)   for each class k in the batch

    Absent classes, rows with a label outside ``[0, C)`` and classes whose new row would not be finite are left
    untouched, so a bad batch can never corrupt the bank. The class sums run in fp32 (fp64 for fp64 input);
    permuting the batch rows changes the result only by float rounding of the class sums.
    """
    num_classes = centers.shape[0]
    dtype = compute_dtype(x, centers)
    xh = normalize_rows(x, dtype)
    valid = (labels >= 0) & (labels < num_classes)
    y = torch.where(valid, labels, torch.zeros_like(labels)).long()
    xh = xh * valid[:, None].to(dtype)
    sums = torch.zeros(num_classes, xh.shape[1], dtype=dtype, device=xh.device).index_add_(0, y, xh)
    counts = torch.zeros(num_classes, dtype=dtype, device=xh.device).index_add_(0, y, valid.to(dtype))
    mixed = momentum * centers.to(dtype) + (1.0 - momentum) * sums / counts.clamp_min(1.0)[:, None]
    new = mixed / mixed.norm(dim=1, keepdim=True).clamp_min(EPS)
    keep = (counts > 0) & torch.isfinite(new).all(dim=1)
    return torch.where(keep[:, None], new, centers.to(dtype)).to(centers.dtype)


def ccl_momentum_update_(
    centers: torch.Tensor, x: torch.Tensor, labels: torch.Tensor, momentum: float = 0.9
) -> torch.Tensor:
    """In-place form of :func:`ccl_momentum_update`; returns ``centers``."""
    return centers.copy_(ccl_momentum_update(centers, x, labels, momentum))

"""Center Contrastive Loss and its margin-softmax family: the eager PyTorch specification (``docs/spec.md``).

This module is the correctness oracle for every backend and the fallback on any device. It imports only torch.

Shapes: ``x`` (B, D) float, ``labels`` (B,) int32/int64, ``centers`` (C·K, D) with K = ``sub_centers`` rows per
class in PML's column layout (class j owns rows j·K … j·K+K−1). Math, with ``x̂ = x / max(‖x‖₂, 1e-12)``
computed in fp32 or wider::

    c_ij = max_k x̂_i · W_{jK+k}                         (K = 1: the plain cosine s_ij)
    z_ij = c_ij / τ  for j ≠ y_i,   z_{i,y_i} = t(c_{i,y_i}) / τ
    L_i  = logsumexp_j z_ij − z_{i,y_i} − 2λ·c_{i,y_i}

The target transform ``t`` (cosine units) is chosen by ``margin_type``:

* ``ADDITIVE_COSINE`` (0): ``t(c) = c − m`` — CCL, CosFace (τ = 1/scale, λ = 0), NormalizedSoftmax (m = 0).
* ``ADDITIVE_ANGULAR`` (1): ArcFace with ``m`` in radians and PML's monotonic fallback: with ``ĉ = clamp(c, −1, 1)``
  and ``sin θ = sqrt(max((1 − ĉ)(1 + ĉ), 1e-30))``, ``t(c) = ĉ·cos m − sin θ·sin m = cos(θ + m)`` if
  ``θ ≤ π − m`` (i.e. ``ĉ ≥ −cos m``), else ``ĉ − m·sin m``. The floor under ``sin² θ`` keeps the derivative
  ``∂t/∂c = cos m + ĉ·sin m / sin θ`` finite at ``|c| = 1`` (where PML's ``acos`` gives an infinite gradient).

Sub-centers: the max over a class's K rows is taken before the margin; its gradient goes to the argmax row
(the first one on a tie, as ``torch.max``).

Computation dtype: float64 when any input is float64, else float32 (bf16/fp16 inputs are upcast), so the
returned per-row losses are float32 or float64. Rows whose label lies outside ``[0, C)`` get a NaN loss (the
caller's input checks normally reject them first).
"""
from __future__ import annotations

import math

import torch

EPS = 1e-12
ADDITIVE_COSINE, ADDITIVE_ANGULAR = 0, 1  # ``margin_type`` codes, shared by every backend's op schema
MARGIN_TYPES = (ADDITIVE_COSINE, ADDITIVE_ANGULAR)
SIN2_FLOOR = 1e-30  # lower bound of sin²θ in the angular transform


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any tensor is float64, else float32 (the accumulation dtype the spec requires)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def normalize_rows(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``x / max(‖x‖₂, eps)`` row-wise, computed in ``dtype`` (default: fp32, or fp64 for fp64 input)."""
    x = x.to(dtype or compute_dtype(x))
    return x / x.norm(dim=1, keepdim=True).clamp_min(EPS)


def target_logit(c: torch.Tensor, margin: float, margin_type: int = ADDITIVE_COSINE) -> torch.Tensor:
    """``t(c)``: the label column's cosine after the margin (see the module docstring), differentiable."""
    if margin_type == ADDITIVE_COSINE:
        return c - margin
    if margin_type != ADDITIVE_ANGULAR:
        raise ValueError(f"margin_type must be one of {MARGIN_TYPES}, got {margin_type}")
    cc = c.clamp(-1.0, 1.0)
    sin_theta = ((1.0 - cc) * (1.0 + cc)).clamp_min(SIN2_FLOOR).sqrt()
    cos_m, sin_m = math.cos(margin), math.sin(margin)
    return torch.where(cc >= -cos_m, cc * cos_m - sin_theta * sin_m, cc - margin * sin_m)


def class_cosines(xh: torch.Tensor, centers: torch.Tensor, sub_centers: int = 1) -> torch.Tensor:
    """``c_ij = max_k x̂_i · W_{jK+k}`` (B, C) for normalised queries ``xh`` and a (C·K, D) bank."""
    s = xh @ centers.t()
    if sub_centers == 1:
        return s
    return s.view(s.shape[0], -1, sub_centers).max(dim=2).values


def ccl_loss_rows(
    x: torch.Tensor,
    labels: torch.Tensor,
    centers: torch.Tensor,
    temperature: float = 0.05,
    margin: float = 0.1,
    center_weight: float = 1.0,
    margin_type: int = ADDITIVE_COSINE,
    sub_centers: int = 1,
) -> torch.Tensor:
    """Per-row losses ``L_i`` (B,), differentiable in ``x`` and ``centers`` (C·K, D).

    ``centers`` is used as given (the module normalises it in learnable-proxy mode). The caller must not
    update ``centers`` in place before backward: autograd saves it (pass a clone if it will be updated).
    """
    if sub_centers < 1 or centers.shape[0] % sub_centers:
        raise ValueError(f"centers has {centers.shape[0]} rows, not a multiple of sub_centers={sub_centers}")
    dtype = compute_dtype(x, centers)
    xh = normalize_rows(x, dtype)
    c = class_cosines(xh, centers.to(dtype), sub_centers)
    num_classes = c.shape[1]
    valid = (labels >= 0) & (labels < num_classes)
    y = torch.where(valid, labels, torch.zeros_like(labels)).long()
    c_y = c.gather(1, y[:, None]).squeeze(1)
    t_y = target_logit(c_y, margin, margin_type)
    is_y = torch.arange(num_classes, device=c.device)[None, :] == y[:, None]
    z = torch.where(is_y, t_y[:, None], c) / temperature
    loss = torch.logsumexp(z, dim=1) - t_y / temperature - 2.0 * center_weight * c_y
    return torch.where(valid, loss, torch.full_like(loss, float("nan")))


def subcenter_rows(centers: torch.Tensor, x: torch.Tensor, labels: torch.Tensor, sub_centers: int) -> torch.Tensor:
    """The bank row each query moves in a momentum step: ``y_i·K + argmax_k x̂_i · W_{y_i K + k}`` (B,) int64.

    The sub-center of its own class that the query is most similar to (the first one on a tie, as
    ``torch.argmax``), computed from the bank before the step; −1 for a label outside ``[0, C)``. K = 1: the label.
    """
    num_classes = centers.shape[0] // sub_centers
    valid = (labels >= 0) & (labels < num_classes)
    y = torch.where(valid, labels, torch.zeros_like(labels)).long()
    if sub_centers > 1:
        dtype = compute_dtype(x, centers)
        own = centers.to(dtype).view(num_classes, sub_centers, -1)[y]  # (B, K, D)
        k = torch.einsum("bkd,bd->bk", own, normalize_rows(x, dtype)).argmax(dim=1)
        y = y * sub_centers + k
    return torch.where(valid, y, torch.full_like(y, -1))


@torch.no_grad()
def ccl_momentum_update(
    centers: torch.Tensor, x: torch.Tensor, labels: torch.Tensor, momentum: float = 0.9, sub_centers: int = 1
) -> torch.Tensor:
    """The bank after one momentum step, out of place (same dtype as ``centers``)::

        W_k ← normalize(μ·W_k + (1 − μ)·mean_{i: y_i = k} x̂_i)   for each class k in the batch

    With K > 1 sub-centers per class, each query moves only the sub-center of its class it is most similar to
    (:func:`subcenter_rows`), so ``k`` above runs over bank rows and ``y_i`` is that row.

    Absent classes, rows with a label outside ``[0, C)`` and classes whose new row would not be finite are left
    untouched, so a bad batch can never corrupt the bank. The class sums run in fp32 (fp64 for fp64 input);
    permuting the batch rows changes the result only by float rounding of the class sums.
    """
    num_rows = centers.shape[0]
    dtype = compute_dtype(x, centers)
    xh = normalize_rows(x, dtype)
    rows = subcenter_rows(centers, x, labels, sub_centers)
    valid = rows >= 0
    y = torch.where(valid, rows, torch.zeros_like(rows))
    xh = xh * valid[:, None].to(dtype)
    sums = torch.zeros(num_rows, xh.shape[1], dtype=dtype, device=xh.device).index_add_(0, y, xh)
    counts = torch.zeros(num_rows, dtype=dtype, device=xh.device).index_add_(0, y, valid.to(dtype))
    mixed = momentum * centers.to(dtype) + (1.0 - momentum) * sums / counts.clamp_min(1.0)[:, None]
    new = mixed / mixed.norm(dim=1, keepdim=True).clamp_min(EPS)
    keep = (counts > 0) & torch.isfinite(new).all(dim=1)
    return torch.where(keep[:, None], new, centers.to(dtype)).to(centers.dtype)


def ccl_momentum_update_(
    centers: torch.Tensor, x: torch.Tensor, labels: torch.Tensor, momentum: float = 0.9, sub_centers: int = 1
) -> torch.Tensor:
    """In-place form of :func:`ccl_momentum_update`; returns ``centers``."""
    return centers.copy_(ccl_momentum_update(centers, x, labels, momentum, sub_centers))

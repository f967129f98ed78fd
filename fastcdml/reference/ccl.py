"""Center Contrastive Loss and its margin-softmax family: the eager PyTorch specification (``docs/spec.md``).

This module is the correctness oracle for every backend and the fallback on any device. It imports only torch.

Shapes: ``x`` (B, D) float, ``labels`` (B,) int32/int64, ``centers`` (C·K, D) with K = ``sub_centers`` rows per
class in PML's column layout (class j owns rows j·K … j·K+K−1). Math, with ``x̂ = x / max(‖x‖₂, 1e-12)``
computed in fp32 or wider::

    c_ij = max_k s_ijk,  s_ijk = x̂_i · W_{jK+k}          (K = 1: the plain cosine s_ij)
         = Σ_k softmax_k(s_ijk/γ)·s_ijk                  with ``gamma`` γ > 0 (SoftTriple)
    z_ij = c_ij / τ  for j ≠ y_i,   z_{i,y_i} = t(c_{i,y_i}) / τ
    L_i  = logsumexp_j z_ij − z_{i,y_i} − 2λ·c_{i,y_i}

The target transform ``t`` (cosine units) is chosen by ``margin_type``:

* ``ADDITIVE_COSINE`` (0): ``t(c) = c − m`` — CCL, CosFace (τ = 1/scale, λ = 0), NormalizedSoftmax (m = 0).
* ``ADDITIVE_ANGULAR`` (1): ArcFace with ``m`` in radians and PML's monotonic fallback: with ``ĉ = clamp(c, −1, 1)``
  and ``sin θ = sqrt(max((1 − ĉ)(1 + ĉ), 1e-30))``, ``t(c) = ĉ·cos m − sin θ·sin m = cos(θ + m)`` if
  ``θ ≤ π − m`` (i.e. ``ĉ ≥ −cos m``), else ``ĉ − m·sin m``. The floor under ``sin² θ`` keeps the derivative
  ``∂t/∂c = cos m + ĉ·sin m / sin θ`` finite at ``|c| = 1`` (where PML's ``acos`` gives an infinite gradient).

Sub-centers: the max over a class's K rows is taken before the margin; its gradient goes to the argmax row
(the first one on a tie, as ``torch.max``). With γ > 0 every row of the class gets a share:
``∂c_ij/∂s_ijk = q_ijk·(1 + (s_ijk − c_ij)/γ)``, ``q_ijk = softmax_k(s_ijk/γ)``.

Computation dtype: float64 when any input is float64, else float32 (bf16/fp16 inputs are upcast), so the
returned per-row losses are float32 or float64. Rows whose label lies outside ``[0, C)`` get a NaN loss (the
caller's input checks normally reject them first).
"""
from __future__ import annotations

import math
from typing import NamedTuple

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


def target_logit_and_slope(c: torch.Tensor, margin: float, margin_type: int = ADDITIVE_COSINE
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(t(c), ∂t/∂c)`` elementwise, the slope by autograd through :func:`target_logit` (no graph is kept)."""
    with torch.enable_grad():
        leaf = c.detach().requires_grad_()
        t = target_logit(leaf, margin, margin_type)
        (slope,) = torch.autograd.grad(t.sum(), leaf)
    return t.detach(), slope


def class_cosines(xh: torch.Tensor, centers: torch.Tensor, sub_centers: int = 1, gamma: float = 0.0) -> torch.Tensor:
    """``c_ij`` (B, C) for normalised queries ``xh`` and a (C·K, D) bank: ``max_k x̂_i · W_{jK+k}``, or with
    ``gamma`` γ > 0 the softmax-weighted mean ``Σ_k softmax_k(s_ijk/γ)·s_ijk`` (differentiable)."""
    s = xh @ centers.t()
    if sub_centers == 1:
        return s
    s = s.view(s.shape[0], -1, sub_centers)
    if gamma > 0:
        return (torch.softmax(s / gamma, dim=2) * s).sum(dim=2)
    return s.max(dim=2).values


def ccl_loss_rows(
    x: torch.Tensor,
    labels: torch.Tensor,
    centers: torch.Tensor,
    temperature: float = 0.05,
    margin: float = 0.1,
    center_weight: float = 1.0,
    margin_type: int = ADDITIVE_COSINE,
    sub_centers: int = 1,
    gamma: float = 0.0,
) -> torch.Tensor:
    """Per-row losses ``L_i`` (B,), differentiable in ``x`` and ``centers`` (C·K, D).

    ``centers`` is used as given (the module normalises it in learnable-proxy mode). The caller must not
    update ``centers`` in place before backward: autograd saves it (pass a clone if it will be updated).
    """
    if sub_centers < 1 or centers.shape[0] % sub_centers:
        raise ValueError(f"centers has {centers.shape[0]} rows, not a multiple of sub_centers={sub_centers}")
    dtype = compute_dtype(x, centers)
    xh = normalize_rows(x, dtype)
    c = class_cosines(xh, centers.to(dtype), sub_centers, gamma)
    num_classes = c.shape[1]
    valid = (labels >= 0) & (labels < num_classes)
    y = torch.where(valid, labels, torch.zeros_like(labels)).long()
    c_y = c.gather(1, y[:, None]).squeeze(1)
    t_y = target_logit(c_y, margin, margin_type)
    is_y = torch.arange(num_classes, device=c.device)[None, :] == y[:, None]
    z = torch.where(is_y, t_y[:, None], c) / temperature
    loss = torch.logsumexp(z, dim=1) - t_y / temperature - 2.0 * center_weight * c_y
    return torch.where(valid, loss, torch.full_like(loss, float("nan")))


class SlicePartials(NamedTuple):
    """Online-softmax partials of B queries over one bank slice (:func:`ccl_partials`)."""

    m: torch.Tensor  # (B,) max_j z_ij (−inf over an empty slice)
    l: torch.Tensor  # (B,) Σ_j exp(z_ij − m_i)
    lo: torch.Tensor  # (B,) the same sum without the label's column
    ps: torch.Tensor  # (B,) Σ_j exp(z_ij − m_i)·c_ij, or (0,) without compute_grad
    acc: torch.Tensor  # (B, D) Σ_j exp(z_ij − m_i)·W_{jK+k*_ij}, or (0, D) without compute_grad
    c_y: torch.Tensor  # (B,) the label's class cosine where the slice owns it, else 0
    row_y: torch.Tensor  # (B,) int64: the label's bank row y_i·K + k*_i where the slice owns it, else −1


def ccl_partials(
    x: torch.Tensor,
    labels: torch.Tensor,
    centers: torch.Tensor,
    temperature: float = 0.05,
    margin: float = 0.1,
    compute_grad: bool = True,
    margin_type: int = ADDITIVE_COSINE,
    sub_centers: int = 1,
    chunk: int | None = None,
) -> SlicePartials:
    """What the loss needs from one slice of the bank, for every query (no gradient flows through it).

    ``centers`` (C·K, D) is a slice of a larger bank and ``labels`` index it: a label in ``[0, C)`` is owned by
    the slice (its column carries the target transform), any other label belongs to another slice (the row only
    has negatives here). With ``z_ij`` as in the module docstring over the slice's classes, the partials of
    :class:`SlicePartials` combine across slices exactly as the online softmax of flash attention does: with
    ``M = max_r m_r`` and ``e_r = exp(m_r − M)`` (:func:`merge_partials`), ``lse = M + log Σ_r e_r l_r``,
    ``1 − p_y = Σ_r e_r lo_r / Σ_r e_r l_r``, ``Σ_j p_j W_j = Σ_r e_r acc_r / Σ_r e_r l_r`` and
    ``x̂·Σ_j p_j W_j = Σ_r e_r ps_r / Σ_r e_r l_r``; :func:`ccl_epilogue` turns them into the loss and the query
    gradient.
    An empty slice gives ``m = −inf`` and zero sums. The classes are taken ``chunk`` at a time (default: B·chunk ≤
    2²² logits), so memory is O(B·(D + chunk)); results in the computation dtype.
    """
    if sub_centers < 1 or centers.shape[0] % sub_centers:
        raise ValueError(f"centers has {centers.shape[0]} rows, not a multiple of sub_centers={sub_centers}")
    dtype = compute_dtype(x, centers)
    xh = normalize_rows(x.detach(), dtype)
    b, d = xh.shape
    num_classes = centers.shape[0] // sub_centers
    own = (labels >= 0) & (labels < num_classes)
    m = xh.new_full((b,), -math.inf)
    l, lo, ps, c_y = xh.new_zeros(b), xh.new_zeros(b), xh.new_zeros(b), xh.new_zeros(b)
    acc = xh.new_zeros(b, d)
    row_y = torch.full((b,), -1, dtype=torch.int64, device=xh.device)
    rows = torch.arange(b, device=xh.device)
    step = chunk or max(1, (1 << 22) // max(b * sub_centers, 1))
    for c0 in range(0, num_classes, step):
        w = centers.detach()[c0 * sub_centers: (c0 + step) * sub_centers].to(dtype)
        s = (xh @ w.t()).view(b, -1, sub_centers)
        c, k = s.max(dim=2)
        col = labels.long() - c0
        hit = own & (col >= 0) & (col < c.shape[1])
        c_y[hit] = c[rows[hit], col[hit]]
        row_y[hit] = labels[hit].long() * sub_centers + k[rows[hit], col[hit]]
        z = c.clone()
        z[rows[hit], col[hit]] = target_logit(c[rows[hit], col[hit]], margin, margin_type)
        z /= temperature
        m_new = torch.maximum(m, z.max(dim=1).values)
        alpha = torch.exp(m - m_new)
        p = torch.exp(z - m_new[:, None])
        l = l * alpha + p.sum(dim=1)
        p_off = p.clone()
        p_off[rows[hit], col[hit]] = 0.0
        lo = lo * alpha + p_off.sum(dim=1)
        if compute_grad:
            ps = ps * alpha + (p * c).sum(dim=1)
            routed = torch.zeros_like(s).scatter_(2, k[:, :, None], p[:, :, None]).view(b, -1)
            acc = acc * alpha[:, None] + routed @ w
        m = m_new
    if not compute_grad:
        ps, acc = ps[:0], acc[:0]
    return SlicePartials(m, l, lo, ps, acc, c_y, row_y)


def partials_scale(m: torch.Tensor, m_max: torch.Tensor) -> torch.Tensor:
    """``exp(m − M)``: the factor that puts partials with running max ``m`` onto the common max ``M`` (0 for an
    empty slice, ``m = −inf``, even where ``M`` is −inf too)."""
    return torch.where(m == -math.inf, torch.zeros_like(m), torch.exp(m - m_max))


def merge_partials(m: torch.Tensor, l: torch.Tensor, lo: torch.Tensor, ps: torch.Tensor, acc: torch.Tensor
                   ) -> tuple[torch.Tensor, ...]:
    """The partials ``(m, l, lo, ps, acc)`` of the union of S slices, from theirs stacked along dim 0 (m, l, lo
    (S, B); ps (S, B) or (S, 0); acc (S, B, D) or (S, 0, D)): with ``M = max_s m_s`` and ``e_s = exp(m_s − M)``,
    ``(M, Σ e_s l_s, Σ e_s lo_s, Σ e_s ps_s, Σ e_s acc_s)`` (flash attention's online-softmax rescaling)."""
    big = m.max(dim=0).values
    e = partials_scale(m, big)
    ps = (e * ps).sum(dim=0) if ps.shape[1] else ps[0]
    acc = (e[:, :, None] * acc).sum(dim=0) if acc.shape[1] else acc[0]
    return big, (e * l).sum(dim=0), (e * lo).sum(dim=0), ps, acc


def ccl_epilogue(x: torch.Tensor, c_y: torch.Tensor, lse: torch.Tensor, label_q: torch.Tensor, temperature: float,
                 margin: float, center_weight: float, margin_type: int = ADDITIVE_COSINE,
                 mean_row: torch.Tensor | None = None, mean_dot: torch.Tensor | None = None,
                 w_y: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Loss rows and query gradient from the combined softmax statistics of each row (:func:`ccl_partials`):
    ``lse``, ``label_q`` = 1 − p_y, the label's class cosine ``c_y``; for the gradient also ``mean_row`` =
    ``Σ_j p_j W_j`` (B, D), ``mean_dot`` = ``x̂ · Σ_j p_j W_j`` and ``w_y`` the label's bank row (B, D)::

        L     = lse − t(c_y)/τ − 2λ c_y
        ∂L/∂x̂ = mean_row/τ + a·w_y,   a = (−1 − (t'(c_y) − 1)·label_q)/τ − 2λ
        ∂L/∂x = (∂L/∂x̂ − x̂ (x̂·∂L/∂x̂)) / ‖x‖,   x̂·∂L/∂x̂ = mean_dot/τ + a·c_y

    Returns ``(loss (B,), grad (B, D) or None without mean_row)`` in the dtype of ``lse``."""
    t, slope = target_logit_and_slope(c_y, margin, margin_type)
    tau, two_lambda = temperature, 2.0 * center_weight
    loss = lse - t / tau - two_lambda * c_y
    if mean_row is None:
        return loss, None
    a = (-1.0 - (slope - 1.0) * label_q) / tau - two_lambda
    grad_xh = mean_row / tau + a[:, None] * w_y
    dot = mean_dot / tau + a * c_y
    x = x.to(grad_xh.dtype)
    norm = x.norm(dim=1, keepdim=True).clamp_min(EPS)
    return loss, (grad_xh - x / norm * dot[:, None]) / norm


def ccl_slice_centers_grad(
    x: torch.Tensor,
    labels: torch.Tensor,
    centers: torch.Tensor,
    lse: torch.Tensor,
    label_q: torch.Tensor,
    grad_rows: torch.Tensor,
    temperature: float = 0.05,
    margin: float = 0.1,
    center_weight: float = 1.0,
    margin_type: int = ADDITIVE_COSINE,
    sub_centers: int = 1,
) -> torch.Tensor:
    """``Σ_i g_i ∂L_i/∂W`` (C·K, D) for a slice ``centers`` of a larger bank, given each row's global ``lse`` and
    ``label_q`` = 1 − p_{i,y_i} (from the combined :func:`ccl_partials`) and ``grad_rows`` g (B,)::

        ∂L_i/∂c_ij = p_ij / τ off the label,   −t'(c_iy)·q_i / τ − 2λ at it,    p_ij = exp(z_ij − lse_i)

    routed to the argmax sub-center row of each class (``∂c_ij/∂W_{jK+k*} = x̂_i``). Labels outside ``[0, C)`` belong
    to other slices: their rows contribute their negatives only. In the computation dtype.
    """
    dtype = compute_dtype(x, centers)
    xh = normalize_rows(x.detach(), dtype)
    w = centers.detach().to(dtype)
    b = xh.shape[0]
    num_classes = w.shape[0] // sub_centers
    s = (xh @ w.t()).view(b, num_classes, sub_centers)
    c, k = s.max(dim=2)
    own = (labels >= 0) & (labels < num_classes)
    rows, cols = torch.nonzero(own).squeeze(1), labels[own].long()
    t_y, dt_y = target_logit_and_slope(c[rows, cols], margin, margin_type)
    z = c.clone()
    z[rows, cols] = t_y
    coef = torch.exp(z / temperature - lse.to(dtype)[:, None]) / temperature
    coef[rows, cols] = -dt_y * label_q.to(dtype)[own] / temperature - 2.0 * center_weight
    coef = coef * grad_rows.to(dtype)[:, None]
    routed = torch.zeros_like(s).scatter_(2, k[:, :, None], coef[:, :, None]).view(b, -1)
    return routed.t() @ xh


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

"""Pair losses (NTXent, SupCon, MultiSimilarity, Contrastive): the eager PyTorch specification (``docs/spec.md``).

Shapes: queries ``x`` (B, D) with ``labels`` (B,), references ``ref`` (R, D) with ``ref_labels`` (R,).
``S_ij = x̂_i · r̂_j`` in fp32 (fp64 for fp64 input), x̂ = x / max(‖x‖, 1e-12).

Pairs. Without ``counts`` every pair takes part once: (i, j) is a positive when ``labels[i] == ref_labels[j]`` and
``j != exclude[i]`` (``exclude`` (B,) int64, −1 for none: a row's own column), else a negative. With ``counts``
(B, R) uint8, pair (i, j) takes part ``counts[i, j]`` times (the multiplicity of a mined list), positive or negative
by the labels. Write w⁺_ij, w⁻_ij for these multiplicities, P_i / N_i for the pairs with w > 0, n⁺ = Σ w⁺, n⁻ = Σ w⁻.

Per kind (``KINDS``), with u = S / τ:

* ``"ntxent"`` (τ): ``NLSE_i = log Σ_j w⁻_ij exp(u_ij)``, ``L = Σ_ij w⁺_ij softplus(NLSE_i − u_ij) / n⁺``
  (a row without negatives contributes 0); 0 when n⁺ = 0 or n⁻ = 0.
* ``"supcon"`` (τ): ``L_i = LSE_{P_i ∪ N_i} u_i − mean_{P_i} u_i`` (0 without positives),
  ``L = Σ_i L_i / #{i : L_i > 0}`` (0 if no row is > 0, or no positive or no negative pair exists).
* ``"multi_similarity"`` (α, β, base): ``L_i = log(1 + Σ_{P_i} e^{α(base − S)}) / α +
  log(1 + Σ_{N_i} e^{β(S − base)}) / β``, ``L = Σ_i L_i / B``.
* ``"contrastive"`` (m⁺, m⁻): ``d_ij = √(max(2 − 2 S_ij, 0))`` (Euclidean distance of the unit rows),
  ``L = Σ w⁺ [d − m⁺]₊ / Σ w⁺ [d > m⁺] + Σ w⁻ [m⁻ − d]₊ / Σ w⁻ [d < m⁻]`` (each part 0 when its count is 0).

Every kind is 0 when n⁺ ≤ 1 and n⁻ ≤ 1 (multiplicities counted). SupCon and MultiSimilarity use the sets (multiplicities are ignored),
NTXent and Contrastive the multiplicities. The row filters (L_i > 0, hinge > 0) use forward values; gradients flow
through S. The gradient of d at d = 0 is taken as 0.
"""
from __future__ import annotations

import torch

from .cbml import _log1p_sum_exp
from .ccl import compute_dtype, normalize_rows

KINDS = ("ntxent", "supcon", "multi_similarity", "contrastive")
SET_KINDS = ("supcon", "multi_similarity")  # kinds whose pairs are sets (PML builds them as masks)


def pair_weights(labels, ref_labels, exclude=None, counts=None, dtype=torch.float64):
    """(w⁺, w⁻): the (B, R) multiplicities of the positive and negative pairs (see the module docstring)."""
    same = labels.long()[:, None] == ref_labels.long()[None, :]
    if counts is None:
        w = torch.ones(same.shape, dtype=dtype, device=labels.device)
        if exclude is not None:
            rows = torch.arange(same.shape[0], device=labels.device)
            keep = exclude >= 0
            w[rows[keep], exclude[keep].long()] = 0
        return torch.where(same, w, 0), torch.where(same, 0, 1).to(dtype)
    w = counts.to(dtype)
    return torch.where(same, w, 0), torch.where(same, 0, w)


def _masked_lse(t, mask):
    """``log Σ_{mask} exp(t)`` per row, −inf for an empty row, with a finite gradient everywhere."""
    has = mask.any(dim=1)
    safe = torch.where(mask, t, torch.where(has[:, None], float("-inf"), 0.0))
    lse = torch.logsumexp(safe, dim=1)
    return torch.where(has, lse, float("-inf"))


def _zero(s):
    return s.sum() * 0.0


def pair_loss(kind: str, x, labels, ref, ref_labels, params, exclude=None, counts=None) -> torch.Tensor:
    """The ``kind`` loss (0-d, fp32 or fp64) of ``x`` against ``ref``; ``params`` are the kind's hyper-parameters
    in constructor order (τ; τ; α, β, base; m⁺, m⁻)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    dtype = compute_dtype(x, ref)
    s = normalize_rows(x, dtype) @ normalize_rows(ref, dtype).t()
    wp, wn = pair_weights(labels, ref_labels, exclude, counts, dtype)
    n_pos, n_neg = wp.sum(), wn.sum()
    if x.shape[0] == 0 or (n_pos <= 1 and n_neg <= 1):
        return _zero(s)
    if kind in SET_KINDS:
        wp, wn = (wp > 0).to(dtype), (wn > 0).to(dtype)
    pos, neg = wp > 0, wn > 0
    if kind == "ntxent":
        if n_pos == 0 or n_neg == 0:
            return _zero(s)
        u = s / params[0]
        nlse = _masked_lse(u + wn.log(), neg)
        return (wp * torch.nn.functional.softplus(nlse[:, None] - u)).sum() / n_pos
    if kind == "supcon":
        if n_pos == 0 or n_neg == 0:
            return _zero(s)
        u = s / params[0]
        keep = pos | neg
        lse = torch.where(keep.any(dim=1), _masked_lse(u, keep), 0.0)
        npos = wp.sum(dim=1)
        rows = torch.where(npos > 0, lse - (wp * u).sum(dim=1) / npos.clamp_min(1), 0.0)
        active = rows > 0
        if not active.any():
            return _zero(s)
        return (rows * active).sum() / active.sum()
    if kind == "multi_similarity":
        alpha, beta, base = params
        rows = _log1p_sum_exp(alpha * (base - s), pos) / alpha + _log1p_sum_exp(beta * (s - base), neg) / beta
        return rows.mean()
    pos_margin, neg_margin = params
    z = 2.0 - 2.0 * s
    d = torch.where(z > 0, torch.where(z > 0, z, 1.0).sqrt(), 0.0)
    loss = _zero(s)
    for w, hinge in ((wp, torch.relu(d - pos_margin)), (wn, torch.relu(neg_margin - d))):
        active = (w * (hinge > 0)).sum()
        if active > 0:
            loss = loss + (w * hinge).sum() / active
    return loss

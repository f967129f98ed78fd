"""Proxy Anchor loss (Kim et al., CVPR 2020, as pytorch-metric-learning 2.9.0 computes it): the eager PyTorch
specification (``docs/spec.md``, "Proxy Anchor").

Shapes: ``x`` (B, D) float, ``labels`` (B,) int32/int64, ``proxies`` (C, D) (one proxy per class, rows),
``weights`` (B,) or None. With ``x̂ = x / max(‖x‖, 1e-12)``, ``p̂_j = p_j / max(‖p_j‖, 1e-12)``, the cosine
``c_ij = x̂_i · p̂_j``, margin δ, scale α and ``o_i = w_i − 1`` (PML's miner weights enter the exponents; without
mined tuples every ``w_i = 1``)::

    P_j = Σ_{i: y_i = j} exp(α(δ − c_ij) + o_i)        N_j = Σ_{i: y_i ≠ j} exp(α(c_ij + δ) + o_i)
    L   = (1/|C⁺|) Σ_j log(1 + P_j) + (1/C) Σ_j log(1 + N_j)

``C⁺`` is the set of classes present in the batch (PML divides the positive terms by their number and the
negative terms by all C; a class without positives has ``log(1 + 0) = 0``, an empty batch gives 0). Both
reductions are per *column* (per proxy, over the batch rows), the transpose of the softmax losses' per-row
log-sum-exp.

The gradient (what every backend computes, with ``G_ij = ∂L/∂c_ij``)::

    G_ij = −α exp(α(δ − c_ij) + o_i − log(1 + P_j)) / |C⁺|    if y_i = j
    G_ij = +α exp(α(c_ij + δ) + o_i − log(1 + N_j)) / C        otherwise
    ∂L/∂x̂_i = Σ_j G_ij p̂_j,    ∂L/∂p̂_j = Σ_i G_ij x̂_i,   then the normalisations' backward.

Sharding by class: a label outside ``[0, C)`` marks a row whose class lives on another slice (it has no positive
among these proxies and is a negative of every one); the divisors are then the global ``1/|C⁺|`` and ``1/C``,
passed in (``pos_scale``, ``neg_scale``). Computation dtype: float64 when x or the proxies are float64, else
float32.
"""
from __future__ import annotations

import torch

from .ccl import compute_dtype, normalize_rows


def present_classes(labels: torch.Tensor) -> torch.Tensor:
    """|C⁺|: the number of distinct labels (0-d int64 on the labels' device), from a sort of the B labels (no C-sized
    buffer, no host synchronisation)."""
    if labels.numel() == 0:
        return labels.new_zeros((), dtype=torch.int64)
    s = labels.reshape(-1).sort().values
    return (s[1:] != s[:-1]).sum() + 1


def positive_scale(labels: torch.Tensor) -> torch.Tensor:
    """``1 / max(|C⁺|, 1)`` as a 0-d float32 tensor on the labels' device."""
    return 1.0 / present_classes(labels).clamp_min(1).float()


def column_terms(x, labels, proxies, margin: float, alpha: float, weights=None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log(1 + P_j), log(1 + N_j))`` (C,) each, differentiable in ``x`` and ``proxies`` (module docstring)."""
    dtype = compute_dtype(x, proxies)
    cos = normalize_rows(x, dtype) @ normalize_rows(proxies, dtype).t()
    pos = labels.long()[:, None] == torch.arange(proxies.shape[0], device=labels.device)[None, :]
    offset = 0.0 if weights is None else (weights.to(dtype) - 1.0)[:, None]
    neg_inf = torch.tensor(float("-inf"), dtype=dtype, device=cos.device)
    z_pos = torch.where(pos, alpha * (margin - cos) + offset, neg_inf)
    z_neg = torch.where(pos, neg_inf, alpha * (cos + margin) + offset)
    one = torch.zeros(1, proxies.shape[0], dtype=dtype, device=cos.device)  # the "1 +" as a zero exponent
    return (torch.logsumexp(torch.cat([z_pos, one]), dim=0), torch.logsumexp(torch.cat([z_neg, one]), dim=0))


def proxy_anchor_loss(x, labels, proxies, margin: float = 0.1, alpha: float = 32.0, weights=None,
                      pos_scale=None, neg_scale: float | None = None) -> torch.Tensor:
    """The loss (0-d, float32 or float64), differentiable in ``x`` and ``proxies``. ``pos_scale`` (0-d tensor)
    and ``neg_scale`` default to ``1/|C⁺|`` of these labels and ``1/C``; a slice of a sharded set of proxies
    passes the global ones and gets its part of the loss."""
    pos, neg = column_terms(x, labels, proxies, margin, alpha, weights)
    scale_p = positive_scale(labels) if pos_scale is None else pos_scale
    scale_n = 1.0 / max(proxies.shape[0], 1) if neg_scale is None else neg_scale
    return pos.sum() * scale_p.to(pos.dtype) + neg.sum() * scale_n


def proxy_anchor_grads(x, labels, proxies, margin: float, alpha: float, weights, pos_scale, neg_scale: float,
                       grad_x: bool, grad_proxies: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, ∂loss/∂x or (0, D), ∂loss/∂proxies or (0, D))`` of :func:`proxy_anchor_loss`, detached (by
    autograd), for a slice of a class-sharded set of proxies (global ``pos_scale``, ``neg_scale``)."""
    x, proxies = x.detach().requires_grad_(grad_x), proxies.detach().requires_grad_(grad_proxies)
    with torch.enable_grad():
        loss = proxy_anchor_loss(x, labels, proxies, margin, alpha, weights, pos_scale, neg_scale)
        wanted = [t for t, want in ((x, grad_x), (proxies, grad_proxies)) if want]
        grads = list(torch.autograd.grad(loss, wanted)) if wanted else []
    gx = grads.pop(0) if grad_x else x.new_empty(0, x.shape[1], dtype=loss.dtype)
    gp = grads.pop(0) if grad_proxies else x.new_empty(0, x.shape[1], dtype=loss.dtype)
    return loss.detach(), gx, gp

"""Contrastive Bayesian Metric Learning loss: the eager PyTorch specification (``docs/spec.md``).

Shapes: queries ``x`` (B, D) with ``labels`` (B,); reference set R = [x̂ if ``include_self``] ++ [r̂ if ``ref``
is given], with labels ``y_r``. ``S_ij = x̂_i · R_j`` in fp32 (fp64 for fp64 input). For row i::

    P_i = {j : y_r[j] = y_i, j ≠ i (by index, self part only)}     N_i = {j : y_r[j] ≠ y_i}
    minP_i = min_{P_i} S_ij,  maxN_i = max_{N_i} S_ij               (ties: lowest index)
    μ_i = h·mean_{P_i} S_ij + (1 − h)·mean_{N_i} S_ij               (variance_center="class_means")
    μ_i = (1 − h)·mean_j S_ij + h·(minP_i + maxN_i)/2                (variance_center="boundary"; the row mean is
                                                                      over the whole row, diagonal included)

A reference entry with a negative label (an empty slot of a cross-batch memory) is in no set and not in the row
mean: the loss is that of the reference set without it. A pair mask (mined pairs) restricts P_i and N_i to the
listed pairs (and so the class means); the row mean is unchanged.
    σ_i    = Σ_{N_i} (S_ij − μ_i)²
    P̃_i = {j ∈ P_i : S_ij − margin < maxN_i}
    Ñ_i = {j ∈ N_i : S_ij + margin > minP_i}   (adaptive)   or the top_k largest S_ij of N_i (ties: lowest index)
    pos_i = φ(1 + Σ_{P̃_i} exp(−(S_ij − a_p)/b_p)),   neg_i = φ(1 + Σ_{Ñ_i} exp((S_ij − a_n)/b_n))   (log, sqrt)
    pos_i = 1 + w_p·Σ_{P̃_i} exp(−(S_ij − a_p)/b_p),   neg_i = 1 + w_n·Σ_{Ñ_i} exp((S_ij − a_n)/b_n)     (constant)
    L_i = pos_i + neg_i + w·σ_i,  and L_i = 0 when P_i, N_i, P̃_i or Ñ_i is empty
    L   = Σ_i L_i / B        (0 for an empty batch)

``log`` and ``sqrt`` are evaluated through ``u = log(1 + Σ exp(t))`` as a log-sum-exp (φ = u or exp(u/2)), which
cannot overflow for any hyper-parameters; ``constant`` is the plain sum (it overflows only where its value does).
Set membership uses forward values; gradients flow through S, including through μ_i (the class means, or the row
mean and the elements minP/maxN pick).
"""
from __future__ import annotations

import torch

from .ccl import compute_dtype, normalize_rows

PHIS = ("log", "sqrt", "constant")
VARIANCE_CENTERS = ("class_means", "boundary")


def _log1p_sum_exp(t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``log(1 + Σ_{mask} exp(t))`` per row, stable."""
    t = torch.where(mask, t, torch.full_like(t, float("-inf")))
    return torch.logsumexp(torch.cat([torch.zeros_like(t[:, :1]), t], dim=1), dim=1)


def pack_pairs(rows: torch.Tensor, cols: torch.Tensor, num_rows: int, num_cols: int) -> torch.Tensor:
    """The pair mask of the pairs ``(rows[k], cols[k])``: a (num_rows, ceil(num_cols / 8)) uint8 tensor whose bit
    ``j % 8`` of byte ``[i, j // 8]`` is set when pair (i, j) is listed (duplicates allowed). Built on the pairs'
    device from the pair list, without a dense (num_rows, num_cols) matrix."""
    words = -(-num_cols // 8)
    flat = torch.unique(rows.long() * num_cols + cols.long())  # each pair once, so that adding bits is an OR
    mask = torch.zeros(num_rows * words, dtype=torch.int32, device=rows.device)
    if flat.numel():
        i, j = flat // num_cols, flat % num_cols
        mask.index_put_((i * words + j // 8,), (1 << (j % 8)).int(), accumulate=True)
    return mask.view(num_rows, words).to(torch.uint8)


def unpack_pairs(mask: torch.Tensor, num_cols: int) -> torch.Tensor:
    """The (num_rows, num_cols) bool matrix of a :func:`pack_pairs` mask."""
    j = torch.arange(num_cols, device=mask.device)
    return ((mask[:, j // 8] >> (j % 8).to(torch.uint8)) & 1).bool()


def cbml_loss_rows(
    x: torch.Tensor,
    labels: torch.Tensor,
    ref: torch.Tensor | None = None,
    ref_labels: torch.Tensor | None = None,
    *,
    pair_mask: torch.Tensor | None = None,
    include_self: bool = True,
    pos_a: float = 0.5,
    pos_b: float = 0.5,
    neg_a: float = 1.0,
    neg_b: float = 0.01,
    margin: float = 0.1,
    variance_weight: float = 1.0,
    mean_weight: float = 0.2,
    phi: str = "log",
    top_k: int = 0,
    variance_center: str = "class_means",
    pos_weight: float = 0.25,
    neg_weight: float = 0.25,
) -> torch.Tensor:
    """Per-row CBML losses ``L_i`` (B,) (skipped rows are 0). ``top_k = 0`` selects adaptive negatives;
    ``variance_center`` ``"class_means"`` or ``"boundary"`` picks μ; ``pos_weight`` / ``neg_weight`` are used by
    ``phi="constant"`` only.

    ``pair_mask`` (:func:`pack_pairs` of mined pairs, over the reference set's columns): only the listed pairs can
    be positives or negatives (so the class means are over them too); the boundary form's row mean stays over
    every present reference."""
    if ref is not None and ref.shape[0] == 0:  # an empty memory is no memory
        ref, ref_labels = None, None
    if phi not in PHIS:
        raise ValueError(f"phi must be one of {PHIS}, got {phi!r}")
    if variance_center not in VARIANCE_CENTERS:
        raise ValueError(f"variance_center must be one of {VARIANCE_CENTERS}, got {variance_center!r}")
    dtype = compute_dtype(x, *([ref] if ref is not None else []))
    b = x.shape[0]
    xh = normalize_rows(x, dtype)
    parts, part_labels = [], []
    if include_self:
        parts.append(xh)
        part_labels.append(labels)
    if ref is not None:
        parts.append(normalize_rows(ref, dtype))
        part_labels.append(ref_labels)
    if not parts:
        raise ValueError("the reference set is empty: give ref_emb or set include_self=True")
    r = torch.cat(parts)
    y_r = torch.cat([t.long() for t in part_labels])
    n = r.shape[0]
    s = xh @ r.t()
    sd = s.detach()

    same = labels.long()[:, None] == y_r[None, :]
    self_mask = torch.zeros_like(same)
    if include_self:
        self_mask[:, :b] = torch.eye(b, dtype=torch.bool, device=x.device)
    present = (y_r >= 0)[None, :]  # a negative reference label marks an empty slot: in no set, not in the mean
    pos = same & ~self_mask & present
    neg = ~same & present
    if pair_mask is not None:
        allowed = unpack_pairs(pair_mask, n)
        pos, neg = pos & allowed, neg & allowed

    inf = torch.tensor(float("inf"), dtype=dtype, device=x.device)
    arg_min_p = torch.where(pos, sd, inf).argmin(dim=1, keepdim=True)  # first minimum: lowest index
    arg_max_n = torch.where(neg, sd, -inf).argmax(dim=1, keepdim=True)
    min_p = s.gather(1, arg_min_p)
    max_n = s.gather(1, arg_max_n)
    if variance_center == "class_means":
        def set_mean(m):
            return (s * m).sum(dim=1, keepdim=True) / m.sum(dim=1, keepdim=True).clamp_min(1)

        mean = mean_weight * set_mean(pos) + (1.0 - mean_weight) * set_mean(neg)
    else:
        row_mean = (s * present).sum(dim=1, keepdim=True) / present.sum().clamp_min(1)
        mean = (1.0 - mean_weight) * row_mean + mean_weight * (min_p + max_n) / 2
    sigma = ((s - mean) ** 2 * neg).sum(dim=1)

    hard_pos = pos & (sd - margin < max_n.detach())
    if top_k > 0:
        order = torch.where(neg, sd, -inf).sort(dim=1, descending=True, stable=True).indices[:, : min(top_k, n)]
        hard_neg = torch.zeros_like(neg).scatter(1, order, True) & neg
    else:
        hard_neg = neg & (sd + margin > min_p.detach())

    t_pos, t_neg = -(s - pos_a) / pos_b, (s - neg_a) / neg_b
    if phi == "constant":
        def weighted_sum(t, mask, w):
            return 1.0 + w * torch.where(mask, t, torch.full_like(t, float("-inf"))).exp().sum(dim=1)

        f_pos, f_neg = weighted_sum(t_pos, hard_pos, pos_weight), weighted_sum(t_neg, hard_neg, neg_weight)
    else:
        f_pos, f_neg = _log1p_sum_exp(t_pos, hard_pos), _log1p_sum_exp(t_neg, hard_neg)
        if phi == "sqrt":
            f_pos, f_neg = torch.exp(f_pos / 2), torch.exp(f_neg / 2)
    loss = f_pos + f_neg + variance_weight * sigma
    valid = pos.any(1) & neg.any(1) & hard_pos.any(1) & hard_neg.any(1)
    return torch.where(valid, loss, torch.zeros_like(loss))


def cbml_loss(x: torch.Tensor, labels: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """``Σ_i L_i / B`` as a 0-d tensor; 0 (still attached to ``x``) for an empty batch."""
    if x.shape[0] == 0:
        return x.sum(dtype=compute_dtype(x)) * 0.0
    return cbml_loss_rows(x, labels, *args, **kwargs).sum() / x.shape[0]

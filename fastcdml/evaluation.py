"""Retrieval metrics for class-disjoint evaluation: Recall@K, MAP@R and R-precision.

Definitions (those of deep-metric-learning papers and of pytorch-metric-learning's ``AccuracyCalculator``):

* Similarity is the cosine ``x̂_q · r̂_j`` of L2-normalised float32 rows; neighbours are ranked by decreasing
  similarity, **ties broken by the lower reference index** (exactly, whatever the device or chunking).
* Self mode (``reference=None``): the query set is the reference set and each query's own row is removed by
  index (not by value, so duplicate rows still count as neighbours).
* ``R_q`` = number of references with the query's label (minus its own row in self mode).
* Recall@K = fraction of queries with at least one same-label reference among their K nearest (a K larger than
  the number of references means all of them). Note: this is the DML "Recall@K", not precision@K.
* R-precision = mean over queries of ``#{same-label among the R_q nearest} / R_q``.
* MAP@R = mean over queries of ``(1/R_q) Σ_{i≤R_q} P(i)·rel(i)``, ``P(i)`` the precision of the first i
  neighbours and ``rel(i)`` whether the i-th neighbour has the query's label (Musgrave et al., "A Metric Learning
  Reality Check", 2020).
* Queries with ``R_q = 0`` (a class with a single sample in self mode, or absent from the reference set) are
  left out of every metric, as ``AccuracyCalculator`` does; ``"queries"`` in the result counts those evaluated.
  If none is left, every metric is NaN.

Memory: similarities are computed for ``chunk_size`` queries at a time on the embeddings' device, so the peak is
about ``20 · chunk_size · M`` bytes (float32 similarities and int64 ranking keys; e.g. 300 MB for SOP's 60,502
references at the default 256), plus a top-k of ``max(max K, max_q R_q)`` columns, never ``N × M``.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

DEFAULT_KS = (1, 2, 4, 8)
EPS = 1e-12


def _normalize(x: torch.Tensor) -> torch.Tensor:
    x = x.float()
    return x / x.norm(dim=1, keepdim=True).clamp_min(EPS)


def _rank_keys(sim: torch.Tensor) -> torch.Tensor:
    """int64 keys whose descending order is (similarity descending, column index ascending), exactly.

    The float32 bits become an order-preserving integer (negative floats: flip all bits but the sign) in the
    high 32 bits; the low 32 bits hold ``2³² − 1 − column`` so that equal similarities favour lower columns.
    """
    key = (sim + 0.0).view(torch.int32).to(torch.int64)  # + 0.0 turns -0.0 into +0.0
    key ^= (key >> 31) & 0x7FFFFFFF
    key <<= 32
    key |= 0xFFFFFFFF - torch.arange(sim.shape[1], device=sim.device, dtype=torch.int64)
    return key


def _nearest(sim: torch.Tensor, k: int) -> torch.Tensor:
    """Column indices (rows, k) of the k largest ``sim`` per row, ordered by (similarity desc, index asc).

    A float top-k, then the tie rule: within the selection by two stable sorts; rows where a tie straddles the
    k-th place (more than k values ≥ the k-th) are redone exactly with :func:`_rank_keys`.
    """
    vals, idx = sim.topk(k, dim=1)
    straddle = ((sim >= vals[:, -1:]).sum(dim=1) > k).nonzero().squeeze(1)
    if straddle.numel():
        idx[straddle] = _rank_keys(sim[straddle]).topk(k, dim=1).indices
        vals[straddle] = sim[straddle].gather(1, idx[straddle])
    by_index = idx.argsort(dim=1)
    idx, vals = idx.gather(1, by_index), vals.gather(1, by_index)
    return idx.gather(1, vals.argsort(dim=1, descending=True, stable=True))


def retrieval_metrics(
    query: torch.Tensor,
    query_labels: torch.Tensor,
    reference: torch.Tensor | None = None,
    reference_labels: torch.Tensor | None = None,
    ks: Sequence[int] = DEFAULT_KS,
    chunk_size: int = 256,
) -> dict[str, float]:
    """Recall@K for each K in ``ks``, MAP@R and R-precision of ``query`` (N, D) against ``reference`` (M, D).

    ``query_labels`` (N,) and ``reference_labels`` (M,) are integer tensors; ``reference=None`` means self mode
    (the query set is the reference set, own row excluded). Any float dtype; computed in float32 on
    ``query.device``. Returns ``{"R@1": …, "R@2": …, "MAP@R": …, "R-precision": …, "queries": n_evaluated}``
    with metrics as Python floats in [0, 1]. See the module docstring for the exact rules.
    """
    self_mode = reference is None
    if self_mode != (reference_labels is None):
        raise ValueError("reference and reference_labels must be given together")
    if self_mode:
        reference, reference_labels = query, query_labels
    if query.dim() != 2 or reference.dim() != 2 or query.shape[1] != reference.shape[1]:
        raise ValueError(f"query and reference must be (N, D) and (M, D), got {tuple(query.shape)}, "
                         f"{tuple(reference.shape)}")
    if query_labels.shape != query.shape[:1] or reference_labels.shape != reference.shape[:1]:
        raise ValueError("labels must be 1-D with one entry per embedding row")
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive integers, got {ks}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    device = query.device
    q, r = _normalize(query), _normalize(reference.to(device))
    if not (torch.isfinite(q).all() and torch.isfinite(r).all()):
        raise ValueError("embeddings contain NaN or inf")
    ql, rl = query_labels.to(device).long(), reference_labels.to(device).long()

    relevant = torch.zeros_like(ql)  # R_q
    if rl.numel():
        classes, counts = torch.unique(rl, return_counts=True)
        pos = torch.searchsorted(classes, ql).clamp_max(len(classes) - 1)
        relevant = torch.where(classes[pos] == ql, counts[pos] - int(self_mode), 0)
    keep = relevant > 0
    n_refs = r.shape[0] - int(self_mode)
    k_max = min(n_refs, max(max(ks), int(relevant.max()) if keep.any() else 0))

    sums = {f"R@{k}": 0.0 for k in ks} | {"MAP@R": 0.0, "R-precision": 0.0}
    rank = torch.arange(1, k_max + 1, device=device)
    for start in range(0, q.shape[0], chunk_size):
        rows = torch.arange(start, min(start + chunk_size, q.shape[0]), device=device)
        rows = rows[keep[rows]]
        if rows.numel() == 0:
            continue
        sim = q[rows] @ r.T
        if self_mode:
            sim[torch.arange(len(rows), device=device), rows] = -torch.inf
        hit = rl[_nearest(sim, k_max)] == ql[rows, None]  # (chunk, k_max)
        for k in ks:
            sums[f"R@{k}"] += hit[:, :k].any(dim=1).sum().item()
        big_r = relevant[rows, None]
        rel = hit & (rank <= big_r)
        precision = rel.cumsum(dim=1, dtype=torch.float64) / rank
        sums["MAP@R"] += ((precision * rel).sum(dim=1) / big_r[:, 0]).sum().item()
        sums["R-precision"] += (rel.sum(dim=1, dtype=torch.float64) / big_r[:, 0]).sum().item()
    n = int(keep.sum())
    result = {name: (total / n if n else float("nan")) for name, total in sums.items()}
    result["queries"] = n
    return result


@torch.no_grad()
def compute_embeddings(
    model: torch.nn.Module,
    data: torch.Tensor | Iterable,
    batch_size: int = 256,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Embeddings of ``data`` by ``model`` in eval mode (restored afterwards), no gradient.

    ``data`` is an (N, ...) input tensor (returns ``(embeddings, None)``) or an iterable of ``(inputs, labels)``
    batches such as a DataLoader (returns ``(embeddings, labels)``). Inputs are moved to ``device`` (default: the
    model's); embeddings are returned float32 on that device.
    """
    if device is None:
        device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        if isinstance(data, torch.Tensor):
            outs = [model(data[i:i + batch_size].to(device)).float() for i in range(0, len(data), batch_size)]
            return torch.cat(outs), None
        outs, labels = [], []
        for inputs, y in data:
            outs.append(model(inputs.to(device)).float())
            labels.append(torch.as_tensor(y))
        return torch.cat(outs), torch.cat(labels).to(device)
    finally:
        model.train(was_training)

"""Pseudo labels for the pseudo-supervised setting: spherical k-means on the embeddings' device.

:func:`pseudo_labels` clusters L2-normalised embeddings by cosine similarity (spherical k-means) from a k-means++
start and returns the cluster ids as labels for a metric-learning loss (``examples/pseudo_supervised.py``). Every
pass over the embeddings runs in row chunks, so that no more than ``chunk_size × num_clusters`` similarities (and
as many one-hot entries) exist at once: 10⁶ × 512 embeddings with k = 10⁴ cluster in a few GiB of GPU memory.
"""
from __future__ import annotations

import math

import torch

from ._checks import _assert, tensor

# Elements of one chunk × k block (similarities, or the one-hot assignment) or chunk × D block (the chunk's
# normalised rows): 2^26 fp32 values = 256 MiB.
_BLOCK_ELEMENTS = 1 << 26
_SEED_SAMPLE_PER_CLUSTER = 16  # k-means++ runs on a random sample of at most 16 rows per cluster
_SEEDINGS = 3  # k-means++ seedings of the sample; the one with the lowest total squared distance is kept


def pseudo_labels(
    embeddings: torch.Tensor,
    num_clusters: int,
    *,
    seed: int = 0,
    iters: int = 20,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Spherical k-means cluster ids of ``embeddings`` (N, D) float: an int64 tensor (N,) in ``[0, num_clusters)``
    on the embeddings' device.

    Rows are L2-normalised (in fp32); a row joins the centre of largest cosine (ties: the lowest centre index);
    a centre is the normalised sum of its rows (a centre that loses every row keeps its place). The start is
    greedy k-means++ (each next centre the best of a few drawn with probability ∝ ``‖x̂ − nearest centre‖² =
    2 − 2·cos``), three times on a random sample of ``min(N, 16·num_clusters)`` rows, keeping the seeding of the
    lowest total squared distance; then at most ``iters`` Lloyd iterations, stopping early when
    no label changes. Every pass runs over chunks of ``chunk_size`` rows (default: ``2²⁶ // max(num_clusters, D)``),
    so at most ``chunk_size × num_clusters`` similarities are held at once; sums are one-hot products in a fixed
    order (no float atomics), so the result is the same on every call with the same ``seed`` on the same device
    (another ``chunk_size``, dtype or device can round differently, and so change a near-tie).
    """
    tensor(embeddings, "embeddings")
    if embeddings.dim() != 2:
        raise ValueError(f"embeddings must be 2-D (N, D), got shape {tuple(embeddings.shape)}")
    if not embeddings.is_floating_point():
        raise TypeError(f"embeddings must be a floating-point tensor, got {embeddings.dtype}")
    n = embeddings.shape[0]
    for value, name in ((num_clusters, "num_clusters"), (iters, "iters"), (seed, "seed")):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not 1 <= num_clusters <= n:
        raise ValueError(f"num_clusters must be in [1, N = {n}] (the number of embeddings), got {num_clusters}")
    if iters < 0:
        raise ValueError(f"iters must be >= 0, got {iters}")
    if chunk_size is None:
        chunk_size = max(1, _BLOCK_ELEMENTS // max(num_clusters, embeddings.shape[1]))
    elif isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    if embeddings.shape[1] == 0:
        raise ValueError("embeddings must have at least one column")
    _assert(torch.isfinite(embeddings).all(), "embeddings contains NaN or inf")

    with torch.no_grad():
        gen = torch.Generator(device=embeddings.device).manual_seed(seed)
        centers = _kmeans_pp(embeddings, num_clusters, gen)
        labels, sums, counts = _assign(embeddings, centers, chunk_size)
        for _ in range(iters):
            centers = torch.where(counts[:, None] > 0, _normalize(sums), centers)
            new, sums, counts = _assign(embeddings, centers, chunk_size)
            done = torch.equal(new, labels)
            labels = new
            if done:
                break
    return labels


def _normalize(x: torch.Tensor) -> torch.Tensor:
    return x.float() / x.float().norm(dim=1, keepdim=True).clamp_min(1e-12)


def _kmeans_pp(x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """(k, D) fp32 unit centres: the best of ``_SEEDINGS`` k-means++ seedings of a random sample of the rows (one
    seeding can leave two tight clusters with one centre, which Lloyd iterations do not repair)."""
    n, dev = x.shape[0], x.device
    m = min(n, _SEED_SAMPLE_PER_CLUSTER * k)
    sample = x if m == n else x[torch.randperm(n, generator=gen, device=dev)[:m]]
    sample = _normalize(sample)
    seedings = [_seeding(sample, k, gen) for _ in range(_SEEDINGS)]
    best = torch.stack([potential for _, potential in seedings]).argmin().view(1)
    return torch.stack([centers for centers, _ in seedings]).index_select(0, best)[0]


def _seeding(sample: torch.Tensor, k: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy k-means++ on the unit rows ``sample`` (m, D): each step draws ``2 + ⌊ln k⌋`` candidates ∝ the
    squared distance to the nearest centre and keeps the one that lowers the total most (as scikit-learn does).
    Returns the (k, D) centres and their total squared distance, without host synchronisation."""
    m, dev = sample.shape[0], sample.device
    trials = 2 + int(math.log(k))
    centers = torch.empty(k, sample.shape[1], dtype=torch.float32, device=dev)
    first = torch.randint(0, m, (1,), generator=gen, device=dev)
    centers[0] = sample.index_select(0, first)[0]  # tensor indices throughout: no host synchronisation
    d2 = (2.0 - 2.0 * (sample @ centers[0])).clamp_min(0.0)
    for c in range(1, k):
        cum = d2.double().cumsum(0)
        u = torch.rand((trials,), generator=gen, device=dev, dtype=torch.float64) * cum[-1]
        picks = torch.searchsorted(cum, u, right=True).clamp_max(m - 1)
        cand = torch.minimum(d2[:, None], (2.0 - 2.0 * (sample @ sample[picks].t())).clamp_min(0.0))  # (m, trials)
        best = cand.sum(dim=0).argmin().view(1)
        centers[c] = sample.index_select(0, picks.index_select(0, best))[0]
        d2 = cand.index_select(1, best)[:, 0]
    return centers, d2.sum()


def _assign(x: torch.Tensor, centers: torch.Tensor, chunk: int):
    """Labels (N,) int64 of the nearest centres and, per centre, the sum (k, D) fp32 and count (k,) of its rows."""
    k = centers.shape[0]
    labels = torch.empty(x.shape[0], dtype=torch.int64, device=x.device)
    sums = torch.zeros_like(centers)
    counts = torch.zeros(k, dtype=torch.int64, device=x.device)
    ids = torch.arange(k, device=x.device)
    for i in range(0, x.shape[0], chunk):
        xc = _normalize(x[i:i + chunk])
        lc = (xc @ centers.t()).argmax(dim=1)  # the first maximum: the lowest centre index
        labels[i:i + chunk] = lc
        onehot = (lc[:, None] == ids[None, :]).float()
        sums += onehot.t() @ xc
        counts += torch.bincount(lc, minlength=k)
    return labels, sums, counts

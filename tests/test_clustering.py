"""fastcdml.pseudo_labels: spherical k-means recovers well-separated clusters, repeats for a seed, holds at most
a chunk × k block of similarities, and rejects bad arguments by name."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastcdml


def adjusted_rand_index(a: torch.Tensor, b: torch.Tensor) -> float:
    """Hubert and Arabie's adjusted Rand index of two labelings."""
    _, ia = a.unique(return_inverse=True)
    _, ib = b.unique(return_inverse=True)
    table = torch.zeros(int(ia.max()) + 1, int(ib.max()) + 1, dtype=torch.float64)
    table.index_put_((ia, ib), torch.ones(len(a), dtype=torch.float64), accumulate=True)

    def pairs(t):
        return (t * (t - 1) / 2).sum()

    index, rows, cols, total = pairs(table), pairs(table.sum(1)), pairs(table.sum(0)), len(a) * (len(a) - 1) / 2
    expected = rows * cols / total
    return float((index - expected) / ((rows + cols) / 2 - expected))


def blobs(k, d, per, seed, noise=0.3):
    """k unit directions (random in d dimensions) with ``per`` rows each, noise of norm ~``noise`` around them,
    rows scaled at random (the clustering is by direction)."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.nn.functional.normalize(torch.randn(k, d, generator=g, dtype=torch.float64), dim=1)
    labels = torch.arange(k).repeat_interleave(per)
    x = centers[labels] + noise / d**0.5 * torch.randn(k * per, d, generator=g, dtype=torch.float64)
    x = x * (0.5 + torch.rand(k * per, 1, generator=g, dtype=torch.float64))
    perm = torch.randperm(k * per, generator=g)
    return x[perm].float(), labels[perm]


def test_adjusted_rand_index_helper():
    a = torch.tensor([0, 0, 1, 1, 2, 2])
    assert adjusted_rand_index(a, a) == pytest.approx(1.0)
    assert adjusted_rand_index(a, torch.tensor([5, 5, 3, 3, 9, 9])) == pytest.approx(1.0)
    assert adjusted_rand_index(a, torch.tensor([0, 1, 0, 1, 0, 1])) < 0.1


@pytest.mark.parametrize("k, d, per", [(20, 32, 100), (50, 64, 40)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recovers_well_separated_clusters(k, d, per, seed):
    x, truth = blobs(k, d, per, seed)
    labels = fastcdml.pseudo_labels(x, k, seed=seed)
    assert labels.dtype == torch.int64 and labels.shape == truth.shape and labels.device == x.device
    assert 0 <= int(labels.min()) and int(labels.max()) < k
    assert adjusted_rand_index(labels, truth) >= 0.95


def test_repeatable_for_a_seed_and_chunking():
    x, _ = blobs(15, 16, 40, 3, noise=1.0)  # overlapping clusters: many near-ties, so a difference would show
    first = fastcdml.pseudo_labels(x, 15, seed=7)
    assert torch.equal(first, fastcdml.pseudo_labels(x, 15, seed=7))
    assert torch.equal(first, fastcdml.pseudo_labels(x, 15, seed=7, chunk_size=37))
    assert not torch.equal(first, fastcdml.pseudo_labels(x, 15, seed=8))


class _LargestOutput(TorchDispatchMode):
    """Records the largest number of elements of any tensor an operator returns."""

    largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_memory_is_bounded_by_a_chunk_times_k():
    """N × k similarities would be 160,000 elements here; no tensor may be larger than a chunk × k block, the
    input's size or the seeding sample (16 rows per cluster)."""
    n, d, k, chunk = 4000, 8, 40, 64
    x, _ = blobs(k, d, n // k, 0)
    with _LargestOutput() as mode:
        fastcdml.pseudo_labels(x, k, chunk_size=chunk, iters=3)
    assert mode.largest <= max(chunk * k, n * d, 16 * k * d) < n * k // 4


def test_degenerate_but_valid_inputs():
    x = torch.randn(5, 3, dtype=torch.float64)
    assert fastcdml.pseudo_labels(x, 1).tolist() == [0] * 5
    labels = fastcdml.pseudo_labels(x, 5, iters=0)
    assert sorted(labels.tolist()) == [0, 1, 2, 3, 4]  # every row is its own centre
    same = fastcdml.pseudo_labels(torch.ones(6, 4), 3)  # identical rows: any valid labeling, no NaN
    assert same.min() >= 0 and same.max() < 3


@pytest.mark.parametrize("args, kwargs, err, match", [
    ((torch.randn(4),), dict(num_clusters=2), ValueError, "embeddings must be 2-D"),
    ((torch.zeros(4, 3, dtype=torch.long),), dict(num_clusters=2), TypeError, "embeddings must be a floating"),
    ((torch.randn(4, 3),), dict(num_clusters=5), ValueError, r"num_clusters must be in \[1, N = 4\]"),
    ((torch.randn(4, 3),), dict(num_clusters=0), ValueError, "num_clusters must be in"),
    ((torch.randn(4, 3),), dict(num_clusters=2.0), TypeError, "num_clusters must be an int"),
    ((torch.randn(4, 3),), dict(num_clusters=2, iters=-1), ValueError, "iters must be >= 0"),
    ((torch.randn(4, 3),), dict(num_clusters=2, chunk_size=0), ValueError, "chunk_size must be an int >= 1"),
    ((torch.full((4, 3), float("nan")),), dict(num_clusters=2), ValueError, "embeddings contains NaN or inf"),
    (([[1.0, 2.0]],), dict(num_clusters=1), TypeError, "embeddings must be a torch.Tensor"),
])
def test_bad_arguments_are_named(args, kwargs, err, match):
    with pytest.raises(err, match=match):
        fastcdml.pseudo_labels(*args, **kwargs)

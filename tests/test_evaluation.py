"""fastcdml.evaluation against a brute-force float64 ranking and, where installed, pytorch-metric-learning."""
from __future__ import annotations

import math

import pytest
import torch

from fastcdml.evaluation import _nearest, compute_embeddings, retrieval_metrics

KS = (1, 2, 4, 8)


def brute_force(q, ql, r=None, rl=None, ks=KS):
    """The definitions written out query by query: full similarity rows, stable sort (ties → lower index)."""
    self_mode = r is None
    if self_mode:
        r, rl = q, ql
    qn = q.double() / q.double().norm(dim=1, keepdim=True)
    rn = r.double() / r.double().norm(dim=1, keepdim=True)
    sums = {f"R@{k}": 0.0 for k in ks} | {"MAP@R": 0.0, "R-precision": 0.0}
    n = 0
    for i in range(len(q)):
        cols = [j for j in range(len(r)) if not (self_mode and j == i)]
        sim = (rn[cols] @ qn[i]).tolist()
        order = sorted(range(len(cols)), key=lambda c: -sim[c])  # Python's sort is stable
        labels = [int(rl[cols[c]]) for c in order]
        hits = [lab == int(ql[i]) for lab in labels]
        big_r = sum(hits)
        if big_r == 0:
            continue
        n += 1
        for k in ks:
            sums[f"R@{k}"] += any(hits[:k])
        correct, ap = 0, 0.0
        for rank, hit in enumerate(hits[:big_r], start=1):
            correct += hit
            ap += correct / rank if hit else 0.0
        sums["MAP@R"] += ap / big_r
        sums["R-precision"] += correct / big_r
    return {k: v / n for k, v in sums.items()} | {"queries": n}


def check(actual, expected):
    assert actual["queries"] == expected["queries"]
    for key, value in expected.items():
        assert actual[key] == pytest.approx(value, abs=1e-12), key


@pytest.mark.parametrize("n, d, classes, chunk", [(1, 3, 1, 4), (37, 5, 4, 7), (64, 16, 9, 1), (101, 8, 13, 1000)])
def test_self_mode_matches_brute_force(n, d, classes, chunk):
    q = torch.randn(n, d)
    ql = torch.randint(0, classes, (n,))
    ql[: min(n, 2)] = classes  # include a class with one or two samples (a singleton is left out)
    result = retrieval_metrics(q, ql, chunk_size=chunk)
    if n == 1:  # the only query has no other reference: nothing to evaluate
        assert result["queries"] == 0 and math.isnan(result["R@1"])
    else:
        check(result, brute_force(q, ql))


@pytest.mark.parametrize("n, m, chunk", [(23, 41, 5), (50, 7, 64)])
def test_query_reference_mode_matches_brute_force(n, m, chunk):
    q, r = torch.randn(n, 6, dtype=torch.float64), torch.randn(m, 6)
    ql, rl = torch.randint(0, 6, (n,)), torch.randint(0, 5, (m,))  # label 5 is absent from the references
    expected = brute_force(q, ql, r, rl)
    check(retrieval_metrics(q, ql, r, rl, chunk_size=chunk), expected)
    assert expected["queries"] < n or not (ql == 5).any()


def test_ties_break_toward_lower_index_and_self_is_excluded_by_index():
    # One-hot rows: every similarity is exactly 0 or 1, so rankings are decided by the tie rule alone.
    basis = torch.eye(3)
    q = basis[torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])]
    ql = torch.tensor([0, 1, 0, 1, 0, 2, 2, 1])
    for chunk in (1, 3, 100):
        check(retrieval_metrics(q, ql, chunk_size=chunk), brute_force(q, ql))
    # Five identical rows labelled 0 0 1 1 1: with the lower-index rule queries 0 and 1 hit (rows 1 and 0), 2–4
    # miss (row 0); the higher-index rule would give 3/5.
    same = retrieval_metrics(torch.ones(5, 2), torch.tensor([0, 0, 1, 1, 1]), ks=(1,))
    assert same["R@1"] == pytest.approx(2 / 5)


def test_duplicates_of_the_query_still_count_as_neighbours():
    q = torch.ones(4, 2)
    result = retrieval_metrics(q, torch.zeros(4, dtype=torch.long))
    assert result == {"R@1": 1.0, "R@2": 1.0, "R@4": 1.0, "R@8": 1.0, "MAP@R": 1.0, "R-precision": 1.0, "queries": 4}


def test_bad_inputs_raise():
    x, y = torch.randn(5, 3), torch.zeros(5, dtype=torch.long)
    with pytest.raises(ValueError, match="together"):
        retrieval_metrics(x, y, x)
    with pytest.raises(ValueError, match="NaN"):
        retrieval_metrics(torch.full((5, 3), float("nan")), y)
    with pytest.raises(ValueError, match="ks"):
        retrieval_metrics(x, y, ks=(0,))


@pytest.mark.parametrize("self_mode", [True, False])
def test_matches_pytorch_metric_learning(self_mode):
    pytest.importorskip("sklearn")
    pml = pytest.importorskip("pytorch_metric_learning")
    from pytorch_metric_learning.distances import CosineSimilarity
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
    from pytorch_metric_learning.utils.inference import CustomKNN

    q, ql = torch.randn(300, 12), torch.randint(0, 20, (300,))
    r, rl = (None, None) if self_mode else (torch.randn(200, 12), torch.randint(0, 20, (200,)))
    calc = AccuracyCalculator(include=("precision_at_1", "mean_average_precision_at_r", "r_precision"),
                              k="max_bin_count", device=torch.device("cpu"), knn_func=CustomKNN(CosineSimilarity()))
    theirs = calc.get_accuracy(q, ql, r, rl, ref_includes_query=False) if not self_mode else calc.get_accuracy(q, ql)
    ours = retrieval_metrics(q, ql, r, rl, chunk_size=64)
    assert ours["R@1"] == pytest.approx(theirs["precision_at_1"], abs=1e-9), pml.__version__
    assert ours["MAP@R"] == pytest.approx(theirs["mean_average_precision_at_r"], abs=1e-9)
    assert ours["R-precision"] == pytest.approx(theirs["r_precision"], abs=1e-9)


def test_compute_embeddings_from_tensor_and_loader_restores_mode():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Dropout(0.5))
    x, y = torch.randn(10, 4), torch.arange(10)
    emb, none = compute_embeddings(model, x, batch_size=3)
    assert none is None and model.training
    torch.testing.assert_close(emb, model[0](x).detach())  # eval mode: dropout off
    loader = [(x[:6], y[:6]), (x[6:], y[6:])]
    emb2, labels = compute_embeddings(model, loader)
    torch.testing.assert_close(emb2, emb)
    assert labels.tolist() == list(range(10))


def test_nearest_follows_the_tie_rule_exactly():
    sim = torch.randint(-3, 4, (50, 40)).float() / 4  # seven levels: ties everywhere, also across the k-th place
    sim[0, 5] = -0.0
    for k in (1, 5, 17, 40):
        expected = torch.sort(sim, dim=1, descending=True, stable=True).indices[:, :k]
        assert torch.equal(_nearest(sim, k), expected), k

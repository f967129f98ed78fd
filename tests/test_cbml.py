"""Contrastive Bayesian loss: reference vs the naive spec, every backend vs the float64 reference, the
cross-batch memory and input validation."""
import pytest
import torch

import fastcdml
from fastcdml.functional import contrastive_bayesian_loss
from fastcdml.reference import cbml_loss, cbml_loss_rows
from fastcdml.reference.cbml import pack_pairs

from . import cbml_authors as authors
from .helpers import DTYPES, assert_close, clustered_labels, kernel_backends, rel_err
from .naive import cbml_rows

DEFAULTS = dict(pos_a=0.5, pos_b=0.5, neg_a=1.0, neg_b=0.01, margin=0.1, variance_weight=1.0, mean_weight=0.2)
# The paper's b_n = 0.01 makes the negative term vanish for random embeddings; these settings exercise every term.
LIVELY = dict(pos_a=0.3, pos_b=0.4, neg_a=0.2, neg_b=0.3, margin=0.6, variance_weight=0.5, mean_weight=0.3)
MODES = ["self", "memory", "explicit"]


def make(b, m, d, mode, dtype=torch.float64, device="cpu"):
    x = torch.randn(b, d, dtype=torch.float64).to(dtype=dtype, device=device)
    labels = clustered_labels(b).to(device)
    if mode == "self":
        return x, labels, None, None
    ref = torch.randn(m, d, dtype=torch.float64).to(dtype=dtype, device=device)
    return x, labels, ref, torch.randint(0, int(labels.max()) + 2, (m,), device=device)


def naive(x, y, ref, ref_y, mode, hyper, phi, top_k, center="class_means", weights=(0.25, 0.25)):
    h = hyper
    return cbml_rows(x, y, ref, ref_y, mode != "explicit", h["pos_a"], h["pos_b"], h["neg_a"], h["neg_b"],
                     h["margin"], h["variance_weight"], h["mean_weight"], phi, top_k, center=center, w_p=weights[0],
                     w_n=weights[1])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("phi", ["log", "sqrt", "constant"])
@pytest.mark.parametrize("top_k", [0, 3, 1000])
@pytest.mark.parametrize("center", ["class_means", "boundary"])
@pytest.mark.parametrize("hyper", [DEFAULTS, LIVELY], ids=["authors", "lively"])
def test_reference_matches_naive_spec(mode, phi, top_k, center, hyper):
    x, y, ref, ref_y = make(17, 23, 9, mode)
    rows = cbml_loss_rows(x, y, ref, ref_y, include_self=mode != "explicit", phi=phi, top_k=top_k,
                          variance_center=center, pos_weight=0.7, neg_weight=0.4, **hyper)
    torch.testing.assert_close(rows, naive(x, y, ref, ref_y, mode, hyper, phi, top_k, center, (0.7, 0.4)))


def test_reference_skips_rows_without_positives_or_negatives():
    x = torch.randn(5, 4, dtype=torch.float64)
    same_class = cbml_loss_rows(x, torch.zeros(5, dtype=torch.long), **LIVELY)  # no negatives anywhere
    assert torch.equal(same_class, torch.zeros(5, dtype=torch.float64))
    rows = cbml_loss_rows(x, torch.tensor([0, 0, 1, 1, 2]), **LIVELY)  # row 4 has no positive
    assert rows[4] == 0 and (rows[:4] != 0).all()
    torch.testing.assert_close(cbml_loss(x, torch.tensor([0, 0, 1, 1, 2]), **LIVELY), rows.sum() / 5)


def test_reference_ties_pick_lowest_index():
    x = torch.randn(3, 4, dtype=torch.float64)
    x = torch.cat([x, x, x])  # every similarity appears three times
    y = torch.tensor([0, 1, 2] * 3)
    rows = cbml_loss_rows(x, y, top_k=2, **LIVELY)
    torch.testing.assert_close(rows, naive(x, y, None, None, "self", LIVELY, "log", 2))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("top_k", [0, 4])
@pytest.mark.parametrize("center, phi", [("class_means", "sqrt"), ("boundary", "constant")])
def test_reference_gradcheck(mode, top_k, center, phi):
    x, y, ref, ref_y = make(9, 7, 5, mode)
    x.requires_grad_()
    inputs = (x,) if ref is None else (x, ref.requires_grad_())

    def f(*t):
        return cbml_loss(t[0], y, t[1] if len(t) > 1 else None, ref_y, include_self=mode != "explicit",
                         top_k=top_k, phi=phi, variance_center=center, **LIVELY)

    assert torch.autograd.gradcheck(f, inputs)


# --- every backend against the float64 reference -------------------------------------------------------------------

BACKENDS = kernel_backends("cbml", torch.device("cuda" if torch.cuda.is_available() else "cpu"))


@pytest.mark.skipif(not BACKENDS, reason="no kernel backend for CBML in this process")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("negatives, center, phi", [("adaptive", "class_means", "log"), ("topk", "boundary", "constant")])
def test_backend_matches_reference(backend, dtype, mode, negatives, center, phi, device):
    x, y, ref, ref_y = make(21, 40, 24, mode, dtype, device)
    x.requires_grad_()
    inputs = [x] if ref is None else [x, ref.requires_grad_()]
    kwargs = dict(include_self=mode != "explicit", negatives=negatives, top_k=5, variance_center=center, phi=phi,
                  **LIVELY)
    out = contrastive_bayesian_loss(x, y, ref, ref_y, backend=backend, **kwargs)
    grads = torch.autograd.grad(out, inputs)

    def reference_in(dt):
        t = [v.detach().to(dt).requires_grad_() for v in inputs]
        loss = contrastive_bayesian_loss(t[0], y, t[1] if ref is not None else None, ref_y, backend="reference",
                                         **kwargs)
        return loss, torch.autograd.grad(loss, t)

    (l64, g64), (llo, glo) = reference_in(torch.float64), reference_in(dtype)
    assert out.dtype == torch.float32
    assert_close(out, l64, llo, dtype, f"{backend} {mode} loss")
    for got, e64, elo, name in zip(grads, g64, glo, ("x", "ref")):
        assert got.dtype == dtype
        assert_close(got, e64, elo, dtype, f"{backend} {mode} grad {name}")


# --- module: cross-batch memory ------------------------------------------------------------------------------------

@pytest.fixture(params=["auto", "reference"])
def module_backend(request):
    return request.param


def test_memory_fifo_semantics(module_backend):
    loss_fn = fastcdml.ContrastiveBayesianLoss(memory_size=10, backend=module_backend, **LIVELY)
    batches = [(torch.randn(6, 8), clustered_labels(6, 2, 3)) for _ in range(3)]
    seen_x, seen_y = [], []
    for x, y in batches:
        expected = contrastive_bayesian_loss(
            x, y, torch.cat(seen_x)[-10:] if seen_x else None, torch.cat(seen_y)[-10:] if seen_y else None,
            include_self=True, backend="reference", **LIVELY)
        xr = x.clone().requires_grad_()
        loss = loss_fn(xr, y)
        loss.backward()  # the memory is overwritten after the forward; backward must still be right
        torch.testing.assert_close(loss, expected.float(), atol=1e-5, rtol=1e-5)
        seen_x.append(torch.nn.functional.normalize(x, dim=1))
        seen_y.append(y)
    assert loss_fn.memory_filled == 10 and loss_fn.memory_ptr == 18 % 10
    stored = {tuple(r.tolist()) for r in loss_fn.memory_emb}
    assert stored == {tuple(r.tolist()) for r in torch.cat(seen_x)[-10:]}


def test_memory_not_filled_in_eval_and_state_round_trip():
    loss_fn = fastcdml.ContrastiveBayesianLoss(memory_size=8)
    x, y = torch.randn(5, 4), torch.tensor([0, 0, 1, 1, 2])
    loss_fn.eval()(x, y)
    assert loss_fn.memory_filled == 0
    loss_fn.train()(x, y)
    restored = fastcdml.ContrastiveBayesianLoss(memory_size=8)
    restored.load_state_dict(loss_fn.state_dict())
    assert restored.memory_filled == 5 and restored.memory_ptr == 5
    assert torch.equal(restored.memory_emb, loss_fn.memory_emb)
    torch.testing.assert_close(restored(x, y), loss_fn(x, y))
    restored.reset_memory()
    assert restored.memory_filled == 0


def test_empty_batch():
    loss_fn = fastcdml.ContrastiveBayesianLoss()
    empty = loss_fn(torch.zeros(0, 4, requires_grad=True), torch.zeros(0, dtype=torch.long))
    assert empty.item() == 0.0 and empty.requires_grad


BAD = [
    (dict(embeddings=torch.randn(4)), ValueError, "embeddings must be 2-D"),
    (dict(labels=torch.zeros(3, dtype=torch.long)), ValueError, r"labels must have shape \(4,\)"),
    (dict(labels=torch.zeros(4)), TypeError, "labels must be int64 or int32"),
    (dict(embeddings=torch.full((4, 3), float("nan"))), ValueError, "embeddings contains NaN"),
    (dict(ref_emb=torch.randn(5, 2), ref_labels=torch.zeros(5, dtype=torch.long)), ValueError,
     "ref_emb has dimension 2"),
    (dict(ref_emb=torch.randn(5, 3)), ValueError, "ref_emb and ref_labels must be given together"),
    (dict(ref_emb=torch.randn(5, 3), ref_labels=torch.zeros(4, dtype=torch.long)), ValueError,
     r"ref_labels must have shape \(5,\)"),
]


@pytest.mark.parametrize("override,err,match", BAD)
def test_bad_inputs(override, err, match):
    args = dict(embeddings=torch.randn(4, 3), labels=torch.tensor([0, 0, 1, 1]))
    args.update(override)
    with pytest.raises(err, match=match):
        contrastive_bayesian_loss(**args)


def test_bad_hyper_parameters_and_memory_misuse():
    for kwargs, match in [(dict(phi="exp"), "phi must be one of"), (dict(negatives="hard"), "negatives must be"),
                          (dict(negatives="topk", top_k=0), "top_k must be >= 1"), (dict(neg_b=0), "neg_b must be"),
                          (dict(mean_weight=2.0), "mean_weight"), (dict(memory_size=-1), "memory_size")]:
        with pytest.raises(ValueError, match=match):
            fastcdml.ContrastiveBayesianLoss(**kwargs)
    loss_fn = fastcdml.ContrastiveBayesianLoss(memory_size=4)
    with pytest.raises(ValueError, match="ref_emb cannot be combined"):
        loss_fn(torch.randn(2, 3), torch.tensor([0, 1]), torch.randn(2, 3), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="include_self=False needs ref_emb"):
        contrastive_bayesian_loss(torch.randn(2, 3), torch.tensor([0, 1]), include_self=False)


# --- unchecked inputs, labels, batches without pairs ----------------------------------------------------------------

ALL_BACKENDS = ["reference"] + BACKENDS


def test_unchecked_nonfinite_rows_never_enter_the_memory_and_backends_agree():
    x = torch.randn(12, 8)
    x[3, 2] = float("nan")
    x[7] = float("inf")
    y = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5])
    clean = [(torch.randn(12, 8), clustered_labels(12, 2, 3)) for _ in range(2)]
    results = {}
    for backend in ALL_BACKENDS:
        loss_fn = fastcdml.ContrastiveBayesianLoss(memory_size=16, check_inputs=False, backend=backend, **LIVELY)
        first = loss_fn(x, y)
        assert torch.isnan(first), f"{backend}: a non-finite batch must give a NaN loss"
        assert loss_fn.memory_filled == 10 and torch.isfinite(loss_fn.memory_emb).all()
        assert set(loss_fn.memory_labels[:12].tolist()) == set(y.tolist()) | {-1}
        results[backend] = torch.stack([loss_fn(a, b) for a, b in clean])
        assert torch.isfinite(results[backend]).all(), f"{backend}: the memory was poisoned"
    for backend, losses in results.items():
        torch.testing.assert_close(losses, results["reference"].float(), atol=1e-5, rtol=1e-5, msg=backend)
    functional = [contrastive_bayesian_loss(x, y, backend=b, check_inputs=False) for b in ALL_BACKENDS]
    assert all(torch.isnan(v) for v in functional)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_partly_filled_memory_equals_its_filled_entries(backend):
    """Empty slots (label −1) are in no set and not in the row mean: the loss equals the one against the filled
    entries alone, in every backend."""
    x, y = torch.randn(10, 8), clustered_labels(10, 2, 3)
    mem, mem_y = torch.randn(7, 8), torch.randint(0, 5, (7,))
    padded = torch.cat([mem, torch.randn(5, 8)])
    padded_y = torch.cat([mem_y, torch.full((5,), -1)])
    for negatives in ("adaptive", "topk"):
        hyper = dict(LIVELY, negatives=negatives, top_k=4, backend=backend, check_inputs=False)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        expected = contrastive_bayesian_loss(xa, y, mem, mem_y, include_self=True, **hyper)
        got = contrastive_bayesian_loss(xb, y, padded, padded_y, include_self=True, **hyper)
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
        expected.backward()
        got.backward()
        torch.testing.assert_close(xb.grad, xa.grad, atol=1e-6, rtol=1e-5)


def test_negative_labels_are_rejected():
    with pytest.raises(ValueError, match="labels must be >= 0"):
        contrastive_bayesian_loss(torch.randn(4, 3), torch.tensor([0, 0, -1, 1]))
    with pytest.raises(ValueError, match="ref_labels must be >= 0"):
        contrastive_bayesian_loss(torch.randn(4, 3), torch.tensor([0, 0, 1, 1]), torch.randn(2, 3),
                                  torch.tensor([-2, 0]))


@pytest.mark.parametrize("labels", [[0, 0, 0, 0], [0, 1, 2, 3]], ids=["one-class", "no-positives"])
def test_batch_without_pairs_warns(labels):
    with pytest.warns(UserWarning, match="no row of this CBML batch has both a positive and a negative"):
        loss = contrastive_bayesian_loss(torch.randn(4, 3), torch.tensor(labels))
    assert loss.item() == 0.0


def test_legacy_memory_checkpoint_loads():
    new = fastcdml.ContrastiveBayesianLoss(memory_size=8, embedding_dim=4)
    legacy = {"memory_emb": torch.randn(8, 4), "memory_labels": torch.tensor([3, 1, 2, 0, 0, 0, 0, 0]),
              "_extra_state": {"memory_ptr": 3, "memory_filled": 3}}
    new.load_state_dict(legacy)
    assert new.memory_filled == 3 and int(new.memory_ptr) == 3
    assert new.memory_labels.tolist() == [3, 1, 2, -1, -1, -1, -1, -1]


# --- mined pairs (PML's indices_tuple) ------------------------------------------------------------------------------

def _mined(b, r, n_pairs=60):
    rows, cols = torch.randint(0, b, (n_pairs,)), torch.randint(0, r, (n_pairs,))
    return rows, cols, {(int(i), int(j)) for i, j in zip(rows, cols)}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("top_k", [0, 3])
def test_reference_with_mined_pairs_matches_naive_spec(mode, top_k):
    x, y, ref, ref_y = make(17, 23, 9, mode)
    if ref_y is not None:
        ref_y[::5] = -1  # empty slots too
    width = (17 if mode != "explicit" else 0) + (0 if ref is None else 23)
    rows, cols, allowed = _mined(17, width, 150)
    mask = pack_pairs(rows, cols, 17, width)
    got = cbml_loss_rows(x, y, ref, ref_y, pair_mask=mask, include_self=mode != "explicit", top_k=top_k, **LIVELY)
    expected = cbml_rows(x, y, ref, ref_y, mode != "explicit", LIVELY["pos_a"], LIVELY["pos_b"], LIVELY["neg_a"],
                         LIVELY["neg_b"], LIVELY["margin"], LIVELY["variance_weight"], LIVELY["mean_weight"], "log",
                         top_k, allowed)
    torch.testing.assert_close(got, expected)
    assert (got == 0).any() and (got != 0).any()  # the mask removes rows' sets, not everything


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("negatives", ["adaptive", "topk"])
def test_backend_with_mined_pairs_matches_reference(backend, mode, negatives):
    x, y, ref, ref_y = make(37, 61, 24, mode, dtype=torch.float32)
    width = (37 if mode != "explicit" else 0) + (0 if ref is None else 61)
    rows, cols, _ = _mined(37, width, 600)
    triplets = (rows[:300], cols[:300], cols[300:])  # (anchor, positive, negative): both pairs count
    hyper = dict(LIVELY, negatives=negatives, top_k=5, include_self=mode != "explicit")
    x64, xk = x.double().requires_grad_(), x.clone().requires_grad_()
    ref64 = None if ref is None else ref.double().requires_grad_()
    refk = None if ref is None else ref.clone().requires_grad_()
    expected = contrastive_bayesian_loss(x64, y, ref64, ref_y, indices_tuple=triplets, backend="reference", **hyper)
    got = contrastive_bayesian_loss(xk, y, refk, ref_y, indices_tuple=triplets, backend=backend, **hyper)
    unmasked = contrastive_bayesian_loss(x64, y, ref64, ref_y, backend="reference", **hyper)
    assert abs(unmasked.item() - expected.item()) > 1e-3  # the mined pairs change the loss
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)
    grads = torch.autograd.grad(expected, [t for t in (x64, ref64) if t is not None])
    got_grads = torch.autograd.grad(got, [t for t in (xk, refk) if t is not None])
    for g, e in zip(got_grads, grads):
        assert rel_err(g, e) < 1e-4


def test_pml_pairs_and_triplets_restrict_the_sets():
    pml = pytest.importorskip("pytorch_metric_learning")  # noqa: F841
    from pytorch_metric_learning.miners import MultiSimilarityMiner, TripletMarginMiner

    x, y = torch.randn(24, 8), clustered_labels(24, 3, 4)
    loss_fn = fastcdml.ContrastiveBayesianLoss(backend="reference", **LIVELY)
    for miner in (MultiSimilarityMiner(epsilon=0.3), TripletMarginMiner(margin=0.5)):
        mined = miner(x, y)
        rows, cols = fastcdml.losses._pml.mined_pairs(mined, x.device)
        expected = cbml_loss(x, y, pair_mask=pack_pairs(rows, cols, 24, 24), **LIVELY)
        torch.testing.assert_close(loss_fn(x, y, mined), expected.float())
    with pytest.raises(ValueError, match="indices_tuple must be a miner's output"):
        loss_fn(x, y, (torch.tensor([0]),))


# --- the authors' code (numbers in tests/cbml_authors.py) -----------------------------------------------------------

def _authors_case(case, dtype, backend):
    center, seed, b, d, c, params, phi, negatives, loss, directional = case
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, d, generator=g, dtype=torch.float64)
    labels = torch.randint(0, c, (b,), generator=g)
    v = torch.randn(b, d, generator=g, dtype=torch.float64)
    xr = x.to(dtype).requires_grad_()
    got = contrastive_bayesian_loss(xr, labels, phi=phi, negatives=negatives, top_k=authors.TOP_K,
                                    variance_center=center, backend=backend, **authors.PARAMS[params])
    grad, = torch.autograd.grad(got, xr)
    # fp32: 1e-5 of the value; the directional derivative within 1e-5 of Σ |∂loss/∂x|·|v|
    scale = (grad.double().abs() * v.abs()).sum().item()
    return got.item(), loss, (grad.double() * v).sum().item(), directional, scale


@pytest.mark.parametrize("case", authors.CASES, ids=lambda c: "-".join(map(str, c[:8])))
def test_reference_equals_the_authors_code(case):
    got, expected, d_got, d_expected, scale = _authors_case(case, torch.float64, "reference")
    assert got == pytest.approx(expected, rel=1e-12)
    assert abs(d_got - d_expected) <= 1e-12 * scale


def _fp32_cases():
    """Every case of B = 37; of B = 160 (more negatives than the top-K's 100), the lively top-K ones on the C++
    backend and one on Triton (the interpreter takes ~35 s for it)."""
    for backend in BACKENDS:
        for c in authors.CASES:
            big = c[1] == 2 and c[5] == "lively" and c[7] == "topk"
            if c[1] == 1 or (big and (backend != "triton" or c[0] == "class_means" and c[6] == "constant")):
                yield pytest.param(backend, c, id=f"{backend}-" + "-".join(map(str, c[:8])))


@pytest.mark.skipif(not BACKENDS, reason="no kernel backend for CBML in this process")
@pytest.mark.parametrize("backend, case", list(_fp32_cases()))
def test_backend_equals_the_authors_code_in_fp32(backend, case):
    got, expected, d_got, d_expected, scale = _authors_case(case, torch.float32, backend)
    assert got == pytest.approx(expected, rel=1e-5)
    assert abs(d_got - d_expected) <= 1e-5 * scale


def test_default_mean_weight_follows_the_variance_center():
    assert fastcdml.BayesianParams().mean_weight == 0.2
    assert fastcdml.BayesianParams(variance_center="boundary").mean_weight == 0.5
    assert fastcdml.BayesianParams(variance_center="boundary", mean_weight=0.1).mean_weight == 0.1
    with pytest.raises(ValueError, match="variance_center must be one of"):
        fastcdml.ContrastiveBayesianLoss(variance_center="row")
    with pytest.raises(ValueError, match="pos_weight must be >= 0"):
        fastcdml.ContrastiveBayesianLoss(phi="constant", pos_weight=-1.0)


# --- a clusterer's outliers (negative labels) ----------------------------------------------------------------------

@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_ignored_negative_labels_are_in_no_set(backend):
    """With ignore_negative_labels, a row labelled −1 contributes nothing: the loss is that of the other rows
    alone, times their share of the batch, and the ignored rows get no gradient."""
    x, y = torch.randn(20, 8), clustered_labels(20, 2, 4)
    y[[1, 6, 13]] = -1
    kept = y >= 0
    xa, xb = x.clone().requires_grad_(), x[kept].clone().requires_grad_()
    got = contrastive_bayesian_loss(xa, y, ignore_negative_labels=True, backend=backend, **LIVELY)
    expected = contrastive_bayesian_loss(xb, y[kept], backend=backend, **LIVELY) * kept.sum() / 20
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    got.backward()
    expected.backward()
    assert torch.equal(xa.grad[~kept], torch.zeros(3, 8))
    torch.testing.assert_close(xa.grad[kept], xb.grad, atol=1e-6, rtol=1e-5)


def test_ignored_negative_labels_are_not_enqueued():
    loss_fn = fastcdml.ContrastiveBayesianLoss(memory_size=16, ignore_negative_labels=True)
    loss_fn(torch.randn(6, 4), torch.tensor([0, 0, -1, 1, 1, -1]))
    assert loss_fn.memory_filled == 4
    with pytest.raises(ValueError, match="labels must be >= 0"):
        fastcdml.ContrastiveBayesianLoss()(torch.randn(4, 3), torch.tensor([0, 0, -1, 1]))

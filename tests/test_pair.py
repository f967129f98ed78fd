"""Pair losses (NTXent, SupCon, MultiSimilarity, Contrastive) and CrossBatchMemory with pytorch-metric-learning
as the oracle: loss and gradient on every backend, with and without miners, against ``ref_emb``, inside the memory
over several steps; multiplicities of mined pairs, zero cases, the memory's state and input errors."""
import pytest
import torch

import fastcdml
from fastcdml.reference.pair import KINDS, pair_loss

from .helpers import assert_close, kernel_backends

pml = pytest.importorskip("pytorch_metric_learning")
from pytorch_metric_learning import losses as pml_losses, miners  # noqa: E402

BACKENDS = ["reference"] + kernel_backends("pair", torch.device("cpu"))
# hyper-parameters that keep every term alive for random embeddings (the defaults are tested separately)
LOSSES = {
    "NTXentLoss": dict(temperature=0.3),
    "SupConLoss": dict(temperature=0.4),
    "MultiSimilarityLoss": dict(alpha=2.0, beta=5.0, base=0.3),
    "ContrastiveLoss": dict(pos_margin=0.2, neg_margin=1.1),
}
MINERS = {
    "none": lambda: None,
    "pairs": lambda: miners.MultiSimilarityMiner(0.1),
    "triplets": lambda: miners.TripletMarginMiner(0.5),
}


def _run(fn, x, *args, **kwargs):
    """(loss, ∂loss/∂x) of ``fn`` on a fresh leaf copy of ``x``."""
    x = x.detach().clone().requires_grad_()
    loss = fn(x, *args, **kwargs)
    grad, = torch.autograd.grad(loss, x, allow_unused=True)
    return loss.detach(), torch.zeros_like(x) if grad is None else grad


def _check(ours, theirs, x, backend, *args, **kwargs):
    """``ours`` (float32 for the fused backends, float64 for the reference) against PML in float64, with the error
    PML itself makes in float32 as the allowance."""
    expected = _run(theirs, x.double(), *args, **kwargs)
    if backend == "reference":
        got = _run(ours, x.double(), *args, **kwargs)
        for g, e, what in zip(got, expected, ("loss", "gradient")):
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-9, msg=what)
        return
    args = [a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
    low = _run(theirs, x.float(), *args, **kwargs)
    got = _run(ours, x.float(), *args, **kwargs)
    for g, e, lo, what in zip(got, expected, low, ("loss", "gradient")):
        assert_close(g, e, lo, torch.float32, what)


def _labels(b, classes=4):
    return torch.randint(0, classes, (b,))  # repeated classes


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("miner", MINERS)
@pytest.mark.parametrize("name", LOSSES)
def test_equals_pml(name, miner, backend):
    ours = getattr(fastcdml, name)(**LOSSES[name], backend=backend)
    theirs = getattr(pml_losses, name)(**LOSSES[name])
    # PML's NTXent with triplets builds a (triplets × triplets) matrix: the larger batch only without them
    for b, d in ((13, 6), (37, 20)) if miner != "triplets" else ((13, 6),):
        x, y = torch.randn(b, d, dtype=torch.float64), _labels(b)
        mined = None if MINERS[miner]() is None else MINERS[miner]()(x, y)
        _check(ours, theirs, x, backend, y, mined)
        ref, ref_y = torch.randn(11, d, dtype=torch.float64), _labels(11)
        mined = None if MINERS[miner]() is None else MINERS[miner]()(x, y, ref, ref_y)
        _check(ours, theirs, x, backend, y, mined, ref.to(x.dtype), ref_y)


@pytest.mark.parametrize("name", LOSSES)
def test_defaults_equal_pml(name):
    x, y = torch.randn(29, 16, dtype=torch.float64), _labels(29, 6)
    _check(getattr(fastcdml, name)(backend="reference"), getattr(pml_losses, name)(), x, "reference", y)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("enqueue", [False, True], ids=["all", "enqueue_mask"])
@pytest.mark.parametrize("miner", MINERS)
@pytest.mark.parametrize("name", LOSSES)
def test_cross_batch_memory_equals_pml(name, miner, enqueue, backend):
    if backend == "triton" and miner == "pairs":
        pytest.skip("the interpreter is slow; pair miners are covered by the other backends")
    d = 6
    ours = fastcdml.CrossBatchMemory(getattr(fastcdml, name)(**LOSSES[name], backend=backend), d, memory_size=20,
                                     miner=MINERS[miner]())
    theirs, theirs32 = (pml_losses.CrossBatchMemory(getattr(pml_losses, name)(**LOSSES[name]), d, memory_size=20,
                                                    miner=MINERS[miner]()) for _ in range(2))
    for step in range(5):  # the queue fills, wraps and overwrites
        x, y = torch.randn(9, d, dtype=torch.float64), _labels(9)
        mask = torch.rand(9) < 0.4 if enqueue else None
        expected = _run(theirs, x, y, enqueue_mask=mask)
        if backend == "reference":
            got = _run(ours, x, y, enqueue_mask=mask)
            for g, e, what in zip(got, expected, ("loss", "gradient")):
                torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-9, msg=f"{what} at step {step}")
        else:  # float32 kernels: PML's own float32 error is the allowance
            low = _run(theirs32, x.float(), y, enqueue_mask=mask)
            got = _run(ours, x.float(), y, enqueue_mask=mask)
            for g, e, lo, what in zip(got, expected, low, ("loss", "gradient")):
                assert_close(g, e, lo, torch.float32, f"{what} at step {step}")
        assert torch.equal(ours.label_memory, theirs.label_memory)
        assert int(ours.queue_idx) == theirs.queue_idx and bool(ours.has_been_filled) == theirs.has_been_filled


@pytest.mark.parametrize("triplets", [False, True])
@pytest.mark.parametrize("name", LOSSES)
def test_cross_batch_memory_indices_tuple_equals_pml(name, triplets):
    d = 5
    miner = miners.TripletMarginMiner(0.5) if triplets else None
    ours = fastcdml.CrossBatchMemory(getattr(fastcdml, name)(**LOSSES[name], backend="reference"), d, 16,
                                     miner=miner)
    theirs = pml_losses.CrossBatchMemory(getattr(pml_losses, name)(**LOSSES[name]), d, 16, miner=miner)
    for _ in range(3):
        x, y = torch.randn(7, d, dtype=torch.float64), _labels(7)
        a1, p, a2, n = miners.MultiSimilarityMiner(0.2)(x, y)
        slots = (torch.arange(7) + theirs.queue_idx) % 16  # where the batch will sit in the memory
        given = (a1, slots[p], a2, slots[n])
        _check(ours, theirs, x, "reference", y, given)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", LOSSES)
def test_repeated_pairs_equal_pml(name, backend):
    """NTXent and Contrastive average over the listed pairs, so a repeated pair counts repeatedly; SupCon and
    MultiSimilarity use the set of pairs; a tuple of one pair listed twice is not the "at most one pair" zero."""
    x, y = torch.randn(10, 4, dtype=torch.float64), torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 3, 3])
    a1, p = torch.tensor([0, 0, 0, 3, 6]), torch.tensor([1, 1, 2, 4, 7])
    a2, n = torch.tensor([0, 0, 3, 6, 6, 6]), torch.tensor([3, 3, 0, 0, 0, 9])
    ours, theirs = getattr(fastcdml, name)(**LOSSES[name], backend=backend), getattr(pml_losses, name)(**LOSSES[name])
    _check(ours, theirs, x, backend, y, (a1, p, a2, n))
    _check(ours, theirs, x, backend, y, (torch.tensor([0, 0]), torch.tensor([1, 1]), torch.tensor([0]),
                                         torch.tensor([3])))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("labels", [[0] * 6, list(range(6)), [0, 0, 1, 2, 3, 4], [0, 1]],
                         ids=["one-class", "all-distinct", "one-positive-pair", "two-rows"])
def test_degenerate_batches_equal_pml(name, labels, backend):
    y = torch.tensor(labels)
    x = torch.randn(len(labels), 5, dtype=torch.float64)
    _check(getattr(fastcdml, name)(**LOSSES[name], backend=backend), getattr(pml_losses, name)(**LOSSES[name]),
           x, backend, y)


@pytest.mark.parametrize("kind", KINDS)
def test_reference_gradcheck(kind):
    x = torch.randn(9, 4, dtype=torch.float64, requires_grad=True)
    ref = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    y, ry = torch.tensor([0, 0, 1, 1, 2, 2, 0, 1, 3]), torch.tensor([0, 1, 2, 3, 0, 1])
    params = {"ntxent": (0.3,), "supcon": (0.4,), "multi_similarity": (2.0, 5.0, 0.3), "contrastive": (0.2, 1.1)}
    assert torch.autograd.gradcheck(lambda a, r: pair_loss(kind, a, y, r, ry, params[kind]), (x, ref))


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_and_empty_reference_give_zero(backend):
    loss_fn = fastcdml.NTXentLoss(backend=backend)
    x = torch.randn(0, 8, requires_grad=True)
    loss = loss_fn(x, torch.zeros(0, dtype=torch.long))
    assert loss.item() == 0
    loss.backward()
    y = torch.randn(3, 8)
    assert loss_fn(y, torch.tensor([0, 1, 1]), None, torch.randn(0, 8), torch.zeros(0, dtype=torch.long)).item() == 0


def test_errors():
    x, y = torch.randn(6, 4), torch.tensor([0, 0, 1, 1, 2, 2])
    loss_fn = fastcdml.SupConLoss(backend="reference")
    with pytest.raises(ValueError, match="needs labels"):
        loss_fn(x)
    with pytest.raises(ValueError, match="labels must have shape"):
        loss_fn(x, y[:5])
    with pytest.raises(ValueError, match="ref_emb needs ref_labels"):
        loss_fn(x, y, None, x)
    with pytest.raises(ValueError, match="ref_emb has dimension"):
        loss_fn(x, y, None, torch.randn(3, 5), y[:3])
    with pytest.raises(ValueError, match="must share its label"):
        loss_fn(x, y, (torch.tensor([0]), torch.tensor([2]), torch.tensor([0]), torch.tensor([3])))
    with pytest.raises(ValueError, match="negative pair shares its label"):
        loss_fn(x, y, (torch.tensor([0]), torch.tensor([1]), torch.tensor([0]), torch.tensor([1])))
    with pytest.raises(ValueError, match=r"must lie in \[0, 6\)"):
        loss_fn(x, y, (torch.tensor([0]), torch.tensor([7]), torch.tensor([0]), torch.tensor([3])))
    with pytest.raises(ValueError, match="NaN or inf"):
        loss_fn(torch.full((6, 4), float("nan")), y)
    with pytest.raises(ValueError, match="reducer is not supported"):
        fastcdml.NTXentLoss(reducer=object())
    with pytest.raises(ValueError, match="distance=CosineSimilarity"):
        fastcdml.ContrastiveLoss(distance=pml.distances.CosineSimilarity())
    fastcdml.ContrastiveLoss(distance=pml.distances.LpDistance())  # PML's default is accepted
    with pytest.raises(ValueError, match="distance=LpDistance"):
        fastcdml.MultiSimilarityLoss(distance=pml.distances.LpDistance())
    with pytest.raises(TypeError, match="CrossBatchMemory takes"):
        fastcdml.CrossBatchMemory(pml_losses.NTXentLoss(), 4)
    with pytest.raises(ValueError, match="memory of its own"):
        fastcdml.CrossBatchMemory(fastcdml.ContrastiveBayesianLoss(memory_size=8), 4)


def test_cross_batch_memory_rejects_bad_input_without_touching_the_memory():
    cbm = fastcdml.CrossBatchMemory(fastcdml.NTXentLoss(backend="reference"), 4, memory_size=8)
    x, y = torch.randn(6, 4), torch.tensor([0, 0, 1, 1, 2, 2])
    cbm(x, y)
    state = {k: v.clone() for k, v in cbm.state_dict().items()}
    bad = [
        ((torch.randn(6, 5), y), {}, "embedding_size=4"),
        ((x, y[:4]), {}, "labels must have shape"),
        ((torch.randn(9, 4), torch.zeros(9, dtype=torch.long)), {}, "do not fit in memory_size=8"),
        ((x, y), dict(enqueue_mask=torch.ones(5, dtype=torch.bool)), "enqueue_mask must be"),
        ((x, y), dict(enqueue_mask=torch.ones(6, dtype=torch.bool), indices_tuple=(y, y, y)), "mutually exclusive"),
        ((torch.full((6, 4), float("inf")), y), {}, "NaN or inf"),
    ]
    for args, kwargs, match in bad:
        with pytest.raises(ValueError, match=match):
            cbm(*args, **kwargs)
        for k, v in cbm.state_dict().items():
            assert torch.equal(v, state[k]), k


def test_cross_batch_memory_state_dict_and_reset():
    cbm = fastcdml.CrossBatchMemory(fastcdml.MultiSimilarityLoss(backend="reference"), 4, memory_size=10)
    x, y = torch.randn(6, 4), torch.tensor([0, 0, 1, 1, 2, 2])
    cbm(x, y)
    cbm(x, y)
    state = cbm.state_dict()
    assert set(state) == {"embedding_memory", "label_memory", "queue_idx", "has_been_filled"}
    assert int(state["queue_idx"]) == 2 and bool(state["has_been_filled"])
    other = fastcdml.CrossBatchMemory(fastcdml.MultiSimilarityLoss(backend="reference"), 4, memory_size=10)
    other.load_state_dict(state)
    z, zy = torch.randn(5, 4), torch.tensor([0, 1, 2, 3, 3])
    assert torch.equal(cbm(z, zy), other(z, zy))
    cbm.reset_queue()
    assert int(cbm.queue_idx) == 0 and not bool(cbm.has_been_filled) and not cbm.embedding_memory.any()


@pytest.mark.parametrize("mined", [False, True])
def test_cross_batch_memory_with_cbml_equals_cbml_on_pmls_pairs(mined):
    """With the Contrastive Bayesian loss the memory computes CBML of the queries against the filled memory,
    restricted to PML's pairs (every pair minus the self pairs, or the miner's)."""
    from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

    hyper = dict(pos_a=0.3, pos_b=0.4, neg_a=0.2, neg_b=0.3, margin=0.6, variance_weight=0.5, mean_weight=0.3)
    miner = miners.MultiSimilarityMiner(0.2) if mined else None
    cbm = fastcdml.CrossBatchMemory(fastcdml.ContrastiveBayesianLoss(**hyper, backend="reference"), 5, 12,
                                    miner=miner)
    cbml = fastcdml.ContrastiveBayesianLoss(**hyper, backend="reference")
    mem, mem_y, idx = torch.zeros(12, 5, dtype=torch.float64), torch.zeros(12, dtype=torch.long), 0
    for step in range(4):
        x, y = torch.randn(5, 5, dtype=torch.float64), _labels(5, 3)
        slots = (torch.arange(5) + idx) % 12
        mem[slots], mem_y[slots], idx = x, y, (idx + 5) % 12
        filled = 12 if step >= 2 else idx
        e, ey = mem[:filled], mem_y[:filled]
        pairs = miner(x, y, e, ey) if mined else lmu.get_all_pairs_indices(y, ey)
        pairs = lmu.remove_self_comparisons(pairs, slots, 12)
        torch.testing.assert_close(cbm(x, y), cbml(x, y, pairs, e, ey))


PARAMS = {"ntxent": (0.3,), "supcon": (0.4,), "multi_similarity": (2.0, 5.0, 0.3), "contrastive": (0.2, 1.1)}
KERNELS = kernel_backends("pair", torch.device("cpu"))


def _family(backend):
    """The pair family's functions on ``backend`` (for the CPU)."""
    from fastcdml.ops import pair as pair_ops
    from fastcdml.reference import pair as pair_reference

    return fastcdml._backend.resolve(backend, "pair", torch.device("cpu")).bind(pair_ops, pair_reference)


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("b, r, d, mined", [(1, 1, 3, False), (37, 75, 72, False), (70, 131, 20, True)],
                         ids=["tiny", "ragged", "multi-tile-mined"])
def test_kernels_match_reference(kind, dtype, backend, b, r, d, mined):
    """Loss and both gradients (queries and references) against the float64 reference, every input dtype."""
    x, ref = torch.randn(b, d, dtype=torch.float64), torch.randn(r, d, dtype=torch.float64)
    y, ry = _labels(b, 5), _labels(r, 5)
    exclude = counts = None
    if mined:
        counts = torch.randint(0, 3, (b, r), dtype=torch.uint8)  # multiplicities 0, 1, 2
    else:
        exclude = torch.randint(-1, r, (b,))

    def run(family, dt):
        xa, ra = x.to(dt).requires_grad_(), ref.to(dt).requires_grad_()
        loss = family.pair_loss(kind, xa, y, ra, ry, PARAMS[kind], exclude, counts)
        gx, gr = torch.autograd.grad(loss, (xa, ra))
        return loss, gx, gr

    reference = _family("reference")
    expected, low, got = run(reference, torch.float64), run(reference, dtype), run(_family(backend), dtype)
    for g, e, lo, what in zip(got, expected, low, ("loss", "grad x", "grad ref")):
        assert_close(g, e, lo, dtype, f"{kind} {what}")


@pytest.mark.parametrize("backend", KERNELS)
def test_kernel_gradient_of_a_batch_against_itself(backend):
    """ref = x (the plain PML call): autograd adds the two roles' gradients."""
    x, y = torch.randn(23, 9, dtype=torch.float64), _labels(23)
    got = _run(fastcdml.SupConLoss(backend=backend), x.float(), y)
    expected = _run(fastcdml.SupConLoss(backend="reference"), x, y)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g.double(), e, rtol=1e-4, atol=1e-5)


def test_cpp_is_thread_count_independent():
    if "cpp" not in KERNELS:
        pytest.skip("no C++ extension")
    x, ref = torch.randn(150, 40), torch.randn(2100, 40)
    y, ry = _labels(150, 30), _labels(2100, 30)
    results = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            for kind in KINDS:
                xa, ra = x.clone().requires_grad_(), ref.clone().requires_grad_()
                loss = _family("cpp").pair_loss(kind, xa, y, ra, ry, PARAMS[kind])
                results.append((threads, kind, loss, *torch.autograd.grad(loss, (xa, ra))))
    finally:
        torch.set_num_threads(before)
    for t, kind, *values in results[len(KINDS):]:
        first = next(r for r in results if r[1] == kind)
        assert all(torch.equal(a, b) for a, b in zip(values, first[2:])), f"{kind} differs at {t} threads"


@pytest.mark.parametrize("name", LOSSES)
def test_compiled_module_matches_eager(name):
    from torch._dynamo.testing import CompileCounterWithBackend

    loss_fn = getattr(fastcdml, name)(**LOSSES[name])
    x, y = torch.randn(21, 12), _labels(21)
    eager = _run(loss_fn, x, y)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(loss_fn, fullgraph=True, backend=counter)
    for _ in range(2):
        got = _run(compiled, x, y)
    assert counter.frame_count == 1
    for g, e in zip(got, eager):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", KERNELS)
def test_opcheck(backend):
    ns = fastcdml._backend.resolve(backend, "pair", torch.device("cpu")).ops
    x, ref, y, ry = torch.randn(9, 5), torch.randn(13, 5), _labels(9), _labels(13)
    cases = ((0, torch.randint(-1, 13, (9,)), None), (3, None, torch.randint(0, 3, (9, 13)).byte()))
    for kind, exclude, counts in cases:
        args = (x.requires_grad_(), y, ref.requires_grad_(), ry, exclude, counts, kind, 0.3, 1.1, 0.2, True, True)
        torch.library.opcheck(ns.pair_fwd.default, args)

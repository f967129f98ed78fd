"""The Triton CBML kernels (``fastcdml/kernels/cbml.py``) vs the float64 reference: loss and gradients for x and
ref, through the public API and the op. On a machine without CUDA they run in the Triton interpreter
(``fastcdml_interpret`` namespace); the ``gpu`` tests run on CUDA only.

Low-precision inputs are quantised first and the float64 reference runs on the quantised values, so a set
selection (a similarity near a threshold) sees the same inputs in every implementation; the hyper-parameters
are chosen so that every term of the loss and every selection carries weight (checked in
``test_hyper_parameters_make_selections_matter``)."""
from __future__ import annotations

import pytest
import torch

import fastcdml
from fastcdml.functional import contrastive_bayesian_loss
from fastcdml.reference.cbml import cbml_loss, cbml_loss_rows, pack_pairs
from .helpers import DTYPES, FLOOR, assert_close, rel_err, clustered_labels, kernel_backends

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif("triton" not in kernel_backends("cbml", DEV), reason="no Triton CBML backend here")
NS = torch.ops.fastcdml if DEV.type == "cuda" else getattr(torch.ops, "fastcdml_interpret", None)

# Sensitive hyper-parameters: with the defaults (neg_a = 1, neg_b = 0.01) the negative term is ~e^-70 for
# these embeddings and a wrong negative selection would go unnoticed.
HYPER = dict(pos_a=0.5, pos_b=0.5, neg_a=0.3, neg_b=0.1, margin=0.1, variance_weight=0.5, mean_weight=0.2)


def clustered(labels: torch.Tensor, d: int, noise: float = 1.0) -> torch.Tensor:
    """float64 embeddings around one random unit center per class (cosines: positives ~0.5, negatives ~0)."""
    centers = torch.randn(int(labels.max()) + 1, d, dtype=torch.float64)
    centers = centers / centers.norm(dim=1, keepdim=True)
    return centers[labels] + noise * torch.randn(len(labels), d, dtype=torch.float64) / d**0.5


def run_reference(x, y, ref, yr, kwargs, g):
    """(loss, grad x, grad ref) of the reference on exactly these tensors (any dtype)."""
    x = x.detach().clone().requires_grad_()
    r = None if ref is None else ref.detach().clone().requires_grad_(ref.requires_grad)
    loss = cbml_loss(x, y, r, yr, **kwargs)
    grads = torch.autograd.grad(loss * g, [x] + ([r] if r is not None and r.requires_grad else []),
                                allow_unused=True)
    return loss.detach(), grads[0], (grads[1] if len(grads) > 1 else None)


def run_triton(x, y, ref, yr, kwargs, g):
    x = x.detach().clone().requires_grad_()
    r = None if ref is None else ref.detach().clone().requires_grad_(ref.requires_grad)
    fkw = dict(kwargs)
    top_k = fkw.pop("top_k", 0)
    loss = contrastive_bayesian_loss(x, y, r, yr, **fkw, negatives="topk" if top_k else "adaptive",
                                     top_k=top_k or 100, backend="triton")
    (loss * g).backward()
    return loss.detach(), x.grad, (r.grad if r is not None and r.requires_grad else None)


def check(x64, y, ref64=None, yr=None, *, dtype=torch.float32, ref_dtype=None, ref_grad=True, strict=False,
          **kwargs):
    """Triton vs the float64 reference on the inputs quantised to ``dtype`` (``ref_dtype`` for ref).
    ``strict``: the bound is the floor alone."""
    kwargs = {**HYPER, **kwargs}
    x = x64.to(dtype)
    ref = None if ref64 is None else ref64.to(ref_dtype or dtype).requires_grad_(ref_grad)
    g = torch.rand((), dtype=torch.float64) + 0.5
    expected = run_reference(x.double(), y, None if ref is None else ref.double().requires_grad_(ref_grad), yr,
                             kwargs, g)
    lowp = expected if strict else run_reference(x, y, ref, yr, kwargs, g.float())
    actual = run_triton(x.to(DEV), y.to(DEV), None if ref is None else ref.to(DEV), None if yr is None else
                        yr.to(DEV), kwargs, g.float().to(DEV))
    assert actual[0].dtype == torch.float32 and actual[1].dtype == dtype
    lowest = min((dtype, ref_dtype or dtype), key=lambda t: -FLOOR[t])
    for what, a, e, lo in zip(("loss", "grad x", "grad ref"), actual, expected, lowp):
        assert (a is None) == (e is None), what
        if a is not None:
            assert_close(a, e, lo, lowest if what == "loss" else (dtype if what == "grad x" else ref.dtype), what)
    return expected[0]


def bank(m: int, num_classes: int, d: int):
    labels = torch.randint(0, num_classes, (m,))
    return clustered(labels, d), labels


# --------------------------------------------------------------------------------------------------- CPU suite
@pytest.mark.parametrize("center", ["class_means", "boundary"])
@pytest.mark.parametrize("phi", ["log", "sqrt", "constant"])
@pytest.mark.parametrize("top_k", [0, 3, 500])
def test_self_mode(phi, top_k, center):
    y = clustered_labels(23)
    check(clustered(y, 24), y, phi=phi, top_k=top_k, variance_center=center, pos_weight=0.7, neg_weight=0.4)


def test_topk_with_fewer_negatives_than_k_in_some_rows():
    """K below the reference-set size but above some rows' negative count (their K-th slot stays empty)."""
    y = torch.cat([torch.zeros(20, dtype=torch.long), torch.arange(1, 4).repeat(2)])[torch.randperm(26)]
    check(clustered(y, 24), y, top_k=10)


@pytest.mark.parametrize("top_k", [0, 7])
@pytest.mark.parametrize("include_self", [True, False])
def test_explicit_ref_gradients(include_self, top_k):
    y = clustered_labels(21)
    r, yr = bank(70, int(y.max()) + 1, 40)
    # the bank's classes are the batch's, so r gets both positive and negative pairs
    check(clustered(y, 40), y, r, yr, include_self=include_self, top_k=top_k, phi="sqrt" if top_k else "constant")
    check(clustered(y, 40), y, r, yr, include_self=include_self, top_k=top_k, variance_center="boundary")


@pytest.mark.parametrize("dtype", DTYPES)
def test_ragged_memory_bank_every_dtype(dtype):
    """B=45 (3–7 per class), M=300, D=72: no size is a multiple of a block; ref without gradient."""
    y = clustered_labels(45)
    x = clustered(y, 72)
    r, yr = bank(300, int(y.max()) + 1, 72)
    check(x, y, r, yr, include_self=True, dtype=dtype, ref_grad=False, top_k=0)
    check(x, y, r, yr, include_self=True, dtype=dtype, ref_grad=False, top_k=0, variance_center="boundary")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_topk_with_gradient_to_ref(dtype):
    y = clustered_labels(30)
    r, yr = bank(90, int(y.max()) + 1, 48)
    check(clustered(y, 48), y, r, yr, include_self=True, dtype=dtype, top_k=20)


def test_module_memory_bank_bf16_with_fp32_memory():
    """The module's fp32 FIFO memory as the reference set of bf16 queries (mixed dtypes in the kernel)."""
    torch.manual_seed(1)
    loss_fn = fastcdml.ContrastiveBayesianLoss(memory_size=64, backend="triton", **HYPER).to(DEV)
    for step in range(3):
        y = clustered_labels(28)
        x = clustered(y, 32).to(torch.bfloat16)
        n = loss_fn.memory_filled  # copies: the enqueue after the loss overwrites the memory (it wraps at step 2)
        mem, mem_y = loss_fn.memory_emb[:n].cpu().clone(), loss_fn.memory_labels[:n].cpu().clone()
        xd = x.to(DEV).requires_grad_()
        loss = loss_fn(xd, y.to(DEV))
        loss.backward()
        expected = run_reference(x.double(), y, mem.double() if len(mem) else None, mem_y if len(mem) else None,
                                 dict(HYPER, include_self=True), torch.tensor(1.0, dtype=torch.float64))
        lowp = run_reference(x, y, mem if len(mem) else None, mem_y if len(mem) else None,
                             dict(HYPER, include_self=True), torch.tensor(1.0))
        assert_close(loss, expected[0], lowp[0], torch.bfloat16, f"loss step {step}")
        assert_close(xd.grad, expected[1], lowp[1], torch.bfloat16, f"grad step {step}")
    assert loss_fn.memory_filled == 64


def test_skipped_rows():
    """Singleton classes (no positive) and rows without hard positives / negatives next to kept rows."""
    y = torch.tensor([0, 0, 0, 1, 2, 2, 3, 4, 4, 4, 5, 6, 6, 7, 7, 7, 8])
    x = clustered(y, 16)
    r, yr = bank(20, 12, 16)
    per_row = cbml_loss_rows(x, y, **{**HYPER, "include_self": True})
    assert (per_row == 0).any() and (per_row != 0).any(), "the data must contain skipped and kept rows"
    check(x, y)
    check(x, y, r, yr, include_self=True)
    check(x, y, r, yr, include_self=True, variance_center="boundary")


def test_all_rows_skipped_gives_zero():
    y = torch.zeros(9, dtype=torch.long)  # one class: no negatives anywhere
    x = clustered(y, 20)
    assert check(x, y) == 0
    x64 = clustered(torch.arange(5), 20)  # all singletons: no positives
    assert check(x64, torch.arange(5), top_k=2) == 0


def dyadic_rows(n: int, d: int = 16) -> torch.Tensor:
    """Rows with four entries ±1 (norm 2): every similarity is a multiple of 1/4, exact in any precision and
    summation order, so equal values are exact ties in the reference and in the kernel alike."""
    rows = torch.zeros(n, d, dtype=torch.float64)
    for i in range(n):
        rows[i, torch.randperm(d)[:4]] = torch.randint(0, 2, (4,), dtype=torch.float64) * 2 - 1
    return rows


@pytest.mark.parametrize("top_k", [0, 3, 6])
def test_exact_ties_lowest_index(top_k):
    """Duplicated rows and a coarse similarity grid: ties in minP, maxN and at the top-K boundary. A tie at
    S = 1 (a row and its own copy) would be invisible (the normalisation backward removes that direction), so
    the label is a function of the base row in self mode, and the reference rows come from other bases."""
    base = dyadic_rows(16)
    idx = torch.randint(0, 8, (30,))
    x, y = base[idx], idx % 4
    check(x, y, top_k=top_k, strict=True)
    check(x, y, top_k=top_k, strict=True, variance_center="boundary")
    r_idx = torch.randint(8, 16, (150,))
    check(x, y, base[r_idx], torch.randint(0, 4, (150,)), include_self=False, top_k=top_k, strict=True)


def test_topk_1000_with_ties_across_tiles_and_splits():
    """K = 1000 (a 1024-key buffer per row) against a reference set of 1600 rows that spans many tiles and both
    splits: the K-th key is found by merging tile keys into the split buffers and the split buffers into one, and
    exact ties at the selection boundary (duplicated rows, a coarse similarity grid) go to the lowest index."""
    base = dyadic_rows(12, d=16)
    idx = torch.randint(0, 6, (8,))
    r_idx, yr = torch.randint(6, 12, (1300,)), torch.randint(0, 6, (1300,))
    y = idx % 3
    assert ((yr[None, :] != y[:, None]).sum(1) > 1000).all()  # every row has more negatives than K
    check(base[idx], y, base[r_idx], yr, include_self=False, ref_grad=False, top_k=1000, strict=True)


def test_batch_of_one_and_int32_labels():
    x = clustered(torch.tensor([0]), 20)
    check(x, torch.tensor([0]))  # self mode, B = 1: nothing to compare, loss 0
    r, yr = bank(9, 3, 20)
    yr[0] = 0
    yr[1] = 1
    check(x, torch.tensor([0], dtype=torch.int32), r, yr.int(), include_self=False)


def test_default_hyper_parameters():
    y = clustered_labels(20)
    x = clustered(y, 32)
    kw = {k: v for k, v in zip(HYPER, (0.5, 0.5, 1.0, 0.01, 0.1, 1.0, 0.2))}
    check(x, y, **kw)
    check(x, y, **kw, top_k=100)


def test_hyper_parameters_make_selections_matter():
    """Guard for the suite: with HYPER, adaptive vs top-K and a different K change the reference loss."""
    y = clustered_labels(23)
    x = clustered(y, 24)
    losses = [cbml_loss(x, y, **HYPER, top_k=k).item() for k in (0, 3, 500)]
    assert min(abs(a - b) for a, b in [(losses[0], losses[1]), (losses[1], losses[2]), (losses[0], losses[2])]) > 1e-3


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_op_gradients_fp32_accurate_for_16bit_inputs(dtype):
    """The op's fp32 gradients (before the cast to the input dtype) match float64 on the quantised inputs to
    fp32 accuracy: S is exact-product fp32, and G enters the 16-bit backward products as hi + lo parts."""
    y = clustered_labels(26)
    x = clustered(y, 40).to(dtype)
    r, yr = bank(60, int(y.max()) + 1, 40)
    r = r.to(dtype)
    kw = dict(HYPER, include_self=True, top_k=0)
    expected = run_reference(x.double(), y, r.double().requires_grad_(), yr, kw, torch.tensor(1.0, dtype=torch.float64))
    hyper = [HYPER[k] for k in ("pos_a", "pos_b", "neg_a", "neg_b", "margin", "variance_weight", "mean_weight")]
    loss, gx, gr = NS.cbml_fwd(x.to(DEV), y.to(DEV), r.to(DEV), yr.to(DEV), None, True, *hyper, 0, 0.25, 0.25, True,
                               0, True, True)
    for what, a, e in (("loss", loss, expected[0]), ("grad x", gx, expected[1]), ("grad ref", gr, expected[2])):
        assert rel_err(a, e) < 2e-6, what


def test_deterministic():
    y = clustered_labels(37)
    x = clustered(y, 40).float().to(DEV)
    r, yr = bank(50, int(y.max()) + 1, 40)
    outs = [NS.cbml_fwd(x, y.to(DEV), r.float().to(DEV), yr.to(DEV), None, True, 0.5, 0.5, 0.3, 0.1, 0.1, 0.5, 0.2,
                        0, 0.25, 0.25, True, 5, True, True) for _ in range(2)]
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_opcheck():
    y = clustered_labels(10)
    x = clustered(y, 16).float().to(DEV)
    r, yr = bank(12, int(y.max()) + 1, 16)
    hyper = (True, 0.5, 0.5, 0.3, 0.1, 0.1, 0.5, 0.2, 2, 0.7, 0.4, True, 3, True, True)
    torch.library.opcheck(NS.cbml_fwd.default, (x, y.to(DEV), r.float().to(DEV), yr.to(DEV), None, *hyper))
    mask = pack_pairs(torch.randint(0, 10, (60,)), torch.randint(0, 22, (60,)), 10, 22).to(DEV)
    torch.library.opcheck(NS.cbml_fwd.default, (x, y.to(DEV), r.float().to(DEV), yr.to(DEV), mask, *hyper))


# --------------------------------------------------------------------------------------------------- GPU only
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b, m, d, top_k", [(512, 0, 512, 0), (256, 8192, 128, 0), (256, 8192, 128, 100),
                                            (300, 1000, 200, 1000)])
def test_gpu_large(dtype, b, m, d, top_k):
    y = clustered_labels(b, 2, 8)
    x = clustered(y, d)
    if m:
        r, yr = bank(m, int(y.max()) + 1, d)
        check(x, y, r, yr, include_self=True, dtype=dtype, ref_dtype=torch.float32, ref_grad=False, top_k=top_k)
    else:
        check(x, y, dtype=dtype, top_k=top_k)


@pytest.mark.gpu
def test_gpu_compile_fullgraph_and_cuda_graph():
    y = clustered_labels(128).cuda()
    x = clustered(y.cpu(), 128).to(torch.bfloat16).cuda().requires_grad_()
    r, yr = bank(4096, int(y.max()) + 1, 128)
    r, yr = r.float().cuda(), yr.cuda()
    f = torch.compile(lambda a: contrastive_bayesian_loss(a, y, r, yr, include_self=True, backend="triton"),
                      fullgraph=True)
    eager = contrastive_bayesian_loss(x, y, r, yr, include_self=True, backend="triton")
    assert torch.equal(f(x), eager)
    args = (x.detach(), y, r, yr, None, True, 0.5, 0.5, 1.0, 0.01, 0.1, 1.0, 0.2, 0, 0.25, 0.25, True, 100, True, False)
    torch.ops.fastcdml.cbml_fwd(*args)  # compile / warm up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = torch.ops.fastcdml.cbml_fwd(*args)
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(captured, torch.ops.fastcdml.cbml_fwd(*args)):
        assert torch.equal(a, b)

"""The C++ CPU backend (csrc/) against the float64 reference, through the public API and the ops themselves.

Pass rule: ``helpers.assert_close`` (error ≤ 2 × the reference's own error in the input dtype + a floor). Shapes
cover tiny, ragged and multi-block / multi-chunk cases (the C++ kernels use 64-row blocks and chunks of
clamp(131072 / D, 128, 1024) classes or references; D = 72 → 1024).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastcdml
from fastcdml.functional import center_contrastive_loss, center_momentum_update_, contrastive_bayesian_loss
from fastcdml.ops import ccl as ccl_ops
from fastcdml.reference.cbml import pack_pairs
from .helpers import DTYPES, assert_close, clustered_labels, kernel_backends, unit_rows

CPU = torch.device("cpu")
pytestmark = pytest.mark.skipif(
    not {"cpp"} <= set(kernel_backends("ccl", CPU)) & set(kernel_backends("cbml", CPU)),
    reason="the C++ extension or its CPU kernels are not available",
)
ops = torch.ops.fastcdml
HYPER = (0.05, 0.1, 1.0)  # temperature, margin, center_weight
CCL_SHAPES = [(1, 4, 1), (37, 72, 1001), (70, 72, 2500)]  # (B, D, C); the last: 2 row blocks × 3 class chunks
BANKS = (torch.float32, torch.bfloat16)


def _ccl_inputs(b, d, c, dtype, bank_dtype):
    x = torch.randn(b, d).to(dtype)
    y = torch.randint(0, c, (b,), dtype=torch.int32 if b % 2 else torch.int64)
    return x, y, unit_rows(c, d, bank_dtype)


def _ccl_rows(x, y, w, backend, go, w_grad=False):
    """(loss rows, ∂/∂x, ∂/∂W or None) of the functional with reduction='none' and grad_output ``go``."""
    x = x.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_(w_grad)
    rows = center_contrastive_loss(x, y, w, *HYPER, reduction="none", backend=backend)
    rows.backward(go.to(rows.dtype))
    return rows, x.grad, w.grad


@pytest.mark.parametrize("bank_dtype", BANKS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", CCL_SHAPES)
@pytest.mark.parametrize("w_grad", [False, True], ids=["momentum", "learnable"])
def test_ccl_matches_reference(shape, dtype, bank_dtype, w_grad):
    x, y, w = _ccl_inputs(*shape, dtype, bank_dtype)
    go = torch.randn(shape[0], dtype=torch.float64)
    got = _ccl_rows(x, y, w, "cpp", go, w_grad)
    exp = _ccl_rows(x.double(), y, w.double(), "reference", go, w_grad)
    low = _ccl_rows(x, y, w, "reference", go, w_grad)
    assert got[1].dtype == dtype and got[0].dtype == torch.float32
    for name, a, e, l in zip(("loss", "grad_x", "grad_centers"), got, exp, low):
        if e is not None:
            assert_close(a, e, l, dtype, f"ccl {name} {shape}")


@pytest.mark.parametrize("bank_dtype", BANKS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", CCL_SHAPES[1:])
def test_ccl_update_matches_reference(shape, dtype, bank_dtype):
    b, d, c = shape
    x, _, w = _ccl_inputs(b, d, c, dtype, bank_dtype)
    y = torch.randint(0, max(1, b // 3), (b,))  # several rows per class; most classes absent
    got = center_momentum_update_(w.clone(), x, y, 0.8, backend="cpp")
    exp = center_momentum_update_(w.double(), x.double(), y, 0.8, backend="reference")
    low = center_momentum_update_(w.clone(), x, y, 0.8, backend="reference")
    assert got.dtype == bank_dtype
    assert_close(got, exp, low, bank_dtype, "updated bank")
    absent = torch.ones(c, dtype=torch.bool)
    absent[y] = False
    assert torch.equal(got[absent], w[absent])


# ---------------------------------------------------------------- the dense path for small problems (ccl_fwd_dense)

# (temperature, margin, center_weight, margin_type, sub_centers, gamma): CCL; ArcFace; SubCenterArcFace; SoftTriple
DENSE_FAMILIES = [(0.05, 0.1, 1.0, 0, 1, 0.0), (1 / 64, 0.5, 0.0, 1, 1, 0.0), (1 / 64, 0.5, 0.0, 1, 3, 0.0),
                  (0.05, 0.01, 0.0, 0, 3, 0.1)]
DENSE_SHAPES = [(1, 4, 1), (37, 72, 301), (70, 24, 1001)]  # (B, D, C); the last: 2 row blocks, C·K up to 3003


def _family_rows(x, y, w, family, go, ops_ns=None):
    """(loss rows, ∂/∂x, ∂/∂W, the autograd node's name) of ``ccl_loss_rows`` (the op wrapper on ``ops_ns``, else
    the reference) with grad_output ``go``."""
    x, w = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    if ops_ns is None:
        rows = fastcdml.reference.ccl.ccl_loss_rows(x, y, w, *family)
    else:
        rows = ccl_ops.ccl_loss_rows(ops_ns, x, y, w, *family)
    node = rows.grad_fn.name()
    rows.backward(go.to(rows.dtype))
    return rows.detach(), x.grad, w.grad, node


@pytest.mark.parametrize("path", ["dense", "streaming"])
@pytest.mark.parametrize("family", DENSE_FAMILIES, ids=["ccl", "arcface", "subcenter", "softtriple"])
@pytest.mark.parametrize("shape", DENSE_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_ccl_bank_gradient_paths_match_reference(shape, family, path, monkeypatch):
    """Both sides of ccl_loss_rows' size threshold: loss, query and bank gradients against the float64 reference,
    one label out of range (a NaN row that must not reach the gradients)."""
    b, d, c = shape
    k = family[4]
    threshold = b * c * k if path == "dense" else b * c * k - 1  # the largest problem still dense, and one below
    monkeypatch.setattr(ccl_ops, "DENSE_MAX_ELEMENTS", threshold)
    for dtype, bank_dtype in ((torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                              (torch.float16, torch.bfloat16)):
        x, w = torch.randn(b, d).to(dtype), unit_rows(c * k, d, bank_dtype)
        y = torch.randint(0, c, (b,))
        if b > 1:
            y[b // 2] = c
        ok = y < c
        go = torch.randn(b, dtype=torch.float64)
        got = _family_rows(x, y, w, family, go, ops)
        assert ("dense" in got[3]) == (path == "dense"), got[3]
        assert got[0].dtype == torch.float32 and got[1].dtype == dtype and got[2].dtype == bank_dtype
        assert torch.isnan(got[0][~ok]).all() and torch.equal(got[1][~ok], torch.zeros_like(got[1][~ok]))
        # the reference's NaN row would spread NaN through its gradients: it gets the valid rows only
        exp = _family_rows(x[ok].double(), y[ok], w.double(), family, go[ok])
        low = _family_rows(x[ok], y[ok], w, family, go[ok])
        what = f"{path} {shape} {family} {dtype} {bank_dtype}"
        tol = torch.float32 if dtype == bank_dtype == torch.float32 else torch.bfloat16
        for name, a, e, lw in zip(("loss", "grad_x", "grad_W"), (got[0][ok], got[1][ok], got[2]), exp, low):
            assert_close(a, e, lw, tol, f"{name} {what}")


def test_ccl_dense_ops_direct():
    """coef holds ∂L_i/∂s_ir (the float64 autograd of the reference's rows by the similarity matrix) and the
    dense backward is coefᵀ·(g ⊙ x̂); an empty bank and compute_grad=False keep the shapes."""
    b, d, c, k = 37, 24, 101, 3
    family = (1 / 64, 0.5, 0.0, 1, k, 0.0)
    x, w, y = torch.randn(b, d), unit_rows(c * k, d), torch.randint(0, c, (b,))
    loss, gx, lse, lq, coef = ops.ccl_fwd_dense(x, y, w, *family[:3], True, *family[3:])
    ref = ops.ccl_fwd(x, y, w, *family[:3], True, *family[3:])
    for name, a, e in zip(("loss", "grad_x", "lse", "label_q"), (loss, gx, lse, lq), ref):
        torch.testing.assert_close(a, e, msg=name)
    go = torch.randn(b)
    expected = []
    for dtype in (torch.float64, torch.float32):  # the reference's loss by its similarities, and the product
        xh = fastcdml.reference.ccl.normalize_rows(x.to(dtype))
        s = (xh @ w.to(dtype).t()).requires_grad_()
        cls = s.view(b, c, k).amax(2)
        t = fastcdml.reference.ccl.target_logit(cls.gather(1, y[:, None]).squeeze(1), family[1], family[3])
        z = torch.where(torch.arange(c)[None] == y[:, None], t[:, None], cls) / family[0]
        (torch.logsumexp(z, 1) - t / family[0]).sum().backward()
        expected.append((s.grad, s.grad.t() @ (go.to(dtype)[:, None] * xh)))
    assert_close(coef, expected[0][0], expected[1][0], torch.float32, "coef")
    gw = ops.ccl_bwd_centers_dense(x, coef, go)
    assert_close(gw, expected[0][1], expected[1][1], torch.float32, "dense grad_centers")
    assert ops.ccl_fwd_dense(x, y, w, *family[:3], False, *family[3:])[4].shape == (b, c * k)
    empty = ops.ccl_fwd_dense(x, y, w[:0], *family[:3], True, 0, 1, 0.0)
    assert empty[4].shape == (b, 0) and torch.isnan(empty[0]).all()
    assert ops.ccl_bwd_centers_dense(x, empty[4], go).shape == (0, d)


@pytest.mark.parametrize("layout", ["rows", "columns"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (70, 24), (1001, 72)], ids=lambda s: "x".join(map(str, s)))
def test_ccl_normalize_rows(shape, dtype, layout):
    """The fused normalisation of a learnable bank against the reference's, forward and backward, for rows stored
    as rows or as the columns of PML's W; a zero row (the eps clamp) included; the gradient keeps the layout."""
    n, d = shape
    w = torch.randn(n, d) if layout == "rows" else torch.randn(d, n).t()
    w[n // 2] = 0.0
    w = w.to(dtype)
    go = torch.randn(n, d, dtype=torch.float64)
    got = ccl_ops.normalize_rows(ops, w.clone().requires_grad_())
    assert got.dtype == torch.float32 and got.is_contiguous() and "normalize" in got.grad_fn.name()
    results = []
    for ns, t in ((ops, w), (None, w.double()), (None, w)):
        t = t.clone().requires_grad_() if layout == "rows" else t.t().clone().t().requires_grad_()
        out = ccl_ops.normalize_rows(ns, t) if ns else fastcdml.reference.ccl.normalize_rows(t)
        out.backward(go.to(out.dtype))
        results.append((out, t.grad))
    (out, grad), exp, low = results
    assert grad.dtype == dtype and grad.stride() == w.stride()
    assert_close(out, exp[0], low[0], dtype, f"normalized rows {shape} {layout}")
    assert_close(grad, exp[1], low[1], dtype, f"normalized rows' gradient {shape} {layout}")


def test_ccl_update_skips_bad_rows():
    x, _, w = _ccl_inputs(12, 16, 10, torch.float32, torch.float32)
    y = torch.tensor([0, 1, 2, 3, 10, -1, 4, 4, 5, 5, 6, 6])
    x[8] = float("nan")  # spoils class 5 only
    got = center_momentum_update_(w.clone(), x, y, 0.9, backend="cpp", check_inputs=False)
    exp = center_momentum_update_(w.double(), x.double(), y, 0.9, backend="reference", check_inputs=False)
    assert torch.equal(got[[5, 7, 8, 9]], w[[5, 7, 8, 9]])
    assert_close(got, exp, exp.float(), torch.float32, "bank after a bad batch")


def test_ccl_ops_direct():
    """The raw op: lse output, NaN row and zero gradient for a label outside [0, C), bwd_centers vs autograd."""
    b, d, c = 37, 72, 1001
    x, y, w = _ccl_inputs(b, d, c, torch.float32, torch.float32)
    y = y.long()
    y[3] = c
    loss, gx, lse, _ = ops.ccl_fwd(x, y, w, *HYPER, True)
    assert loss.shape == (b,) and gx.shape == (b, d) and lse.shape == (b,)
    assert torch.isnan(loss[3]) and torch.equal(gx[3], torch.zeros(d))
    ok = torch.arange(b) != 3
    xd, wd = x.double().requires_grad_(), w.double().requires_grad_()
    y_safe = torch.where(ok, y, 0)
    rows = fastcdml.reference.ccl.ccl_loss_rows(xd, y_safe, wd, *HYPER)
    go = torch.randn(b, dtype=torch.float64) * ok
    (rows * go).sum().backward()
    s = fastcdml.reference.ccl.normalize_rows(xd) @ wd.t()
    s[torch.arange(b), y_safe] -= HYPER[1]
    assert_close(lse[ok], torch.logsumexp(s / HYPER[0], 1)[ok], lse[ok], torch.float32, "lse")
    assert_close(loss[ok], rows[ok], loss[ok], torch.float32, "loss rows")
    assert_close(go[:, None] * gx, xd.grad, xd.grad.float(), torch.float32, "grad_x")
    gw = ops.ccl_bwd_centers(x, y, w, lse, go.float(), *HYPER)
    assert_close(gw, wd.grad, wd.grad.float(), torch.float32, "grad_centers")
    assert ops.ccl_fwd(x, y, w, *HYPER, False)[1].shape == (0, d)


def test_ccl_module_training_step():
    b, d, c = 37, 72, 1001
    x = torch.randn(b, d)
    y = torch.randint(0, 40, (b,))
    mods = {k: fastcdml.CenterContrastiveLoss(c, d, backend=k, generator=torch.Generator().manual_seed(1))
            for k in ("cpp", "reference")}
    bank0 = mods["cpp"].centers.clone()
    out = {}
    for k, mod in mods.items():
        xk = x.clone().requires_grad_()
        loss = mod(xk, y)
        loss.backward()
        out[k] = (loss, xk.grad, mod.centers)
    for name, a, e in zip(("loss", "grad", "bank"), out["cpp"], out["reference"]):
        assert_close(a, e, e, torch.float32, f"module {name}")
    assert not torch.equal(mods["cpp"].centers, bank0)  # the update ran


# ---------------------------------------------------------------- CBML

def _cbml_inputs(b, m, d, dtype, ref_dtype, y_max=None):
    x = torch.randn(b, d).to(dtype)
    y = clustered_labels(b)
    r = torch.randn(m, d).to(ref_dtype) if m else None
    yr = torch.randint(0, int(y.max()) + 1 if y_max is None else y_max, (m,)) if m else None
    return x, y, r, yr


def _cbml(x, y, r, yr, backend, mode, **kw):
    """(loss, ∂/∂x, ∂/∂ref or None); mode: self | memory (batch + ref, no gradient to ref) | ref (explicit)."""
    x = x.detach().clone().requires_grad_()
    if r is not None:
        r = r.detach().clone().requires_grad_(mode == "ref")
    loss = contrastive_bayesian_loss(x, y, r, yr if r is not None else None, include_self=mode != "ref",
                                     backend=backend, **kw)
    loss.backward()
    return loss, x.grad, None if r is None else r.grad


def _check_cbml(x, y, r, yr, mode, dtype, **kw):
    got = _cbml(x, y, r, yr, "cpp", mode, **kw)
    exp = _cbml(x.double(), y, None if r is None else r.double(), yr, "reference", mode, **kw)
    low = _cbml(x, y, r, yr, "reference", mode, **kw)
    assert got[0].dtype == torch.float32 and got[1].dtype == x.dtype
    for name, a, e, l in zip(("loss", "grad_x", "grad_ref"), got, exp, low):
        assert (a is None) == (e is None), name
        if e is not None:
            assert_close(a, e, l, dtype, f"cbml {mode} {name} {kw}")
    return got


CBML_OPTIONS = [dict(), dict(phi="sqrt"), dict(negatives="topk", top_k=5), dict(negatives="topk", top_k=100, phi="sqrt"),
                dict(margin=0.0, mean_weight=1.0, variance_weight=0.5), dict(variance_center="boundary"),
                dict(variance_center="boundary", negatives="topk", top_k=5, mean_weight=0.3),
                dict(phi="constant", pos_weight=0.7, neg_weight=0.4, neg_a=0.3, neg_b=0.1),
                dict(margin=0.0, mean_weight=0.0, variance_weight=0.5)]


@pytest.mark.parametrize("kw", CBML_OPTIONS, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()) or "default")
@pytest.mark.parametrize("mode", ["self", "memory", "ref"])
def test_cbml_modes_and_options(mode, kw):
    x, y, r, yr = _cbml_inputs(45, 0 if mode == "self" else 300, 72, torch.float32, torch.float32)
    _check_cbml(x, y, r, yr, mode, torch.float32, **kw)


@pytest.mark.parametrize("ref_dtype", DTYPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["self", "memory", "ref"])
def test_cbml_dtypes(mode, dtype, ref_dtype):
    if mode == "self" and ref_dtype != dtype:
        pytest.skip("no reference set in self mode")
    x, y, r, yr = _cbml_inputs(45, 0 if mode == "self" else 300, 72, dtype, ref_dtype)
    _check_cbml(x, y, r, yr, mode, dtype if dtype != torch.float32 else ref_dtype, negatives="topk", top_k=20)


@pytest.mark.parametrize("case", [(130, 1500, 72, "memory"), (130, 0, 48, "self"), (8, 16400, 16, "ref"),
                                  (1100, 0, 16, "self")],
                         ids=["multi-chunk", "multi-block-self", "no-strip-cache", "uncached-self"])
@pytest.mark.parametrize("kw", [dict(), dict(negatives="topk", top_k=100, variance_center="boundary")],
                         ids=["adaptive", "topk-boundary"])
def test_cbml_large(case, kw):
    b, m, d, mode = case
    x, y, r, yr = _cbml_inputs(b, m, d, torch.float32, torch.float32, y_max=b // 5 if m > 10000 else None)
    _check_cbml(x, y, r, yr, mode, torch.float32, **kw)


def test_cbml_skipped_rows():
    """Singleton classes (no positive), a one-class reference set (no negative), and an all-skipped batch."""
    x, _, r, yr = _cbml_inputs(30, 40, 16, torch.float32, torch.float32)
    y = clustered_labels(30, 1, 3)
    loss = _check_cbml(x, y, r, torch.zeros(40, dtype=torch.long), "memory", torch.float32)[0]
    assert loss != 0
    got = _check_cbml(x, torch.arange(30), None, None, "self", torch.float32)
    assert got[0] == 0 and torch.equal(got[1], torch.zeros_like(got[1]))


@pytest.mark.parametrize("kw", [dict(), dict(negatives="topk", top_k=3)], ids=["adaptive", "topk"])
def test_cbml_ties_pick_lowest_index(kw):
    """One-hot embeddings make every similarity exactly 0 or 1: min / max / top-K ties everywhere. The gradient
    flows through the elements the tie rule picks, so a different rule changes it."""
    basis = torch.eye(8)
    x = basis[torch.randint(0, 8, (40,))] * (1 + torch.rand(40, 1))
    y = torch.randint(0, 4, (40,))
    r = basis[torch.randint(0, 8, (60,))]
    yr = torch.randint(0, 4, (60,))
    _check_cbml(x, y, None, None, "self", torch.float32, **kw)
    _check_cbml(x, y, r, yr, "ref", torch.float32, mean_weight=0.5, **kw)
    _check_cbml(x, y, r, yr, "ref", torch.float32, mean_weight=0.5, variance_center="boundary", **kw)


# ---------------------------------------------------------------- determinism, op contracts, compile, errors

def _all_outputs():
    x, y, w = _ccl_inputs(200, 40, 3000, torch.bfloat16, torch.float32)
    out = list(ops.ccl_fwd(x, y, w, *HYPER, True))
    out.append(ops.ccl_bwd_centers(x, y, w, out[2], torch.randn(200), *HYPER))
    out += ops.ccl_fwd_partials(x, y - 1000, w[:2000], 0.05, 0.1, True)  # a slice owning some labels
    out.append(ops.ccl_bwd_centers(x, y - 1000, w[:2000], out[2], torch.randn(200), *HYPER, 0, 1, out[3], True))
    dense = ops.ccl_fwd_dense(x, y % 1000, w, 0.05, 0.3, 0.0, True, 1, 3)  # ArcFace, 3 sub-centers
    out += list(dense) + [ops.ccl_bwd_centers_dense(x, dense[4], torch.randn(200))]
    columns = w.t().contiguous().t()
    out.append(ops.ccl_normalize_rows(columns))
    out.append(ops.ccl_normalize_rows_backward(out[-1] * 3, columns))
    bank = w.clone()
    ops.ccl_momentum_update_(bank, x, y % 50, 0.9)
    out.append(bank)
    xb, yb, r, yr = _cbml_inputs(200, 3000, 40, torch.float32, torch.float32)
    for k in (0, 50):
        for center in (True, False):
            out += ops.cbml_fwd(xb, yb, r, yr, None, True, 0.5, 0.5, 1.0, 0.01, 0.1, 1.0, 0.2, 0, 0.25, 0.25, center, k,
                                True, True)
    xp, yp = torch.randn(150, 40).to(torch.bfloat16), torch.randint(0, 3000, (150,))  # labels ≥ 2500: other slices
    out += ops.proxy_anchor_fwd(xp, yp, torch.randn(2500, 40), torch.rand(150), torch.tensor(0.01), 1 / 2500, 0.1,
                                32.0, True, True)
    ref, ref_y = torch.randn(2200, 40), torch.randint(0, 30, (2200,))  # 3 blocks of queries, 3 chunks of references
    for kind, params in enumerate(((0.1, 0, 0), (0.1, 0, 0), (2.0, 40.0, 0.5), (0.0, 1.0, 0))):
        out += ops.pair_fwd(xp.float(), yp % 30, ref, ref_y, None, None, kind, *params, True, True)
    return out


def _outputs_with_threads(n):
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(n)
        torch.manual_seed(3)
        return _all_outputs()
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("threads", [2, 3])
def test_results_do_not_depend_on_thread_count(threads):
    # by construction (csrc/common.h): a fixed partition, and products through csrc/gemm.h rather than the BLAS,
    # whose blocking (and so its summation order) may follow the thread count on some CPUs
    for i, (a, b) in enumerate(zip(_outputs_with_threads(1), _outputs_with_threads(threads))):
        assert torch.equal(a, b), f"output {i} differs between 1 and {threads} threads"


def _build_info():
    from fastcdml import _extension
    return _extension.load()[0].build_info()


def _outputs_on(isa: str, tmp_path: Path) -> list[torch.Tensor]:
    """``_all_outputs()`` computed in a child process whose kernels take the ``isa`` path (FASTCDML_CPU_ISA is read
    once per process, so the path cannot change in this one)."""
    out = tmp_path / f"{isa}.pt"
    code = ("import torch, sys; sys.path.insert(0, sys.argv[2]); from tests.test_cpp import _all_outputs, _build_info; "
            "assert _build_info()['isa'] == sys.argv[3], _build_info(); "
            "torch.manual_seed(3); torch.save(_all_outputs(), sys.argv[1])")
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-c", code, str(out), str(root), isa], check=True, cwd=root,
                   env={**os.environ, "FASTCDML_CPU_ISA": isa})
    return torch.load(out)


def test_avx2_and_avx512_paths_are_identical(tmp_path):
    # csrc/gemm.h and csrc/rows.h run the same per-element FMA chains and the same 16-lane sums on both widths: a
    # machine with AVX-512 and one with only AVX2 give the same bits
    if _build_info().get("isa") != "avx512":
        pytest.skip("this CPU has no AVX-512: only the AVX2 path can run here")
    torch.manual_seed(3)
    for i, (a, b) in enumerate(zip(_all_outputs(), _outputs_on("avx2", tmp_path))):
        assert torch.equal(a, b), f"output {i} differs between the AVX-512 and the AVX2 paths"


def test_generic_path_agrees_up_to_rounding(tmp_path):
    # the plain-C++ path (CPUs without FMA, other architectures) rounds each product apart: the same results up
    # to fp32 rounding, which the 16-bit inputs' own rounding dominates
    torch.manual_seed(3)
    for i, (a, b) in enumerate(zip(_all_outputs(), _outputs_on("generic", tmp_path))):
        if a.is_floating_point():
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=f"output {i}")
        else:
            assert torch.equal(a, b), f"output {i}"


def test_opcheck():
    x, y, w = _ccl_inputs(37, 24, 300, torch.float32, torch.float32)
    x.requires_grad_()
    torch.library.opcheck(ops.ccl_fwd.default, (x, y, w, *HYPER, True))
    lse = ops.ccl_fwd(x.detach(), y, w, *HYPER, False)[2]
    torch.library.opcheck(ops.ccl_bwd_centers.default, (x.detach(), y, w, lse, torch.randn(37), *HYPER))
    torch.library.opcheck(ops.ccl_momentum_update_.default, (w.clone(), x.detach(), y, 0.9))
    torch.library.opcheck(ops.ccl_fwd_partials.default, (x.detach(), y - 100, w[:150], 0.05, 0.1, True, 1, 3))
    torch.library.opcheck(ops.ccl_fwd_dense.default, (x, y, w.clone().requires_grad_(), *HYPER, True))
    coef = ops.ccl_fwd_dense(x.detach(), y, w, *HYPER, False)[4]
    torch.library.opcheck(ops.ccl_bwd_centers_dense.default, (x.detach(), coef, torch.randn(37)))
    wt = torch.randn(24, 300).t().requires_grad_()
    torch.library.opcheck(ops.ccl_normalize_rows.default, (wt,))
    torch.library.opcheck(ops.ccl_normalize_rows_backward.default, (torch.randn(300, 24), wt.detach()))
    lq = ops.ccl_fwd(x.detach(), y, w, *HYPER, False)[3]
    torch.library.opcheck(ops.ccl_bwd_centers.default,
                          (x.detach(), y - 100, w[:150], lse, torch.randn(37), *HYPER, 0, 1, lq, True))
    xb, yb, r, yr = _cbml_inputs(45, 60, 24, torch.float32, torch.float32)
    r.requires_grad_()
    hyper = (0.5, 0.5, 1.0, 0.01, 0.1, 1.0, 0.2, 2, 0.25, 0.25, True, 5, True, True)
    torch.library.opcheck(ops.cbml_fwd.default, (xb.requires_grad_(), yb, r, yr, None, True, *hyper))
    mask = pack_pairs(torch.randint(0, 45, (400,)), torch.randint(0, 105, (400,)), 45, 105)
    torch.library.opcheck(ops.cbml_fwd.default, (xb, yb, r, yr, mask, True, *hyper))


@pytest.mark.parametrize("make", [
    lambda: fastcdml.CenterContrastiveLoss(500, 24, backend="cpp", generator=torch.Generator().manual_seed(2)),
    lambda: fastcdml.ArcFaceLoss(500, 24, backend="cpp"),
], ids=["ccl-momentum", "arcface-gradient"])
def test_compile_bank_module(make):
    """torch.compile(fullgraph) of a bank loss on the C++ ops: a momentum bank moves as in eager mode; a bank
    trained by gradient (the dense path, and the fused normalisation) gets the same gradient."""
    b, d = 37, 24
    x, y = torch.randn(b, d), torch.randint(0, 60, (b,))
    eager, compiled = make(), make()
    compiled.load_state_dict(eager.state_dict())
    step = torch.compile(compiled, fullgraph=True, backend="aot_eager")
    for _ in range(2):
        xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
        le, lc = eager(xe, y), step(xc, y)
        le.backward()
        lc.backward()
        assert torch.allclose(le, lc) and torch.allclose(xe.grad, xc.grad)
        for a, c in zip(eager.state_dict().values(), compiled.state_dict().values()):
            assert torch.allclose(a, c)
        for a, c in zip(eager.parameters(), compiled.parameters()):
            assert torch.allclose(a.grad, c.grad)
            a.grad = c.grad = None


def test_bad_inputs():
    x, y, w = _ccl_inputs(8, 16, 10, torch.float32, torch.float32)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\)"):
        center_contrastive_loss(x, torch.full((8,), 10), w, backend="cpp")
    with pytest.raises(TypeError, match="float64"):
        center_contrastive_loss(x.double(), y, w, backend="cpp")
    with pytest.raises(ValueError, match="centers must have shape"):
        center_contrastive_loss(x, y, w[:, :8], backend="cpp")
    with pytest.raises(ValueError, match="NaN or inf"):
        contrastive_bayesian_loss(torch.full((8, 16), float("nan")), y, backend="cpp")
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):  # the op's own checks
        ops.ccl_fwd(x.double(), y, w, *HYPER, True)
    with pytest.raises(ValueError, match="reference set is empty"):
        ops.cbml_fwd(x, y, x[:0], y[:0], None, False, 0.5, 0.5, 1.0, 0.01, 0.1, 1.0, 0.2, 0, 0.25, 0.25, True, 0, False,
                     False)


# ---------------------------------------------------------------- sharded bank: ccl_fwd_partials, foreign_labels

ref_ccl = fastcdml.reference.ccl
PARTIAL_SHAPES = [(1, 1, 1, 1), (37, 72, 203, 1), (70, 72, 1100, 1), (37, 24, 203, 3), (9, 72, 1100, 3)]  # B, D, C, K
FAMILY = [(0.05, 0.1, 0), (0.1, 0.3, 1)]  # temperature, margin, margin_type
PARTIAL_FIELDS = ("m", "l", "lo", "ps", "acc", "c_y")


def _partial_labels(b, c, owned):
    """Labels of a slice of c classes: all owned, none owned (negative and ≥ c), or a mix."""
    if owned == "all":
        return torch.randint(0, c, (b,))
    if owned == "none":
        y = torch.randint(0, 5, (b,))
        return torch.where(torch.rand(b) < 0.5, -1 - y, c + y)
    return torch.randint(-3, c + 3, (b,))


def _check_partials(got, exp, low, dtype, what):
    assert len(got) == 7 and got[6].dtype == torch.int64 and all(t.dtype == torch.float32 for t in got[:6])
    for name, a, e, lw in zip(PARTIAL_FIELDS, got, exp, low):
        assert_close(a, e, lw, dtype, f"partials {name} {what}")
    assert torch.equal(got[6], exp.row_y), f"partials row_y {what}"


@pytest.mark.parametrize("owned", ["all", "none", "mixed"])
@pytest.mark.parametrize("family", FAMILY, ids=["cosine", "angular"])
@pytest.mark.parametrize("shape", PARTIAL_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_ccl_partials_matches_reference(shape, family, owned):
    b, d, c, k = shape
    tau, margin, mt = family
    for dtype, bank_dtype in ((torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                              (torch.float16, torch.float32)):
        x, w = torch.randn(b, d).to(dtype), unit_rows(c * k, d, bank_dtype)
        y = _partial_labels(b, c, owned).to(torch.int32 if b % 2 else torch.int64)
        hyper = (tau, margin, True, mt, k)
        got = ops.ccl_fwd_partials(x, y, w, *hyper)
        exp = ref_ccl.ccl_partials(x.double(), y, w.double(), *hyper)
        low = ref_ccl.ccl_partials(x, y, w, *hyper)
        tol = dtype if dtype != torch.float32 else bank_dtype
        _check_partials(got, exp, low, tol, f"{shape} {family} {owned} {dtype} {bank_dtype}")
        own = (y >= 0) & (y < c)
        assert torch.equal(got[6] >= 0, own) and torch.equal(got[5][~own], torch.zeros(int((~own).sum())))


@pytest.mark.parametrize("b", [0, 5])
def test_ccl_partials_empty_slice_and_shapes(b):
    d = 12
    x, y = torch.randn(b, d), torch.randint(-2, 4, (b,))
    for k in (1, 3):
        for compute_grad in (True, False):
            m, l, lo, ps, acc, c_y, row_y = ops.ccl_fwd_partials(x, y, torch.empty(0, d), 0.05, 0.1, compute_grad, 0, k)
            n = b if compute_grad else 0
            assert (m.shape, ps.shape, acc.shape, row_y.shape) == ((b,), (n,), (n, d), (b,))
            assert torch.equal(m, torch.full((b,), float("-inf")))
            for t in (l, lo, ps, acc, c_y):
                assert torch.equal(t, torch.zeros_like(t))
            assert torch.equal(row_y, torch.full((b,), -1))
    # compute_grad=False on a real slice: the same m, l, lo, c_y, row_y, and empty ps / acc
    w = unit_rows(30, d)
    full = ops.ccl_fwd_partials(x, y, w, 0.05, 0.1, True)
    part = ops.ccl_fwd_partials(x, y, w, 0.05, 0.1, False)
    assert part[3].shape == (0,) and part[4].shape == (0, d)
    for i in (0, 1, 2, 5, 6):
        assert torch.equal(full[i], part[i])


def _slices(c, cuts):
    """[(start, stop)] of uneven slices of c classes at the given cut points (an empty slice allowed)."""
    edges = [0, *cuts, c]
    return list(zip(edges[:-1], edges[1:]))


@pytest.mark.parametrize("case", [(37, 72, 203, 1, (50, 51)), (70, 24, 1300, 3, (1100,)), (16, 8, 9, 2, (3, 3, 7))],
                         ids=["3-slices", "2-slices-K3", "with-empty"])
@pytest.mark.parametrize("family", FAMILY, ids=["cosine", "angular"])
def test_ccl_partials_combine_to_loss(case, family):
    """Partials of uneven slices, merged and finished by the reference's merge_partials and ccl_epilogue, give the
    loss rows of the whole bank and (through acc and ps) the query gradient."""
    b, d, c, k, cuts = case
    tau, margin, mt = family
    lam = 1.0
    x, w = torch.randn(b, d), unit_rows(c * k, d)
    y = torch.randint(0, c, (b,))
    parts = [[t.double() for t in ops.ccl_fwd_partials(x, y - c0, w[c0 * k:c1 * k], tau, margin, True, mt, k)]
             for c0, c1 in _slices(c, cuts)]
    m, l, lo, ps, acc, c_y, row_y = (torch.stack([p[i] for p in parts]) for i in range(7))
    big, den, lo_sum, ps_sum, acc_sum = ref_ccl.merge_partials(m, l, lo, ps, acc)
    lse, q = big + den.log(), lo_sum / den
    cy = c_y.sum(0)  # only the owning slice has it
    offsets = torch.tensor([c0 * k for c0, _ in _slices(c, cuts)], dtype=torch.float64)[:, None]
    row = ((row_y + offsets) * (row_y >= 0)).sum(0).long()  # each slice's row_y is slice-local
    assert torch.equal(row, ref_ccl.subcenter_rows(w, x, y, k))

    xd, wd = x.double().requires_grad_(), w.double()
    loss, gx = ref_ccl.ccl_epilogue(x.double(), cy, lse, q, tau, margin, lam, mt, mean_row=acc_sum / den[:, None],
                                    mean_dot=ps_sum / den, w_y=wd[row])
    rows = ref_ccl.ccl_loss_rows(xd, y, wd, tau, margin, lam, mt, k)
    go = torch.randn(b, dtype=torch.float64)
    (rows * go).sum().backward()
    low = ref_ccl.ccl_loss_rows(x, y, w, tau, margin, lam, mt, k)
    assert_close(loss, rows, low, torch.float32, "combined loss rows")

    gx = gx * go[:, None]
    xl = x.clone().requires_grad_()
    (ref_ccl.ccl_loss_rows(xl, y, w, tau, margin, lam, mt, k) * go.float()).sum().backward()
    assert_close(gx, xd.grad, xl.grad, torch.float32, "combined query gradient")


@pytest.mark.parametrize("case", [(37, 72, 203, 1, (50, 51)), (70, 24, 1300, 3, (1100,)), (16, 8, 9, 2, (3, 3, 7))],
                         ids=["3-slices", "2-slices-K3", "with-empty"])
@pytest.mark.parametrize("family", FAMILY, ids=["cosine", "angular"])
def test_ccl_bwd_centers_foreign_labels(case, family):
    """Each slice's gradient with foreign_labels vs ccl_slice_centers_grad, and their concatenation vs autograd of
    the whole bank's loss."""
    b, d, c, k, cuts = case
    tau, margin, mt = family
    lam = 0.5
    x, w = torch.randn(b, d), unit_rows(c * k, d)
    y = torch.randint(0, c, (b,))
    g = torch.randn(b)
    _, _, lse, q = ops.ccl_fwd(x, y, w, tau, margin, lam, False, mt, k)
    p64 = ref_ccl.ccl_partials(x.double(), y, w.double(), tau, margin, False, mt, k)
    lse64, q64 = p64.m + p64.l.log(), p64.lo / p64.l
    hyper = (tau, margin, lam, mt, k)
    grads = []
    for c0, c1 in _slices(c, cuts):
        ys, ws = y - c0, w[c0 * k:c1 * k]
        got = ops.ccl_bwd_centers(x, ys, ws, lse, g, *hyper, q, True)
        exp = ref_ccl.ccl_slice_centers_grad(x.double(), ys, ws.double(), lse64, q64, g.double(), *hyper)
        low = ref_ccl.ccl_slice_centers_grad(x, ys, ws, lse, q, g, *hyper)
        assert got.shape == ws.shape and got.dtype == torch.float32
        assert_close(got, exp, low, torch.float32, f"slice grad [{c0}, {c1})")
        # without the flag a foreign row contributes nothing: the same as the flag with its grad_output zeroed
        own = (ys >= 0) & (ys < c1 - c0)
        plain = ops.ccl_bwd_centers(x, ys, ws, lse, g, *hyper, q)
        assert torch.equal(plain, ops.ccl_bwd_centers(x, ys, ws, lse, g * own, *hyper, q, True))
        grads.append(got)
    wd = w.double().requires_grad_()
    (ref_ccl.ccl_loss_rows(x.double(), y, wd, *hyper) * g.double()).sum().backward()
    wl = w.clone().requires_grad_()
    (ref_ccl.ccl_loss_rows(x, y, wl, *hyper) * g).sum().backward()
    assert_close(torch.cat(grads), wd.grad, wl.grad, torch.float32, "sum of slice grads vs the bank's gradient")


def test_ccl_partials_bad_inputs():
    x, y, w = _ccl_inputs(8, 16, 10, torch.float32, torch.float32)
    with pytest.raises(ValueError, match=r"centers must have shape \(C, 16\)"):
        ops.ccl_fwd_partials(x, y, w[:, :8], 0.05, 0.1, True)
    with pytest.raises(ValueError, match="not a multiple of sub_centers=3"):
        ops.ccl_fwd_partials(x, y, w, 0.05, 0.1, True, 0, 3)
    with pytest.raises(ValueError, match=r"labels must have shape \(8,\)"):
        ops.ccl_fwd_partials(x, y[:5], w, 0.05, 0.1, True)
    with pytest.raises(TypeError, match="x must be float32, bfloat16 or float16"):
        ops.ccl_fwd_partials(x.double(), y, w, 0.05, 0.1, True)
    with pytest.raises(ValueError, match="margin_type must be 0"):
        ops.ccl_fwd_partials(x, y, w, 0.05, 0.1, True, 2)
    with pytest.raises(ValueError, match=r"centers must have shape \(C, 16\)"):
        ops.ccl_bwd_centers(x, y, w[:, :8], torch.zeros(8), torch.ones(8), *HYPER, 0, 1, None, True)

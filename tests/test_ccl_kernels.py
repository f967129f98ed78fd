"""CCL Triton kernels (``fastcdml/kernels/ccl.py``) vs the float64 reference.

On a machine without CUDA the kernels run in the Triton interpreter on CPU tensors (``fastcdml_interpret`` ops,
conftest sets ``TRITON_INTERPRET=1``); with CUDA the same tests run on the GPU, plus the ``gpu``-marked ones.
Every kernel output is poisoned (NaN) before the kernel runs (autouse fixture in conftest).
"""
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastcdml import CenterContrastiveLoss
from fastcdml._backend import unavailable_reason
from fastcdml.functional import center_contrastive_loss, center_momentum_update_
from fastcdml.reference import ccl as ref

from .conftest import DEVICE
from .helpers import assert_close, lowest, rel_err, unit_rows

pytestmark = pytest.mark.skipif(unavailable_reason("triton", "ccl", DEVICE.type) is not None,
                                reason=str(unavailable_reason("triton", "ccl", DEVICE.type)))

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
# (x dtype, bank dtype): every supported input with the default fp32 bank, and the bf16 bank.
DTYPE_PAIRS = [(F32, F32), (BF16, F32), (F16, F32), (F32, BF16), (BF16, BF16)]
HYPER = dict(temperature=0.05, margin=0.1, center_weight=1.0)


def kernels():
    from fastcdml.kernels import ccl
    return ccl


def ops():
    return torch.ops.fastcdml_interpret if DEVICE.type == "cpu" else torch.ops.fastcdml


def make(b, c, d, x_dtype=F32, bank_dtype=F32, n_classes=None):
    """Labels in [0, n_classes or c), unit bank rows, and rows x_i = r_i·(a_i W_{y_i} + (1 − a_i) n_i) with
    n_i random unit, a_i ~ U(0, 1) and r_i ~ U(0.1, 4): from unrelated to trained queries (p_iy near 1)."""
    w = unit_rows(c, d, torch.float64)
    y = torch.randint(0, n_classes or c, (b,))
    a = torch.rand(b, 1, dtype=torch.float64)
    x = (a * w[y] + (1 - a) * unit_rows(b, d, torch.float64)) * torch.rand(b, 1, dtype=torch.float64).mul(4).add(0.1)
    return x.to(DEVICE, x_dtype), y.to(DEVICE), w.to(DEVICE, bank_dtype)


def reference_rows_and_grads(x, y, w, g, hyper, *, centers_grad=False):
    """(loss rows, ∂(g·L)/∂x, ∂(g·L)/∂W or None) of the reference on exactly these tensors (fp64 or their dtype)."""
    x = x.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_(centers_grad)
    rows = ref.ccl_loss_rows(x, y, w, **hyper)
    grads = torch.autograd.grad(rows, [x, w] if centers_grad else [x], g.to(rows.dtype))
    return rows.detach(), grads[0], grads[1] if centers_grad else None


def check_against_reference(x, y, w, rows, gx, g, hyper, gw=None):
    """Kernel results (rows, gx[, gw]) vs the float64 reference, bound by the reference's error in this dtype."""
    dtype = lowest(x.dtype, w.dtype)
    rows64, gx64, gw64 = reference_rows_and_grads(x.double(), y, w.double(), g.double(), hyper,
                                                  centers_grad=gw is not None)
    rows_lp, gx_lp, gw_lp = reference_rows_and_grads(x, y, w, g, hyper, centers_grad=gw is not None)
    assert_close(rows, rows64, rows_lp, dtype, "loss rows")
    assert_close(gx, gx64, gx_lp, dtype, "query gradient")
    if gw is not None:
        assert_close(gw, gw64, gw_lp, dtype, "center gradient")


# --- forward + query gradient ------------------------------------------------------------------------------------

@pytest.mark.parametrize("x_dtype,bank_dtype", DTYPE_PAIRS)
@pytest.mark.parametrize("b,c,d,margin", [(1, 1, 1, 0.1), (37, 203, 72, 0.1), (37, 203, 72, 0.0)])
def test_loss_and_query_gradient(x_dtype, bank_dtype, b, c, d, margin):
    hyper = dict(HYPER, margin=margin)
    x, y, w = make(b, c, d, x_dtype, bank_dtype)
    xk = x.clone().requires_grad_()
    g = torch.randn(b, device=DEVICE)
    rows = center_contrastive_loss(xk, y, w, **hyper, reduction="none", backend="triton")
    (gx,) = torch.autograd.grad(rows, xk, g)
    assert rows.dtype == F32 and gx.dtype == x_dtype
    check_against_reference(x, y, w, rows, gx, g, hyper)


@pytest.mark.parametrize("split", [1, 5])
@pytest.mark.parametrize("dv_split", [1, 2])
@pytest.mark.parametrize("b,c,d", [(37, 1001, 72), (70, 130, 40)])
def test_split_paths_direct(split, dv_split, b, c, d):
    """Split-C partials + combine vs the fused epilogue, with and without the D-split of the accumulator."""
    k = kernels()
    x, y, w = make(b, c, d)
    cfg = k.default_config(d, x.dtype, w.dtype)._replace(dv_split=dv_split)
    hyper = dict(HYPER, margin=0.25, center_weight=0.5)
    args = (x, y, w, hyper["temperature"], hyper["margin"], hyper["center_weight"])
    rows, gx, lse, _ = k.ccl_fwd(*args, True, config=cfg, split=split)
    ones = torch.ones(b, device=DEVICE)
    check_against_reference(x, y, w, rows, gx, ones, hyper)
    z = (ref.normalize_rows(x.double()) @ w.double().t()
         - hyper["margin"] * torch.nn.functional.one_hot(y, c).double()) / hyper["temperature"]
    assert rel_err(lse, torch.logsumexp(z, 1)) < 1e-5
    rows_nograd, gx_nograd, lse_nograd, _ = k.ccl_fwd(*args, False, config=cfg, split=split)
    assert gx_nograd.shape == (0, d)
    torch.testing.assert_close(rows_nograd, rows, rtol=1e-6, atol=1e-6)  # same products, no second GEMM
    torch.testing.assert_close(lse_nograd, lse, rtol=1e-6, atol=1e-6)


def test_default_split_heuristic():
    k = kernels()
    cfg = k.Config(64, 32, 1, 8, 2)
    sms = 132
    assert k.default_split(256, 100, cfg, sms, 1) == 1  # C too small to divide
    assert k.default_split(64 * sms, 10**6, cfg, sms, 1) == 1  # B alone fills the machine
    assert k.default_split(64 * sms, 10**6, cfg, sms, 2) == 2  # two programs per SM: a second one per row block
    assert k.default_split(64, 10**6, cfg, sms, 1) == sms  # one row block: one wave of splits
    assert k.default_split(64, 10**6, cfg._replace(dv_split=2), sms, 1) == sms // 2  # D-split programs count
    assert k.default_split(64, 32 * 4 * 2, cfg, sms, 1) == 2  # ≥ 4 tiles per split


@pytest.mark.parametrize("precision", ["highest", "high", "medium"])
def test_fp32_products_follow_torch_matmul_precision(precision):
    """fp32 queries and bank: "highest" is fp32-accurate (tf32x3 on a GPU), "high" one tf32 product (the
    interpreter computes it in fp32), "medium" rounds the operands to bf16 — and then errs like bf16 does."""
    k = kernels()
    x, y, w = make(37, 203, 72)
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        rows, gx, _, _ = k.ccl_fwd(x, y, w, *HYPER.values(), True)
    finally:
        torch.set_float32_matmul_precision(before)
    rows64, gx64, _ = reference_rows_and_grads(x.double(), y, w.double(), torch.ones(37, dtype=torch.float64), HYPER)
    err = max(rel_err(rows, rows64), rel_err(gx, gx64))
    if precision == "medium":
        rows16, gx16, _ = reference_rows_and_grads(x.bfloat16(), y, w.bfloat16(), torch.ones(37), HYPER)
        assert 1e-4 < err <= 2 * max(rel_err(rows16, rows64), rel_err(gx16, gx64)) + 1e-2
    elif precision == "highest" or DEVICE.type == "cpu":
        assert err < 1e-5
    else:
        assert err < 1e-2  # tf32: 10-bit mantissa products


# --- learnable-proxy gradient ------------------------------------------------------------------------------------

@pytest.mark.parametrize("x_dtype,bank_dtype", [(F32, F32), (F16, F32), (BF16, BF16), (F32, BF16)])
@pytest.mark.parametrize("b,c,d", [(1, 1, 3), (37, 203, 72)])
def test_proxy_gradient(x_dtype, bank_dtype, b, c, d):
    hyper = dict(HYPER, margin=0.2, center_weight=0.7)
    x, y, w = make(b, c, d, x_dtype, bank_dtype)
    xk, wk = x.clone().requires_grad_(), w.clone().requires_grad_()
    g = torch.randn(b, device=DEVICE)
    rows = center_contrastive_loss(xk, y, wk, **hyper, reduction="none", backend="triton")
    gx, gw = torch.autograd.grad(rows, [xk, wk], g)
    assert gw.dtype == bank_dtype
    check_against_reference(x, y, w, rows, gx, g, hyper, gw=gw)


def test_proxy_gradient_dv_split():
    k = kernels()
    x, y, w = make(20, 90, 40)
    g = torch.randn(20, device=DEVICE)
    _, _, lse, _ = k.ccl_fwd(x, y, w, 0.1, 0.1, 1.0, False)
    gw = k.ccl_bwd_centers(x, y, w, lse, g, 0.1, 0.1, 1.0,
                           config=k.default_config(40, x.dtype, w.dtype)._replace(dv_split=2, rows=16))
    _, _, gw64 = reference_rows_and_grads(x.double(), y, w.double(), g.double(), dict(HYPER, temperature=0.1),
                                          centers_grad=True)
    _, _, gw32 = reference_rows_and_grads(x, y, w, g, dict(HYPER, temperature=0.1), centers_grad=True)
    assert_close(gw, gw64, gw32, F32, "center gradient")


# --- per-slice partials (the class-sharded step) ----------------------------------------------------------------

def normalized_partials(p):
    """What the combine uses from partials, free of the arbitrary max: (lse, q = lo/l, acc/l, ps/l, c_y)."""
    return (p[0] + torch.log(p[1]), p[2] / p[1], p[4] / p[1][:, None], p[3] / p[1], p[5])


SLICE_LABELS = {"owned": lambda y, c: y, "foreign": lambda y, c: torch.where(y % 2 == 0, -1 - y, c + y),
                "mixed": lambda y, c: torch.where(y % 3 == 0, c + y, y)}


@pytest.mark.parametrize("x_dtype,bank_dtype,b,c,d,k,margin_type,owner,split", [
    (F32, F32, 1, 1, 1, 1, 0, "owned", None),
    (F32, F32, 37, 203, 72, 1, 0, "mixed", None),
    (BF16, F32, 37, 203, 72, 1, 1, "owned", 1),
    (F16, F32, 37, 61, 40, 1, 0, "foreign", None),
    (F32, BF16, 20, 61, 40, 3, 1, "mixed", 3),
    (BF16, BF16, 20, 30, 24, 2, 0, "mixed", None),
])
def test_partials_match_reference(x_dtype, bank_dtype, b, c, d, k, margin_type, owner, split):
    """``ccl_fwd_partials`` over one slice vs the float64 reference: labels of the slice, of other slices (negative
    and ≥ C) or both; ragged sizes, sub-centers, both margins, split and unsplit passes."""
    x, y, _ = make(b, c, d, x_dtype, bank_dtype)
    w = unit_rows(c * k, d, bank_dtype, DEVICE)
    y = SLICE_LABELS[owner](y, c)
    hyper = (0.1, 0.3 if margin_type else 0.2)
    out = kernels().ccl_fwd_partials(x, y, w, *hyper, True, margin_type, k, split=split)
    r64 = ref.ccl_partials(x.double(), y, w.double(), *hyper, True, margin_type, k)
    r_lp = ref.ccl_partials(x, y, w, *hyper, True, margin_type, k)
    assert [t.dtype for t in out] == [F32] * 6 + [torch.int64]
    dtype = lowest(x_dtype, bank_dtype)
    names = ("lse", "1 - p_y", "acc / l", "ps / l", "c_y")
    for name, a, e, e_lp in zip(names, *map(normalized_partials, (out, r64, r_lp))):
        if k > 1 and dtype != F32 and name in ("acc / l", "ps / l"):
            continue  # 16-bit operands may pick the other sub-center of a near tie (test_margin_kernels.py)
        assert_close(a, e, e_lp, dtype, name)
    owned = (y >= 0) & (y < c)
    assert torch.equal(out[6] >= 0, owned) and torch.equal(out[5][~owned], torch.zeros_like(out[5][~owned]))
    if dtype == F32:  # the argmax sub-center (16-bit operands may flip a near tie)
        assert torch.equal(out[6], r64.row_y)
    no_grad = kernels().ccl_fwd_partials(x, y, w, *hyper, False, margin_type, k, split=split)
    assert no_grad[3].shape == (0,) and no_grad[4].shape == (0, d)
    for a, e in zip(no_grad[:3] + no_grad[5:], out[:3] + out[5:]):
        torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("b", [0, 5])
def test_partials_of_an_empty_slice(b):
    x, y, _ = make(max(b, 1), 4, 24)
    x, y = x[:b], y[:b]
    m, l, lo, ps, acc, c_y, row_y = ops().ccl_fwd_partials(x, y, torch.empty(0, 24, device=DEVICE), 0.1, 0.1, True)
    assert m.shape == (b,) and bool((m == -math.inf).all()) and acc.shape == (b, 24)
    for t in (l, lo, ps, acc, c_y):
        assert not t.any()
    assert bool((row_y == -1).all())


def test_operand_dtype_is_what_the_products_round_to():
    """``operand_dtype`` (what the sharded loss rounds the label's W_y to) follows the kernels' product choice."""
    from fastcdml._backend import resolve

    k = kernels()
    assert k.operand_dtype(F16, F32) == F16 and k.operand_dtype(BF16, F32) == BF16
    assert k.operand_dtype(F32, BF16) == BF16 and k.operand_dtype(F16, BF16) == BF16
    assert k.operand_dtype(F32, F32) == F32
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        assert k.operand_dtype(F32, F32) == BF16
    finally:
        torch.set_float32_matmul_precision(before)
    assert resolve("triton", "ccl", DEVICE).operand_dtype(F16, F32) == F16
    assert resolve("reference", "ccl", DEVICE).operand_dtype(F16, F32) == F32


@pytest.mark.parametrize("k,margin_type", [(1, 0), (3, 1)])
def test_slice_proxy_gradients_add_up(k, margin_type):
    """``ccl_bwd_centers(foreign_labels=True)`` per slice from the combined global lse and q: each slice matches the
    reference, and the slices together give the proxy gradient of the whole bank (against float64 autograd)."""
    b, c, d = 29, 23, 40
    x, y, _ = make(b, c, d)
    w = unit_rows(c * k, d, F32, DEVICE)
    hyper = dict(temperature=0.1, margin=0.3, center_weight=0.5, margin_type=margin_type, sub_centers=k)
    bounds = [0, 9, 9, 23]  # uneven, one empty
    slices = [(a * k, e * k, y - a) for a, e in zip(bounds, bounds[1:])]
    parts = [ops().ccl_fwd_partials(x, local, w[r0:r1], hyper["temperature"], hyper["margin"], False, margin_type, k)
             for r0, r1, local in slices]
    m_all = torch.stack([p[0] for p in parts]).max(dim=0).values
    scale = [torch.exp(p[0] - m_all) for p in parts]
    l_all = sum(s * p[1] for s, p in zip(scale, parts))
    lse, q = m_all + torch.log(l_all), sum(s * p[2] for s, p in zip(scale, parts)) / l_all
    g = torch.randn(b, device=DEVICE)
    grads = []
    for r0, r1, local in slices:
        got = ops().ccl_bwd_centers(x, local, w[r0:r1], lse, g, *hyper.values(), q, True)
        expected = ref.ccl_slice_centers_grad(x.double(), local, w[r0:r1].double(), lse.double(), q.double(),
                                              g.double(), *hyper.values())
        assert_close(got, expected, expected.float(), F32, f"slice [{r0}, {r1}) gradient")
        grads.append(got)
    wr = w.double().requires_grad_()
    (full,) = torch.autograd.grad(ref.ccl_loss_rows(x.double(), y, wr, *hyper.values()), wr, g.double())
    assert rel_err(torch.cat(grads), full) < 1e-4
    unflagged = ops().ccl_bwd_centers(x, slices[2][2], w[slices[2][0]:], lse, g, *hyper.values(), q)
    assert rel_err(unflagged, grads[2]) > 1e-2  # without the flag the foreign rows' negatives are missing


# --- momentum update ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("x_dtype,bank_dtype", DTYPE_PAIRS)
@pytest.mark.parametrize("mu", [0.0, 0.9])
def test_update_matches_reference(x_dtype, bank_dtype, mu):
    # 37 rows over 6 of 50 classes: segments longer than the kernel's rows per step, most classes absent.
    x, y, w = make(37, 50, 72, x_dtype, bank_dtype, n_classes=6)
    y = y * 7 + 3
    y[::2] = 10  # one class with ≥ 19 rows
    before = w.clone()
    bank = center_momentum_update_(w.clone(), x, y, mu, backend="triton")
    expected = ref.ccl_momentum_update_(before.double(), x.double(), y, mu)
    lowp = ref.ccl_momentum_update_(before.clone(), x, y, mu)
    assert_close(bank, expected, lowp, lowest(x_dtype, bank_dtype), "updated bank")
    present = torch.zeros(50, dtype=torch.bool, device=DEVICE)
    present[y] = True
    assert torch.equal(bank[~present], before[~present])  # absent classes: bit-identical
    torch.testing.assert_close(bank[present].double().norm(dim=1), torch.ones(int(present.sum()), dtype=torch.float64,
                               device=DEVICE), atol=1e-2 if bank_dtype == BF16 else 1e-6, rtol=0)


def test_update_deterministic_and_order_independent():
    x, y, w = make(48, 9, 33, n_classes=4)
    runs = [center_momentum_update_(w.clone(), x, y, 0.5, backend="triton") for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    perm = torch.randperm(48, device=DEVICE)
    permuted = center_momentum_update_(w.clone(), x[perm], y[perm], 0.5, backend="triton")
    torch.testing.assert_close(permuted, runs[0], rtol=0, atol=1e-6)
    assert not torch.equal(runs[0], w)


def test_forward_deterministic():
    k = kernels()
    x, y, w = make(37, 150, 24)
    first = k.ccl_fwd(x, y, w, 0.05, 0.1, 1.0, True, split=3)
    second = k.ccl_fwd(x, y, w, 0.05, 0.1, 1.0, True, split=3)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


# --- degenerate inputs -------------------------------------------------------------------------------------------

def test_unchecked_bad_rows_give_nan_and_keep_bank():
    x, y, w = make(12, 20, 16)
    y[y == 11] = 12
    y[3], y[7], y[5] = 20, -1, 11  # two labels out of range; class 11 only in row 5, which is not finite
    x[5, 2] = float("nan")
    xk = x.clone().requires_grad_()
    rows = center_contrastive_loss(xk, y, w, **HYPER, reduction="none", backend="triton", check_inputs=False)
    (gx,) = torch.autograd.grad(rows, xk, torch.ones_like(rows))
    bad = torch.zeros(12, dtype=torch.bool, device=DEVICE)
    bad[[3, 5, 7]] = True
    assert rows[bad].isnan().all() and rows[~bad].isfinite().all()
    assert gx[bad].isnan().all() and gx[~bad].isfinite().all()
    bank = center_momentum_update_(w.clone(), x, y, 0.9, backend="triton", check_inputs=False)
    assert torch.equal(bank[11], w[11])
    expected = ref.ccl_momentum_update_(w.double(), x.double(), y, 0.9)  # skips the same rows and classes
    torch.testing.assert_close(bank.double(), expected, rtol=0, atol=1e-6)


# --- op machinery ------------------------------------------------------------------------------------------------

def test_opcheck():
    x, y, w = make(5, 7, 20, BF16)
    lse = torch.randn(5, device=DEVICE)
    g = torch.randn(5, device=DEVICE)
    torch.library.opcheck(ops().ccl_fwd, (x.float().requires_grad_(), y, w.requires_grad_(), 0.1, 0.1, 1.0, True))
    torch.library.opcheck(ops().ccl_fwd, (x, y, w.detach(), 0.1, 0.0, 0.5, False))
    torch.library.opcheck(ops().ccl_bwd_centers, (x, y, w.detach(), lse, g, 0.1, 0.1, 1.0))
    torch.library.opcheck(ops().ccl_momentum_update_, (w.detach().clone(), x, y, 0.9))
    torch.library.opcheck(ops().ccl_fwd_partials, (x, y - 3, w.detach(), 0.1, 0.1, True, 1, 1))
    torch.library.opcheck(ops().ccl_bwd_centers, (x, y - 3, w.detach(), lse, g, 0.1, 0.1, 1.0, 0, 1, lse.sigmoid(),
                                                  True))


def test_module_compiles_fullgraph():
    """One training step of the module through torch.compile(fullgraph=True) matches eager."""
    torch._dynamo.reset()
    losses = [CenterContrastiveLoss(30, 24, backend="triton").to(DEVICE) for _ in range(2)]
    losses[1].load_state_dict(losses[0].state_dict())
    x, y, _ = make(9, 30, 24)
    compiled = torch.compile(losses[1], fullgraph=True)
    results = []
    for fn in (losses[0], compiled):
        xk = x.clone().requires_grad_()
        loss = fn(xk, y)
        loss.backward()
        results.append((loss.detach(), xk.grad))
    torch.testing.assert_close(results[1], results[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses[1].centers, losses[0].centers, rtol=0, atol=1e-6)


_AUTOTUNE_SCRIPT = """
import torch
from fastcdml.kernels import _tuning, ccl as k
from fastcdml.reference import ccl as ref
assert _tuning.autotune()
x, y = torch.randn(20, 24), torch.randint(0, 50, (20,))
w = torch.nn.functional.normalize(torch.randn(50, 24), dim=1)
xr, wr = x.double().requires_grad_(), w.double().requires_grad_()
ref.ccl_loss_rows(xr, y, wr, 0.1, 0.1, 1.0).sum().backward()
expected = ref.ccl_loss_rows(x.double(), y, w.double(), 0.1, 0.1, 1.0)
for split in (1, 2):
    rows, gx, lse, _ = k.ccl_fwd(x, y, w, 0.1, 0.1, 1.0, True, split=split)
    gw = k.ccl_bwd_centers(x, y, w, lse, torch.ones(20), 0.1, 0.1, 1.0)
    for a, b in ((rows, expected), (gx, xr.grad), (gw, wr.grad)):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5)
"""


@pytest.mark.skipif(DEVICE.type == "cuda", reason="autotuning on a GPU compiles every config (minutes)")
def test_autotune_plumbing():
    """FASTCDML_AUTOTUNE=1 (one config under the interpreter): grids, pruning and keys work, results unchanged."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "FASTCDML_AUTOTUNE": "1"}
    done = subprocess.run([sys.executable, "-c", _AUTOTUNE_SCRIPT], env=env, cwd=Path(__file__).parents[1],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


# --- GPU only ----------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("x_dtype,bank_dtype", [(BF16, F32), (BF16, BF16), (F32, F32)])
@pytest.mark.parametrize("b,c,d", [(256, 100, 128), (512, 11318, 512), (96, 40000, 256), (300, 5000, 1000)])
def test_gpu_large_shapes(x_dtype, bank_dtype, b, c, d):
    x, y, w = make(b, c, d, x_dtype, bank_dtype)
    xk, wk = x.clone().requires_grad_(), w.clone().requires_grad_()
    g = torch.randn(b, device=DEVICE)
    rows = center_contrastive_loss(xk, y, wk, **HYPER, reduction="none", backend="triton")
    gx, gw = torch.autograd.grad(rows, [xk, wk], g)
    check_against_reference(x, y, w, rows, gx, g, HYPER, gw=gw)


@pytest.mark.gpu
def test_gpu_cuda_graph_training_step():
    """A whole step (forward, backward, momentum update) captured in a CUDA graph: no host synchronisation."""
    loss_fn = CenterContrastiveLoss(1000, 128, backend="triton", check_inputs=False).cuda()
    eager = CenterContrastiveLoss(1000, 128, backend="triton", check_inputs=False).cuda()
    eager.load_state_dict(loss_fn.state_dict())
    x = torch.randn(256, 128, device="cuda", requires_grad=True)
    y = torch.randint(0, 1000, (256,), device="cuda")

    def step():
        x.grad = None
        loss = loss_fn(x, y)
        loss.backward()
        return loss

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm-up compiles the kernels
            step()
    torch.cuda.current_stream().wait_stream(stream)
    eager.load_state_dict(loss_fn.state_dict())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss = step()
    graph.replay()
    xe = x.detach().clone().requires_grad_()
    expected = eager(xe, y)
    expected.backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(x.grad, xe.grad)
    torch.testing.assert_close(loss_fn.centers, eager.centers)

"""The margin-softmax family on the CCL kernels (additive cosine / angular target transform, K sub-centers) vs the
float64 reference, on every fused backend: Triton (interpreter on CPU, or CUDA) and C++.

Forward, query gradient (through the op's autograd with a random grad_output) and proxy gradient
(``ccl_bwd_centers``), ragged shapes, every supported dtype pair, tolerances of ``tests/helpers.py``; Triton
outputs are poisoned (conftest). The family members: CosFace / NormalizedSoftmax (additive cosine, λ = 0), ArcFace
(additive angular), SubCenterArcFace (angular, K = 3: padded to 4 slots), and CCL with sub-centers (additive
cosine, λ > 0, K = 2 and K = 5), and SoftTriple's softmax-weighted mean over the K rows (γ > 0; with the angular
margin and λ > 0 too, which no PML class combines but the kernels allow). Equality with PML's classes is tested in
``tests/test_margin.py`` and ``tests/test_proxy_softmax.py``.
"""
import dataclasses
import math

import pytest
import torch

from fastcdml.ops import ccl as ccl_ops
from fastcdml.params import CenterParams
from fastcdml.reference import ccl as ref

from .conftest import DEVICE
from .helpers import assert_close, kernel_backends, lowest, unit_rows

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
ARC = math.radians(28.6)
FAMILY = {  # name -> CenterParams
    "cosface": CenterParams(1 / 64, 0.35, 0.0),
    "arcface": CenterParams(1 / 64, ARC, 0.0, margin_type=1),
    "subcenter_arcface": CenterParams(1 / 64, ARC, 0.0, margin_type=1, sub_centers=3),
    "ccl_k2": CenterParams(0.05, 0.1, 0.7, sub_centers=2),
    "ccl_k5_arc": CenterParams(0.1, 0.5, 0.3, margin_type=1, sub_centers=5),
    "soft_triple": CenterParams(1 / 20, 0.01, 0.0, sub_centers=3, gamma=0.1),
    "soft_k5_arc": CenterParams(0.1, 0.5, 0.3, margin_type=1, sub_centers=5, gamma=0.05),
}
BACKENDS = kernel_backends("ccl", DEVICE)


def ops_of(backend):
    return getattr(torch.ops, "fastcdml_interpret" if backend == "triton" and DEVICE.type == "cpu" else "fastcdml")


def make(b, c, d, k, x_dtype=F32, bank_dtype=F32):
    """Unit bank rows (C·K, D), labels, and queries from unrelated to within ~6° of one sub-center of their class,
    one of them nearly opposite to it (the angular fallback branch) when b > 2. (Closer than that, ArcFace's
    ∂t/∂c = cos m + c·sin m / sin θ grows as 1/θ and fp32 itself cannot resolve 1 − c: at θ = 0.06° every fp32
    computation, the reference's included, is off by ~1e-2; ``test_trained_queries`` covers 1.5°–6°.)"""
    w = unit_rows(c * k, d, torch.float64)
    y = torch.randint(0, c, (b,))
    own = w[y * k + torch.randint(0, k, (b,))]
    a = 0.9 * torch.rand(b, 1, dtype=torch.float64)
    x = (a * own + (1 - a) * unit_rows(b, d, torch.float64)) * torch.rand(b, 1, dtype=torch.float64).mul(4).add(0.1)
    if b > 2:
        x[1] = -w[y[1] * k: y[1] * k + k].sum(0) + 0.05 * unit_rows(1, d, torch.float64)[0]
    return x.to(DEVICE, x_dtype), y.to(DEVICE), w.to(DEVICE, bank_dtype)


def reference_grads(x, y, w, g, params):
    xr, wr = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    rows = ref.ccl_loss_rows(xr, y, wr, *params.as_args(), gamma=params.gamma)
    gx, gw = torch.autograd.grad(rows, [xr, wr], g.to(rows.dtype))
    return rows.detach(), gx, gw


def check(backend, x, y, w, params, what="", g=None, parts=3):
    """Op rows, ∂/∂x and ∂/∂W of ``backend`` vs the float64 reference (bound: the reference's own error in the
    inputs' dtype); ``parts=1`` checks the loss rows only."""
    xk, wk = x.clone().requires_grad_(), w.clone().requires_grad_()
    g = torch.randn(x.shape[0], device=DEVICE) if g is None else g
    rows = ccl_ops.ccl_loss_rows(ops_of(backend), xk, y, wk, *params.as_args(), gamma=params.gamma)
    gx, gw = torch.autograd.grad(rows, [xk, wk], g)
    assert rows.dtype == F32 and gx.dtype == x.dtype and gw.dtype == w.dtype
    dtype = lowest(x.dtype, w.dtype)
    expected = reference_grads(x.double(), y, w.double(), g.double(), params)
    lowp = reference_grads(x, y, w, g, params)
    names = ("loss rows", "query gradient", "proxy gradient")[:parts]
    for name, got, e64, elp in zip(names, (rows, gx, gw), expected, lowp):
        assert_close(got, e64, elp, dtype, f"{backend} {what} {name}")
    return (rows, gx, gw), expected


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", FAMILY)
@pytest.mark.parametrize("b,c,d", [(1, 1, 3), (37, 61, 40)])
def test_family_fp32(backend, family, b, c, d):
    params = FAMILY[family]
    check(backend, *make(b, c, d, params.sub_centers), params, family)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", ["arcface", "subcenter_arcface", "ccl_k5_arc", "soft_triple"])
@pytest.mark.parametrize("x_dtype,bank_dtype", [(BF16, F32), (F16, F32), (F32, BF16), (BF16, BF16)])
def test_family_low_precision(backend, family, x_dtype, bank_dtype):
    """At scale 10 (τ = 0.1): Triton's 16-bit ``tl.dot`` operands round x̂ and W (bf16: 2⁻⁹ relative), which the
    scale and the angular margin's slope ∂t/∂c (up to ~6 here) amplify; at PML's scale 64 the proxy gradient
    then carries ~3e-2 relative error, beyond the bf16 rule of tests/helpers.py (the C++ backend computes in fp32
    and meets it). That is the operand precision's limit, not the transform's; fp32 inputs are tested at 64.

    With sub-centers, Triton picks each class's sub-center on the 16-bit-rounded cosines: where two sub-centers
    lie within that rounding (~4e-3) it may route the gradient to the other one than an fp32 computation would
    (the max is not differentiable there), so only its loss, which is continuous at those ties, is compared.

    SoftTriple's slopes ``q_k (1 + (s_k − c)/γ)`` amplify that rounding of the cosines by 1/γ: at PML's γ = 0.1 the
    Triton bf16 proxy gradient is ~2e-2 relative off, so Triton is checked at γ = 0.5 here (γ = 0.1 in fp32)."""
    params = dataclasses.replace(FAMILY[family], temperature=0.1)
    if backend == "triton" and params.gamma > 0:  # the 16-bit cosines' rounding, amplified by 1/γ in the slopes
        params = dataclasses.replace(params, gamma=0.5)
    parts = 1 if backend == "triton" and params.sub_centers > 1 and params.gamma == 0 else 3
    check(backend, *make(29, 45, 24, params.sub_centers, x_dtype, bank_dtype), params, family, parts=parts)


@pytest.mark.parametrize("backend", BACKENDS)
def test_family_multi_tile(backend):
    """Several class tiles and C chunks, ragged everywhere (C·K = 3003 rows)."""
    params = FAMILY["subcenter_arcface"]
    b, c, d = (37, 1001, 72) if backend == "cpp" or DEVICE.type == "cuda" else (19, 300, 24)
    check(backend, *make(b, c, d, 3), params, "multi-tile")


@pytest.mark.skipif("triton" not in BACKENDS, reason="no Triton backend here")
@pytest.mark.parametrize("split,dv_split", [(1, 2), (4, 1), (4, 2)])
@pytest.mark.parametrize("name", ["ccl_k5_arc", "soft_k5_arc"])
def test_split_paths_sub_centers(split, dv_split, name):
    """Split-C partials + combine and the D-split of the accumulator with sub-centers (max, or SoftTriple's mean)
    and the angular margin."""
    from fastcdml.kernels import ccl as k

    params = FAMILY[name]
    x, y, w = make(37, 130, 40, 5)
    cfg = k.default_config(40, x.dtype, w.dtype)._replace(dv_split=dv_split)
    family = (params.temperature, params.margin, params.center_weight, True, params.margin_type, 5)
    rows, gx, lse, label_q = k.ccl_fwd(x, y, w, *family, params.gamma, config=cfg, split=split)
    ones = torch.ones(37, device=DEVICE)
    rows64, gx64, gw64 = reference_grads(x.double(), y, w.double(), ones.double(), params)
    rows32, gx32, gw32 = reference_grads(x, y, w, ones, params)
    assert_close(rows, rows64, rows32, F32, "loss rows")
    assert_close(gx, gx64, gx32, F32, "query gradient")
    gw = k.ccl_bwd_centers(x, y, w, lse, ones, *family[:3], params.margin_type, 5, label_q, gamma=params.gamma,
                           config=cfg._replace(rows=16))
    assert_close(gw, gw64, gw32, F32, "proxy gradient")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", ["cosface", "arcface", "subcenter_arcface"])
def test_trained_queries(backend, family):
    """Queries within a few degrees of their class (p_y → 1, ArcFace's ∂t/∂c ≈ 10–50): the label column's
    1 − p_y must come from the forward's off-label sum, not from 1 − exp(z_y − lse) (fp32 noise × ∂t/∂c)."""
    params = FAMILY[family]
    k = params.sub_centers
    x, y, w = make(24, 80, 32, k)
    noise = torch.randn_like(x) * torch.linspace(0.005, 0.1, 24, device=DEVICE)[:, None]
    x = (w[y * k].float() + noise).to(x.dtype)
    g = torch.randn(24, device=DEVICE)
    got, expected = check(backend, x, y, w, params, f"{family} trained", g)
    fp32 = reference_grads(x, y, w, g, params)
    rel = lambda a, e: ((a.double() - e).abs().max() / e.abs().max()).item()  # noqa: E731  (own scale: small)
    for a, e, r32 in zip(got[1:], expected[1:], fp32[1:]):
        assert rel(a, e) <= 2 * rel(r32, e) + 2e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_goes_to_the_argmax_sub_center(backend):
    """Each class's proxy gradient lands on exactly one of its K rows: the one most similar to the query."""
    params = CenterParams(0.1, 0.2, 0.5, sub_centers=3)
    x, y, w = make(1, 4, 16, 3)
    wk = w.clone().requires_grad_()
    ccl_ops.ccl_loss_rows(ops_of(backend), x, y, wk, *params.as_args()).sum().backward()
    s = (torch.nn.functional.normalize(x.double(), dim=1) @ w.double().t()).view(4, 3)
    nonzero = wk.grad.abs().sum(1).view(4, 3) != 0
    assert torch.equal(nonzero, torch.nn.functional.one_hot(s.argmax(1), 3).bool())


# --- momentum update with sub-centers -----------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("x_dtype,bank_dtype", [(F32, F32), (BF16, F32), (F32, BF16)])
@pytest.mark.parametrize("k", [2, 3])
def test_update_sub_centers(backend, x_dtype, bank_dtype, k):
    x, y, w = make(37, 9, 40, k, x_dtype, bank_dtype)
    y[::3] = 4  # one class with many rows, spread over its sub-centers
    before = w.clone()
    bank = w.clone()
    ops_of(backend).ccl_momentum_update_(bank, x, y, 0.9, k)
    expected = ref.ccl_momentum_update(before.double(), x.double(), y, 0.9, k)
    lowp = ref.ccl_momentum_update(before, x, y, 0.9, k)
    assert_close(bank, expected, lowp, lowest(x_dtype, bank_dtype), f"{backend} bank")
    moved = ref.subcenter_rows(before.double(), x.double(), y, k)
    untouched = torch.ones(9 * k, dtype=torch.bool, device=DEVICE)
    untouched[moved] = False
    assert torch.equal(bank[untouched], before[untouched])


def test_subcenter_rows_rule():
    """The rule itself: a query moves the sub-center of its own class it is most similar to, never another's."""
    w = torch.eye(6, 4, dtype=torch.float64)[[0, 1, 2, 3, 0, 1]]  # 3 classes × 2 sub-centers
    x = torch.tensor([[0.1, 0.9, 0, 0], [1.0, 0, 0, 0], [0, 0, 0, 1.0], [0, 0, 1.0, 0]], dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 2])
    assert ref.subcenter_rows(w, x, y, 2).tolist() == [1, 0, 3, 4]  # class 2 row 4 = e0, row 5 = e1: tie → first


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_family(backend):
    ops = ops_of(backend)
    x, y, w = make(5, 7, 20, 3)
    lse = torch.randn(5, device=DEVICE)
    g = torch.randn(5, device=DEVICE)
    torch.library.opcheck(ops.ccl_fwd, (x.requires_grad_(), y, w.requires_grad_(), 0.1, 0.3, 0.0, True, 1, 3))
    torch.library.opcheck(ops.ccl_bwd_centers, (x.detach(), y, w.detach(), lse, g, 0.1, 0.3, 0.0, 1, 3))
    torch.library.opcheck(ops.ccl_fwd, (x, y, w, 0.1, 0.3, 0.0, True, 0, 3, 0.1))  # SoftTriple's centre mean
    torch.library.opcheck(ops.ccl_bwd_centers, (x.detach(), y, w.detach(), lse, g, 0.1, 0.3, 0.0, 0, 3),
                          {"gamma": 0.1})
    torch.library.opcheck(ops.ccl_momentum_update_, (w.detach().clone(), x.detach(), y, 0.9, 3))


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_family_arguments(backend):
    ops = ops_of(backend)
    x, y, w = make(4, 5, 8, 1)
    with pytest.raises((ValueError, RuntimeError), match="sub_centers"):
        ops.ccl_fwd(x, y, w[:4], 0.1, 0.1, 0.0, False, 0, 3)
    with pytest.raises((ValueError, RuntimeError), match="margin_type"):
        ops.ccl_fwd(x, y, w, 0.1, 0.1, 0.0, False, 2, 1)

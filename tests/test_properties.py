"""Property-based differential tests (Hypothesis): random ragged shapes, dtypes, hyper-parameters and label patterns
through every backend of every loss, several training steps each, against the float64 reference (loss, gradients
and state); random bad inputs must raise an error that names the argument and leave every buffer untouched.

Bounded for CI: the examples are derandomized (the same ones on every machine and run, so a failure reproduces),
their number is fixed per test, and the Triton interpreter gets smaller shapes than the compiled backends. The pass
rule is ``helpers.assert_close``: at most twice the error the reference itself makes in the input dtype, plus a
floor. CBML's sets are decided by comparisons (hard pairs, top-K, the picked min / max): an example in which one of
them lies within 1e-4 of its threshold is discarded, since rounding may then decide it either way on any backend.
"""
from __future__ import annotations

import math
import warnings

import pytest
import torch

import fastcdml
from fastcdml.reference import ccl_loss_rows, ccl_momentum_update_
from fastcdml.functional import contrastive_bayesian_loss

from .conftest import DEVICE
from .helpers import DTYPES, assert_close, kernel_backends, lowest, unit_rows

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, Phase, assume, given, settings, strategies as st  # noqa: E402

# no shrinking: a failing example is reported as drawn (it reproduces, being derandomized), within CI's time
SETTINGS = dict(deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck),
                phases=(Phase.explicit, Phase.generate))
CCL_BACKENDS = ["reference"] + kernel_backends("ccl", DEVICE)
CBML_BACKENDS = ["reference"] + kernel_backends("cbml", DEVICE)
STEPS = 3


def _interpreting(backend: str) -> bool:
    return backend == "triton" and DEVICE.type == "cpu"


def _sizes(data, backend: str, big: tuple[int, int, int], small: tuple[int, int, int]) -> tuple[int, int, int]:
    """(B, C or the reference count, D), each from 1 (2 for classes) to its bound: the interpreter's bound is
    smaller, since every masked load costs it a Python loop iteration."""
    b, c, d = small if _interpreting(backend) else big
    return (data.draw(st.integers(1, b), label="B"), data.draw(st.integers(2, c), label="C"),
            data.draw(st.integers(1, d), label="D"))


def _labels(data, b: int, c: int) -> torch.Tensor:
    pattern = data.draw(st.sampled_from(["uniform", "one class", "few classes"]), label="labels")
    if pattern == "one class":
        return torch.full((b,), int(torch.randint(0, c, ())))
    high = c if pattern == "uniform" else min(c, 3)
    return torch.randint(0, high, (b,))


def _inputs(b: int, d: int, dtype) -> torch.Tensor:
    scale = torch.rand(b, 1, dtype=torch.float64) * 4 + 0.05  # the loss sees directions; norms vary
    return (torch.randn(b, d, dtype=torch.float64) * scale).to(dtype)


def _step(loss_fn, x: torch.Tensor, y: torch.Tensor, grad_output: torch.Tensor | None = None,
          transposed: bool = False):
    """(loss, ∂/∂x) of one training step of ``loss_fn`` on DEVICE, the state updated as the module does;
    ``transposed``: x is handed over as a non-contiguous view (column-major)."""
    xi = (x.t().contiguous().t() if transposed else x.detach().clone()).to(DEVICE).requires_grad_()
    loss = loss_fn(xi, y.to(DEVICE))
    loss.backward(None if grad_output is None else grad_output.to(DEVICE, loss.dtype))
    return loss.detach().cpu(), xi.grad.cpu()


# ------------------------------------------------------------------------------------------------------------ CCL

@pytest.mark.parametrize("backend", CCL_BACKENDS)
@settings(max_examples=8, **SETTINGS)
@given(data=st.data())
def test_ccl_steps_match_the_float64_reference(backend, data):
    """CenterContrastiveLoss in momentum mode, STEPS steps: loss rows, query gradient and bank after each."""
    b, c, d = _sizes(data, backend, (150, 400, 160), (24, 90, 40))
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    bank_dtype = data.draw(st.sampled_from([torch.float32, torch.bfloat16]), label="bank dtype")
    tau = data.draw(st.floats(0.05, 1.0), label="temperature")
    margin = data.draw(st.floats(0.0, 0.5), label="margin")
    lam = data.draw(st.floats(0.0, 1.0), label="center_weight")
    mu = data.draw(st.floats(0.0, 0.95), label="momentum")
    transposed = data.draw(st.booleans(), label="non-contiguous embeddings")
    torch.manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))
    w0 = unit_rows(c, d)
    hyper = dict(temperature=tau, margin=margin, center_weight=lam, momentum=mu, reduction="none", dtype=bank_dtype)
    ours = fastcdml.CenterContrastiveLoss(c, d, centers=w0, backend=backend, **hyper).to(DEVICE)
    low = fastcdml.CenterContrastiveLoss(c, d, centers=w0, backend="reference", **hyper)
    w64 = low.centers.double()  # the bank as stored (normalised, in the bank dtype)
    tol = lowest(dtype, bank_dtype)  # the products' operands are 16-bit if either is
    for step in range(STEPS):
        x, y, g = _inputs(b, d, dtype), _labels(data, b, c), torch.randn(b, dtype=torch.float64)
        assume(_update_well_posed(w64, x, y, mu))
        rows, gx = _step(ours, x, y, g, transposed)
        rows_low, gx_low = _step(low, x, y, g, transposed)
        x64 = x.double().requires_grad_()
        rows64 = ccl_loss_rows(x64, y, w64, tau, margin, lam)
        rows64.backward(g)
        ccl_momentum_update_(w64, x64.detach(), y, mu)
        what = f"{backend} step {step}"
        assert rows.dtype == torch.float32 and gx.dtype == dtype
        assert_close(rows, rows64, rows_low, tol, f"{what} loss rows")
        if d > 1:
            assert_close(gx, x64.grad, gx_low, tol, f"{what} grad")
        else:  # x̂ = ±1: the exact gradient is 0, and each backend returns its rounding of g_x̂ over |x| (see _noise)
            assert (gx.double().abs() <= _noise(x, g, 2 / tau + 2 * lam)).all(), f"{what} grad"
        assert_close(ours.centers.cpu(), w64, low.centers, tol, f"{what} bank")


def _noise(x: torch.Tensor, g: torch.Tensor, scale: float) -> torch.Tensor:
    """A bound on the query gradient when D = 1, where it is exactly 0: the normalisation's backward subtracts
    x̂(x̂·g_x̂) from g_x̂ with |g_x̂| ≤ scale·|g| and x̂ = ±(1 ± u), leaving a few u·|g_x̂|, then divides by |x|."""
    return 16 * 2.0**-24 * scale * g.abs()[:, None] / x.double().abs().clamp_min(1e-12)


def _update_well_posed(w: torch.Tensor, x: torch.Tensor, y: torch.Tensor, mu: float, gap: float = 1e-3) -> bool:
    """Whether every class of the batch moves to a well-defined direction: μ·W_k + (1 − μ)·mean x̂ not within
    ``gap`` of zero (float64), where rounding alone would pick the sign (e.g. D = 1 with as many positive as negative
    queries: x̂ = ±1 exactly in float64, ±(1 ± 1 ulp) in fp32)."""
    xh = torch.nn.functional.normalize(x.double(), dim=1)
    for k in y.unique():
        direction = mu * w[k].double() + (1 - mu) * xh[y == k].mean(0)
        if float(direction.norm()) < gap:
            return False
    return True


# ----------------------------------------------------------------------------------------------------------- CBML

def _separated(x: torch.Tensor, y: torch.Tensor, ref: torch.Tensor | None, ref_y: torch.Tensor | None,
               margin: float, top_k: int | None, gap: float = 1e-4) -> bool:
    """Whether every comparison that decides a CBML set or pick is at least ``gap`` from its threshold (float64)."""
    xh = torch.nn.functional.normalize(x.double(), dim=1)
    r = xh if ref is None else torch.cat([xh, torch.nn.functional.normalize(ref.double(), dim=1)])
    ry = y if ref_y is None else torch.cat([y, ref_y])
    s = xh @ r.t()
    for i in range(x.shape[0]):
        keep = (ry >= 0) & (torch.arange(r.shape[0]) != i)
        pos, neg = s[i][keep & (ry == y[i])], s[i][keep & (ry != y[i]) & (ry >= 0)]
        if not len(pos) or not len(neg):
            continue
        pmin, nmax = pos.min(), neg.max()
        near = [(pos - margin - nmax).abs(), (neg + margin - pmin).abs()]
        for values in (pos, neg):  # the picked min / max must be unique by more than the gap
            if len(values) > 1:
                top = values.sort().values
                near.append((top[1:2] - top[:1]).abs() if values is pos else (top[-1:] - top[-2:-1]).abs())
        if top_k is not None and len(neg) > top_k:
            top = neg.sort(descending=True).values
            near.append((top[top_k - 1] - top[top_k]).abs().reshape(1))
        if min(float(t.min()) for t in near if len(t)) < gap:
            return False
    return True


@pytest.mark.parametrize("backend", CBML_BACKENDS)
@settings(max_examples=8, **SETTINGS)
@given(data=st.data())
def test_cbml_steps_match_the_float64_reference(backend, data):
    """ContrastiveBayesianLoss with or without a cross-batch memory, STEPS steps: loss, query gradient and the
    memory after each (the float64 reference reads the memory the module held before the step)."""
    b, c, d = _sizes(data, backend, (90, 12, 96), (20, 6, 24))
    d = max(d, 2)  # at D = 1 the exact query gradient is 0 (x̂ = ±1): only rounding noise to compare
    memory = data.draw(st.sampled_from([0, 1, 7, 64]), label="memory_size")
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    negatives = data.draw(st.sampled_from(["adaptive", "topk"]), label="negatives")
    transposed = data.draw(st.booleans(), label="non-contiguous embeddings")
    hyper = dict(pos_a=data.draw(st.floats(0.2, 0.8)), pos_b=data.draw(st.floats(0.2, 1.0)),
                 neg_a=data.draw(st.floats(0.6, 1.2)), neg_b=data.draw(st.floats(0.02, 0.5)),
                 margin=data.draw(st.floats(0.0, 0.3)), variance_weight=data.draw(st.floats(0.0, 2.0)),
                 mean_weight=data.draw(st.floats(0.0, 1.0)),
                 phi=data.draw(st.sampled_from(["log", "sqrt", "constant"])),
                 pos_weight=data.draw(st.floats(0.05, 1.0)), neg_weight=data.draw(st.floats(0.05, 1.0)),
                 variance_center=data.draw(st.sampled_from(["class_means", "boundary"])),
                 negatives=negatives, top_k=data.draw(st.integers(1, 12)))
    torch.manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))
    ours = fastcdml.ContrastiveBayesianLoss(memory_size=memory, backend=backend, check_inputs=True, **hyper)
    low = fastcdml.ContrastiveBayesianLoss(memory_size=memory, backend="reference", **hyper)
    ours.to(DEVICE)
    for step in range(STEPS):
        x, y = _inputs(b, d, dtype), _labels(data, b, c)
        mem = (ours.memory_emb.cpu().double(), ours.memory_labels.cpu()) if memory and step else (None, None)
        assume(_separated(x, y, *mem, hyper["margin"], hyper["top_k"] if negatives == "topk" else None))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a label pattern may draw a batch without pairs, which warns
            loss, gx = _step(ours, x, y, transposed=transposed)
            loss_low, gx_low = _step(low, x, y, transposed=transposed)
            x64 = x.double().requires_grad_()
            extra = dict(ref_emb=mem[0], ref_labels=mem[1], include_self=True) if mem[0] is not None else {}
            loss64 = contrastive_bayesian_loss(x64, y, **extra, **hyper, backend="reference", check_inputs=False)
        if loss64.requires_grad:
            loss64.backward()
        g64 = x64.grad if x64.grad is not None else torch.zeros_like(x64)
        what = f"{backend} step {step}"
        assert_close(loss, loss64, loss_low, dtype, f"{what} loss")
        assert_close(gx, g64, gx_low, dtype, f"{what} grad")
        if memory:
            assert torch.equal(ours.memory_labels.cpu(), low.memory_labels), f"{what} memory labels"
            assert torch.equal(ours.memory_emb.cpu(), low.memory_emb), f"{what} memory"
            assert int(ours.memory_ptr) == int(low.memory_ptr) == (min(b, memory) * (step + 1)) % memory



# ----------------------------------------------------------------------------------------- PML's margin drop-ins

def _margin_kwargs(data, name: str) -> dict:
    if name == "NormalizedSoftmaxLoss":
        return {"temperature": data.draw(st.floats(0.02, 1.0), label="temperature")}
    kwargs = {"scale": data.draw(st.floats(4.0, 64.0), label="scale")}
    if name == "CosFaceLoss":
        return kwargs | {"margin": data.draw(st.floats(0.0, 0.5), label="margin")}
    kwargs["margin"] = data.draw(st.floats(0.0, 40.0), label="margin (degrees)")
    if name == "SubCenterArcFaceLoss":
        kwargs["sub_centers"] = data.draw(st.integers(1, 4), label="sub_centers")
    return kwargs


@pytest.mark.parametrize("backend", CCL_BACKENDS)
@settings(max_examples=8, **SETTINGS)
@given(data=st.data())
def test_margin_dropins_steps_match_pml(backend, data):
    """Each drop-in against PML's class of the same name run in float64 (the oracle), STEPS SGD steps on W:
    loss, embedding gradient, W gradient and W after each step, fp32, within twice the error of PML's own class
    run in fp32 plus 1e-5 (relative). A fixed 1e-5 (tests/test_margin.py, on its shapes) is not a bound for every
    shape: ArcFace's chain rule divides by sin θ, which amplifies rounding for a query close to its center."""
    pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
    from .helpers import loss_and_grads
    from .test_margin import batch

    name = data.draw(st.sampled_from(["NormalizedSoftmaxLoss", "CosFaceLoss", "ArcFaceLoss",
                                      "SubCenterArcFaceLoss"]), label="loss")
    b, c, d = _sizes(data, backend, (120, 300, 128), (20, 60, 40))
    b, d = max(b, 2), max(d, 2)  # batch() puts one query nearly opposite its class, next to the others
    kwargs = _margin_kwargs(data, name)
    torch.manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))
    pml = getattr(pml_losses, name)(num_classes=c, embedding_size=d, **kwargs).double()
    pml32 = getattr(pml_losses, name)(num_classes=c, embedding_size=d, **kwargs)
    ours = getattr(fastcdml, name)(c, d, **kwargs, backend=backend).to(DEVICE)
    ours.load_state_dict({"W": pml.W.detach().float()})
    pml32.load_state_dict({"W": pml.W.detach().float()})
    lr = 1e-3
    for step in range(STEPS):
        x, y = batch(b, c, d, pml.W, kwargs.get("sub_centers", 1))
        expected = loss_and_grads(pml, pml.W, x.cpu(), y.cpu(), None, torch.float64)
        low = loss_and_grads(pml32, pml32.W, x.cpu(), y.cpu())
        got = loss_and_grads(ours, ours.W, x, y)
        for what, a, e, lo in zip(("loss", "grad embeddings", "grad W"), got, expected, low):
            assert_close(a, e, lo, torch.float32, f"{name}/{backend} step {step} {what}")
        with torch.no_grad():
            for module, grad in ((pml, expected[2]), (pml32, low[2]), (ours, got[2])):
                module.W -= lr * grad.to(module.W)
        assert_close(ours.W, pml.W, pml32.W, torch.float32, f"{name}/{backend} step {step} W")


# ------------------------------------------------------------------------------------------------------ bad input

CORRUPTIONS = {  # name -> (corrupt(x, y, classes), the argument the message must name)
    "1-D embeddings": (lambda x, y, c: (x[0], y), "embeddings"),
    "3-D embeddings": (lambda x, y, c: (x[None], y), "embeddings"),
    "wider embeddings": (lambda x, y, c: (torch.cat([x, x[:, :1]], 1), y), "embedding"),
    "integer embeddings": (lambda x, y, c: (x.int(), y), "embeddings"),
    "float64 embeddings": (lambda x, y, c: (x.double(), y), "embeddings"),
    "NaN": (lambda x, y, c: (x.flatten().index_fill(0, torch.randint(0, x.numel(), (1,)), math.nan).view_as(x), y),
            "embeddings"),
    "inf": (lambda x, y, c: (x.flatten().index_fill(0, torch.randint(0, x.numel(), (1,)), -math.inf).view_as(x), y),
            "embeddings"),
    "float labels": (lambda x, y, c: (x, y.float()), "labels"),
    "2-D labels": (lambda x, y, c: (x, y[:, None]), "labels"),
    "short labels": (lambda x, y, c: (x, y[1:]), "labels"),
    "label too large": (lambda x, y, c: (x, y.index_fill(0, torch.randint(0, len(y), (1,)), c)), "labels"),
    "negative label": (lambda x, y, c: (x, y.index_fill(0, torch.randint(0, len(y), (1,)), -1)), "labels"),
    "not a tensor": (lambda x, y, c: (x.tolist(), y), "embeddings"),
}


def _losses(backend: str, c: int, d: int) -> dict:
    """Every stateful module with its state: name -> (module, the buffers that must not change on a bad input)."""
    ccl = fastcdml.CenterContrastiveLoss(c, d, backend=backend)
    cbml = fastcdml.ContrastiveBayesianLoss(memory_size=16, backend=backend)
    arc = fastcdml.SubCenterArcFaceLoss(c, d, sub_centers=2, backend=backend)
    return {"CenterContrastiveLoss": ccl, "ContrastiveBayesianLoss": cbml, "SubCenterArcFaceLoss": arc}


@pytest.mark.parametrize("backend", CCL_BACKENDS)
@settings(max_examples=30, **SETTINGS)
@given(data=st.data())
def test_bad_inputs_raise_naming_the_argument_and_leave_state(backend, data):
    """After a valid step, a random corruption of the next batch raises ValueError or TypeError naming the
    argument, and no buffer or parameter (bank, memory, W, the memory pointer) changes."""
    name = data.draw(st.sampled_from(["CenterContrastiveLoss", "ContrastiveBayesianLoss", "SubCenterArcFaceLoss"]),
                     label="loss")
    valid = {"label too large"} if name == "ContrastiveBayesianLoss" else set()  # CBML takes any label >= 0
    if backend == "reference":
        valid.add("float64 embeddings")  # the reference computes in float64
    corruption = data.draw(st.sampled_from(sorted(set(CORRUPTIONS) - valid)), label="corruption")
    b, c, d = _sizes(data, backend, (40, 50, 32), (12, 20, 16))
    b = max(b, 2)
    torch.manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))
    loss_fn = _losses(backend, c, d)[name].to(DEVICE)
    x, y = torch.randn(b, d, device=DEVICE), torch.randint(0, min(c, 3), (b,), device=DEVICE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a batch without pairs warns
        loss_fn(x, y).backward() if loss_fn(x, y).requires_grad else None
    before = {k: v.detach().clone() for k, v in [*loss_fn.named_buffers(), *loss_fn.named_parameters()]}
    corrupt, argument = CORRUPTIONS[corruption]
    bad = corrupt(torch.randn(b, d, device=DEVICE), torch.randint(0, c, (b,), device=DEVICE), c)
    with pytest.raises((ValueError, TypeError), match=argument):
        loss_fn(*bad)
    after = dict([*loss_fn.named_buffers(), *loss_fn.named_parameters()])
    for key, value in before.items():
        assert torch.equal(after[key], value), f"{name}: {key} changed on {corruption}"

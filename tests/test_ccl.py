"""Center Contrastive Loss: reference vs the naive spec, every backend vs the float64 reference, module semantics
(momentum update, state, modes) and input validation."""
import pytest
import torch

import fastcdml
from fastcdml.functional import center_contrastive_loss, center_momentum_update_
from fastcdml.reference import ccl_loss_rows, ccl_momentum_update_

from .helpers import DTYPES, assert_close, kernel_backends, unit_rows
from .naive import ccl_rows, ccl_update

SHAPES = [(1, 1, 4), (13, 37, 20), (37, 101, 72)]  # (B, C, D): tiny, ragged
HYPER = [(0.05, 0.1, 1.0), (0.5, 0.0, 0.0), (0.1, 0.3, 0.25)]  # (tau, margin, lambda)


def make(b, c, d, dtype=torch.float64, device="cpu"):
    x = (torch.randn(b, d, dtype=torch.float64) * 3).to(dtype=dtype, device=device)
    y = torch.randint(0, c, (b,), device=device)
    return x, y, unit_rows(c, d, torch.float32, device)


# --- the reference is the spec -----------------------------------------------------------------------------------

@pytest.mark.parametrize("b,c,d", SHAPES)
@pytest.mark.parametrize("tau,m,lam", HYPER)
def test_reference_matches_naive_spec(b, c, d, tau, m, lam):
    x, y, w = make(b, c, d)
    w = w.double()
    torch.testing.assert_close(ccl_loss_rows(x, y, w, tau, m, lam), ccl_rows(x, y, w, tau, m, lam))


@pytest.mark.parametrize("mu", [0.0, 0.5, 0.9])
def test_reference_update_matches_naive_spec(mu):
    x, y, w = make(40, 7, 12)
    y[:5] = 3  # a class with several rows
    expected = ccl_update(w, x, y, mu)
    torch.testing.assert_close(ccl_momentum_update_(w.double().clone(), x, y, mu), expected)


def test_reference_gradcheck():
    x, y, w = make(6, 5, 7)
    x.requires_grad_()
    w = w.double().requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: ccl_loss_rows(a, y, b, 0.2, 0.1, 0.5), (x, w))


# --- every backend against the float64 reference -------------------------------------------------------------------

BACKENDS = kernel_backends("ccl", torch.device("cuda" if torch.cuda.is_available() else "cpu"))


@pytest.mark.skipif(not BACKENDS, reason="no kernel backend for CCL in this process")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,c,d", SHAPES[:2] + [(29, 300, 40)])
def test_backend_matches_reference(backend, dtype, b, c, d, device):
    x, y, w = make(b, c, d, dtype, device)
    x.requires_grad_()
    g = torch.randn(b, device=device)
    out = center_contrastive_loss(x, y, w, 0.1, 0.2, 0.5, reduction="none", backend=backend)
    (gx,) = torch.autograd.grad(out, x, g)

    def reference_in(dt):
        xr = x.detach().to(dt).requires_grad_()
        rows = ccl_loss_rows(xr, y, w.to(dt), 0.1, 0.2, 0.5)
        return rows, torch.autograd.grad(rows, xr, g.to(rows.dtype))[0]

    (r64, g64), (rlo, glo) = reference_in(torch.float64), reference_in(dtype)
    assert out.dtype == torch.float32 and gx.dtype == dtype
    assert_close(out, r64, rlo, dtype, f"{backend} loss")
    assert_close(gx, g64, glo, dtype, f"{backend} grad_x")


@pytest.mark.skipif(not BACKENDS, reason="no kernel backend for CCL in this process")
@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_module_step_matches_reference(backend, device):
    """One training step of the module (loss, query gradient, bank update) on each backend and the reference."""
    x, y, w = make(23, 50, 24, torch.float32, device)
    results = []
    for impl in (backend, "reference"):
        loss_fn = fastcdml.CenterContrastiveLoss(50, 24, centers=w.cpu(), backend=impl).to(device)
        xi = x.clone().requires_grad_()
        loss = loss_fn(xi, y)
        loss.backward()
        results.append((loss.detach(), xi.grad, loss_fn.centers.clone()))
    for got, ref, what in zip(results[0], results[1], ("loss", "grad", "bank")):
        torch.testing.assert_close(got, ref, atol=2e-5, rtol=2e-5, msg=f"{backend} {what}")


# --- module semantics (run on the backend auto picks, and on the reference) ------------------------------------------

@pytest.fixture(params=["auto", "reference"])
def module_backend(request):
    return request.param


def test_momentum_update_semantics(module_backend):
    x, y, w = make(30, 20, 16, torch.float32)
    y = y % 10  # classes 10..19 are absent
    loss_fn = fastcdml.CenterContrastiveLoss(20, 16, centers=w, momentum=0.7, backend=module_backend)
    before = loss_fn.centers.clone()
    expected_loss = center_contrastive_loss(x, y, before, backend="reference")
    xr = x.clone().requires_grad_()
    loss = loss_fn(xr, y)
    loss.backward()  # backward after the in-place update must work and use the pre-step bank
    torch.testing.assert_close(loss.detach(), expected_loss, atol=1e-5, rtol=1e-5)
    xr2 = x.clone().requires_grad_()
    center_contrastive_loss(xr2, y, before, backend="reference").backward()
    torch.testing.assert_close(xr.grad, xr2.grad, atol=1e-5, rtol=1e-5)
    bank = loss_fn.centers
    assert torch.equal(bank[10:], before[10:]), "absent classes must be untouched"
    assert not torch.allclose(bank[:10], before[:10])
    torch.testing.assert_close(bank.norm(dim=1), torch.ones(20), atol=1e-6, rtol=0)
    torch.testing.assert_close(bank.double(), ccl_update(before, x, y, 0.7), atol=1e-6, rtol=0)

    perm = torch.randperm(30)
    permuted = fastcdml.CenterContrastiveLoss(20, 16, centers=w, momentum=0.7, backend=module_backend)
    permuted(x[perm], y[perm])
    torch.testing.assert_close(permuted.centers, bank, atol=1e-6, rtol=0)


def test_no_update_in_eval_mode(module_backend):
    x, y, w = make(8, 5, 6, torch.float32)
    loss_fn = fastcdml.CenterContrastiveLoss(5, 6, centers=w, backend=module_backend).eval()
    before = loss_fn.centers.clone()
    loss_fn(x, y)
    assert torch.equal(loss_fn.centers, before)


def test_gradient_mode_trains_normalised_proxies(module_backend):
    x, y, w = make(12, 9, 10, torch.float32)
    loss_fn = fastcdml.CenterContrastiveLoss(9, 10, centers=w * 3, update="gradient", backend=module_backend)
    assert isinstance(loss_fn.centers, torch.nn.Parameter)
    with torch.no_grad():
        loss_fn.centers.mul_(torch.linspace(0.5, 2.0, 9)[:, None])  # off the unit sphere, as after SGD steps
    w64 = loss_fn.centers.detach().double().requires_grad_()
    xr = x.clone().requires_grad_()
    loss_fn(xr, y).backward()
    x64 = x.double().requires_grad_()
    ccl_loss_rows(x64, y, w64 / w64.norm(dim=1, keepdim=True), 0.05, 0.1, 1.0).mean().backward()
    torch.testing.assert_close(loss_fn.centers.grad.double(), w64.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(xr.grad.double(), x64.grad, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("update", ["momentum", "gradient"])
def test_state_dict_round_trip(update):
    a = fastcdml.CenterContrastiveLoss(7, 5, update=update)
    b = fastcdml.CenterContrastiveLoss(7, 5, update=update, generator=torch.Generator().manual_seed(1))
    assert "centers" in a.state_dict()
    assert not torch.equal(a.centers, b.centers)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.centers, b.centers)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reductions_and_empty_batch(reduction, module_backend):
    x, y, w = make(9, 4, 5, torch.float32)
    loss_fn = fastcdml.CenterContrastiveLoss(4, 5, centers=w, reduction=reduction, backend=module_backend)
    rows = ccl_loss_rows(x, y, w, 0.05, 0.1, 1.0)
    expected = {"mean": rows.mean(), "sum": rows.sum(), "none": rows}[reduction]
    torch.testing.assert_close(loss_fn.eval()(x, y), expected, atol=1e-5, rtol=1e-5)
    before = loss_fn.centers.clone()
    empty = loss_fn.train()(torch.zeros(0, 5, requires_grad=True), torch.zeros(0, dtype=torch.long))
    assert empty.shape == ((0,) if reduction == "none" else ())
    assert torch.equal(loss_fn.centers, before)
    if reduction != "none":
        assert empty.item() == 0.0 and empty.requires_grad


def test_int32_labels_and_strided_embeddings(module_backend):
    x, y, w = make(10, 6, 8, torch.float32)
    wide = torch.randn(10, 16)
    wide[:, ::2] = x
    strided = wide[:, ::2]
    assert not strided.is_contiguous()
    got = center_contrastive_loss(strided, y.int(), w, backend=module_backend)
    torch.testing.assert_close(got, center_contrastive_loss(x, y, w, backend="reference"), atol=1e-5, rtol=1e-5)


def test_unchecked_bad_label_gives_nan_and_keeps_bank(module_backend):
    x, y, w = make(6, 5, 4, torch.float32)
    y[2] = 5
    loss_fn = fastcdml.CenterContrastiveLoss(5, 4, centers=w, reduction="none", check_inputs=False,
                                             backend=module_backend)
    before = loss_fn.centers.clone()
    rows = loss_fn(x, y)
    assert torch.isnan(rows[2]) and torch.isfinite(rows[[0, 1, 3, 4, 5]]).all()
    expected = ccl_update(before, x[[0, 1, 3, 4, 5]], y[[0, 1, 3, 4, 5]], 0.9)
    torch.testing.assert_close(loss_fn.centers.double(), expected, atol=1e-6, rtol=0)


# --- bad inputs: a clear error naming the argument, and the bank untouched ---------------------------------------

BAD = [
    (lambda x, y: (x[0], y), ValueError, "embeddings must be 2-D"),
    (lambda x, y: (x[:, :5], y), ValueError, "embedding_size=6"),
    (lambda x, y: (x.int(), y), TypeError, "embeddings must have dtype"),
    (lambda x, y: (x, y.float()), TypeError, "labels must be int64 or int32"),
    (lambda x, y: (x, y[:3]), ValueError, r"labels must have shape \(4,\)"),
    (lambda x, y: (x, y + 5), ValueError, r"labels must lie in \[0, 5\)"),
    (lambda x, y: (x, y - 1 - y), ValueError, r"labels must lie in \[0, 5\)"),
    (lambda x, y: (x.index_fill(0, torch.tensor([1]), float("nan")), y), ValueError, "embeddings contains NaN"),
    (lambda x, y: (x.index_fill(0, torch.tensor([0]), float("inf")), y), ValueError, "embeddings contains NaN or inf"),
    (lambda x, y: (x.numpy(), y), TypeError, "embeddings must be a torch.Tensor"),
]


@pytest.mark.parametrize("corrupt,err,match", BAD)
def test_bad_inputs_raise_and_leave_bank(corrupt, err, match, module_backend):
    x, y, w = make(4, 5, 6, torch.float32)
    loss_fn = fastcdml.CenterContrastiveLoss(5, 6, centers=w, backend=module_backend)
    before = loss_fn.centers.clone()
    with pytest.raises(err, match=match):
        loss_fn(*corrupt(x, y))
    assert torch.equal(loss_fn.centers, before)


def test_bad_hyper_parameters():
    for kwargs, match in [
        (dict(temperature=0.0), "temperature must be > 0"),
        (dict(margin=-1.0), "margin must be >= 0"),
        (dict(momentum=1.0), r"momentum must be in \[0, 1\)"),
        (dict(update="sgd"), "update must be one of"),
        (dict(reduction="avg"), "reduction must be one of"),
        (dict(backend="cuda"), "backend must be one of"),
        (dict(dtype=torch.float16), "dtype must be one of"),
        (dict(centers=torch.randn(3, 3)), r"centers must have shape \(5, 6\)"),
    ]:
        with pytest.raises(ValueError, match=match):
            fastcdml.CenterContrastiveLoss(5, 6, **kwargs)


def test_float64_needs_reference_backend():
    x, y, w = make(4, 5, 6, torch.float64)
    torch.testing.assert_close(center_contrastive_loss(x, y, w, backend="reference"),
                               ccl_rows(x, y, w, 0.05, 0.1, 1.0).mean())
    if kernel_backends("ccl", torch.device("cpu")):
        with pytest.raises(TypeError, match="float64"):
            center_contrastive_loss(x, y, w, backend=kernel_backends("ccl", torch.device("cpu"))[0])


def test_functional_update_rejects_bad_batch_before_writing():
    x, y, w = make(4, 5, 6, torch.float32)
    bank = w.clone()
    with pytest.raises(ValueError, match="labels must lie"):
        center_momentum_update_(bank, x, y + 10)
    with pytest.raises(ValueError, match="momentum"):
        center_momentum_update_(bank, x, y, momentum=1.5)
    assert torch.equal(bank, w)
    center_momentum_update_(bank, x, y, 0.5)
    torch.testing.assert_close(bank.double(), ccl_update(w, x, y, 0.5), atol=1e-6, rtol=0)


@pytest.mark.parametrize("update", ["momentum", "gradient"])
def test_init_centers_from_class_means(update, module_backend):
    """init_centers_ sets each present class's center to its normalised mean of normalised embeddings (the
    momentum update with μ = 0) and leaves absent classes alone, in either update mode."""
    x, y, w = make(60, 20, 16, torch.float32)
    y = y % 12  # classes 12..19 are absent
    loss_fn = fastcdml.CenterContrastiveLoss(20, 16, centers=w, update=update, backend=module_backend)
    before = loss_fn.centers.detach().clone()
    assert loss_fn.init_centers_(x, y) is loss_fn
    bank = loss_fn.centers.detach()
    torch.testing.assert_close(bank.double(), ccl_update(before, x, y, 0.0), atol=1e-6, rtol=0)
    assert torch.equal(bank[12:], before[12:])
    if update == "gradient":
        assert isinstance(loss_fn.centers, torch.nn.Parameter) and loss_fn.centers.grad is None
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 20\)"):
        loss_fn.init_centers_(x, torch.full((60,), 20))
    assert torch.equal(loss_fn.centers.detach(), bank)


def test_embedding_dim_is_an_alias_of_embedding_size():
    for cls in (fastcdml.CenterContrastiveLoss, fastcdml.ContrastiveBayesianLoss):
        kwargs = {"num_classes": 5} if cls is fastcdml.CenterContrastiveLoss else {"memory_size": 4}
        old, new = cls(embedding_dim=6, **kwargs), cls(embedding_size=6, **kwargs)
        assert old.state_dict().keys() == new.state_dict().keys()
        with pytest.raises(TypeError, match="not both"):
            cls(embedding_size=6, embedding_dim=6, **kwargs)
    loss_fn = fastcdml.CenterContrastiveLoss(5, embedding_dim=6)
    assert loss_fn.embedding_size == loss_fn.embedding_dim == 6 and loss_fn.centers.shape == (5, 6)

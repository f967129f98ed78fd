"""ProxyAnchorLoss against pytorch-metric-learning's ProxyAnchorLoss (the oracle, run in float64): loss, gradient to
the embeddings and to the proxies, with and without mined tuples, on every backend (fp32 error <= 1e-5 relative);
the kernels against the float64 reference in every input dtype; the op contract, errors and edge cases."""
import math

import pytest
import torch

import fastcdml
from fastcdml.reference.proxy_anchor import positive_scale, present_classes, proxy_anchor_loss

from .conftest import DEVICE
from .helpers import DTYPES, assert_close, assert_compiled_matches_eager, compare_with_pml, kernel_backends, lowest

pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
miners = pytest.importorskip("pytorch_metric_learning.miners")

KERNELS = kernel_backends("proxy_anchor", DEVICE)
BACKENDS = ["reference"] + KERNELS


def interpreting(backend):
    return backend == "triton" and DEVICE.type == "cpu"


def shape(backend):
    """(B, C, D): ragged; for the C++ kernels two row blocks and three proxy chunks (chunk_size(72) = 1024)."""
    return (21, 45, 40) if interpreting(backend) else (70, 2100, 72)


def batch(b, c, d, proxies):
    """Labels with several rows per class; embeddings from unrelated to close to their proxy, a few close to
    another class's proxy (large negative exponents, α(c + δ) near α(1 + δ)), float32 on DEVICE."""
    classes = torch.randperm(c)[: max(1, b // 3)]
    y = classes[torch.randint(0, classes.numel(), (b,))]
    p = torch.nn.functional.normalize(proxies.detach().double(), dim=1)
    toward = torch.where(torch.rand(b) < 0.2, torch.randint(0, c, (b,)), y)
    a = torch.rand(b, 1, dtype=torch.float64)
    x = (a * p[toward] + (1 - a) * torch.randn(b, d, dtype=torch.float64) / math.sqrt(d)) * (0.5 + torch.rand(b, 1))
    return x.float().to(DEVICE), y.to(DEVICE)


def pair(c, d, backend, **kwargs):
    """(PML's loss in float64, ours with PML's proxies loaded through its state_dict)."""
    theirs = pml_losses.ProxyAnchorLoss(c, d, **kwargs).double()
    ours = fastcdml.ProxyAnchorLoss(c, d, backend=backend, **kwargs).to(DEVICE)
    ours.load_state_dict({"proxies": theirs.proxies.detach().float()})
    return theirs, ours


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mined", [False, True], ids=["all", "miner-weighted"])
def test_matches_pml(backend, mined):
    b, c, d = shape(backend)
    theirs, ours = pair(c, d, backend, margin=0.1, alpha=32)
    x, y = batch(b, c, d, theirs.proxies)
    # triplets over a subset of rows, some repeated: rows weigh 0, 1/3, 2/3 or 1 (PML's convert_to_weights)
    indices = tuple(torch.tensor(t) % b for t in ([0, 0, 0, 4, 9], [1, 2, 4, 5, 30], [6, 7, 8, 4, 36])) \
        if mined else None
    compare_with_pml(theirs, ours, "proxies", x, y, indices, backend)


def test_pml_state_dict_and_defaults():
    theirs = pml_losses.ProxyAnchorLoss(10, 8)
    ours = fastcdml.ProxyAnchorLoss(10, 8)
    assert (ours.margin, ours.alpha) == (theirs.margin, theirs.alpha) == (0.1, 32)
    assert set(ours.state_dict()) == set(theirs.state_dict()) == {"proxies"}
    theirs.load_state_dict(ours.state_dict())
    torch.manual_seed(1)  # PML's init: Kaiming normal, fan_out: the C rows, std sqrt(2 / C), the same draws
    expected = pml_losses.ProxyAnchorLoss(2000, 50).proxies
    torch.manual_seed(1)
    torch.testing.assert_close(fastcdml.ProxyAnchorLoss(2000, 50).proxies, expected)


def _op_outputs(backend, x, y, p, indices_tuple, margin=0.1, alpha=32.0):
    """(loss, ∂/∂x, ∂/∂proxies) through the public module with backend ``backend``."""
    loss_fn = fastcdml.ProxyAnchorLoss(p.shape[0], p.shape[1], margin, alpha, backend=backend)
    loss_fn.proxies = torch.nn.Parameter(p.clone())
    xr = x.clone().requires_grad_()
    loss = loss_fn(xr, y, indices_tuple)
    gx, gp = torch.autograd.grad(loss, [xr, loss_fn.proxies])
    return loss, gx, gp


def _triplets(b):
    """A mined tuple in which rows occur 0, 1 or 2 times (weights 0, 1/2, 1)."""
    a = torch.arange(0, b, 3)
    return a, (a + 1) % b, torch.cat([a[:1], a[:-1]])


KERNEL_SHAPES = [(1, 1, 4), (21, 45, 40), (70, 130, 24)]


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("p_dtype", [torch.float32, torch.bfloat16], ids=["fp32-proxies", "bf16-proxies"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mined", [False, True], ids=["all", "mined"])
def test_kernels_match_reference(backend, dtype, p_dtype, mined):
    shapes = KERNEL_SHAPES[:2] if interpreting(backend) else KERNEL_SHAPES
    for b, c, d in shapes:
        x = torch.randn(b, d, device=DEVICE)
        y = torch.randint(0, max(1, c // 2), (b,), device=DEVICE)
        p = torch.randn(c, d, device=DEVICE)
        tup = _triplets(b) if mined and b > 1 else None
        got = _op_outputs(backend, x.to(dtype), y, p.to(p_dtype), tup)
        exp = _op_outputs("reference", x.double(), y, p.to(p_dtype).double(), tup)
        low = _op_outputs("reference", x.to(dtype), y, p.to(p_dtype), tup)
        assert got[1].dtype == dtype and got[2].dtype == p_dtype and got[0].dtype == torch.float32
        for name, a, e, l in zip(("loss", "grad x", "grad proxies"), got, exp, low):
            assert_close(a, e, l, lowest(dtype, p_dtype), f"{backend} {name} {(b, c, d)}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_and_absent_gradients(backend):
    loss_fn = fastcdml.ProxyAnchorLoss(5, 8, backend=backend).to(DEVICE)
    x = torch.zeros(0, 8, device=DEVICE, requires_grad=True)
    loss = loss_fn(x, torch.zeros(0, dtype=torch.long, device=DEVICE))
    loss.backward()
    assert loss.item() == 0.0 and (loss_fn.proxies.grad == 0).all()
    with torch.no_grad():  # evaluation: no gradient computed
        value = loss_fn(torch.randn(4, 8, device=DEVICE), torch.tensor([0, 1, 1, 4], device=DEVICE))
    assert torch.isfinite(value)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_inputs_raise(backend):
    loss_fn = fastcdml.ProxyAnchorLoss(5, 8, backend=backend).to(DEVICE)
    x, y = torch.randn(4, 8, device=DEVICE), torch.tensor([0, 1, 1, 4], device=DEVICE)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 5\)"):
        loss_fn(x, torch.tensor([0, 1, 1, 5], device=DEVICE))
    with pytest.raises(ValueError, match="embeddings has dimension 7"):
        loss_fn(torch.randn(4, 7, device=DEVICE), y)
    with pytest.raises(ValueError, match="NaN or inf"):
        loss_fn(torch.full((4, 8), math.nan, device=DEVICE), y)
    with pytest.raises(ValueError, match="needs labels"):
        loss_fn(x)
    with pytest.raises(ValueError, match="ref_emb / ref_labels are not supported"):
        loss_fn(x, y, None, x, y)
    with pytest.raises(ValueError, match="indices_tuple must be"):
        loss_fn(x, y, (torch.tensor([0]),))
    with pytest.raises(ValueError, match=r"labels must have shape \(4,\)"):
        loss_fn(x, y[:3])
    for kwargs, err, match in [(dict(reducer=object()), ValueError, "reducer is not supported"),
                               (dict(weight_regularizer=object()), ValueError, "weight_regularizer is not supported"),
                               (dict(alpha=0), ValueError, "alpha must be > 0"),
                               (dict(colour=1), TypeError, "unexpected keyword argument 'colour'")]:
        with pytest.raises(err, match=match):
            fastcdml.ProxyAnchorLoss(5, 8, **kwargs)


def test_reference_pieces():
    y = torch.tensor([3, 1, 3, 3, 0])
    assert present_classes(y).item() == 3 and positive_scale(y).item() == pytest.approx(1 / 3)
    assert present_classes(y[:0]).item() == 0
    x, p = torch.randn(5, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    torch.autograd.gradcheck(lambda a, b: proxy_anchor_loss(a, y, b), (x.requires_grad_(), p.requires_grad_()))
    # a slice of the proxies with the global scales, labels outside the slice as foreign rows: the parts add up
    full = proxy_anchor_loss(x, y, p)
    parts = [proxy_anchor_loss(x, torch.where((y >= a) & (y < e), y - a, -1), p[a:e], pos_scale=positive_scale(y),
                               neg_scale=1 / 4) for a, e in ((0, 1), (1, 4))]
    torch.testing.assert_close(parts[0] + parts[1], full)


def test_trains_with_a_pml_trainer_and_miner():
    trainers = pytest.importorskip("pytorch_metric_learning.trainers")
    torch.manual_seed(0)
    labels = torch.arange(6).repeat_interleave(8)
    data = torch.randn(48, 12) + 2 * torch.nn.functional.one_hot(labels, 12).float()
    trunk, embedder = torch.nn.Linear(12, 16), torch.nn.Linear(16, 8)
    loss_fn = fastcdml.ProxyAnchorLoss(6, 8)
    optimizers = {"trunk_optimizer": torch.optim.SGD(trunk.parameters(), lr=0.1),
                  "embedder_optimizer": torch.optim.SGD(embedder.parameters(), lr=0.1),
                  "metric_loss_optimizer": torch.optim.SGD(loss_fn.parameters(), lr=0.1)}
    before = loss_fn.proxies.detach().clone()
    trainer = trainers.MetricLossOnly(
        models={"trunk": trunk, "embedder": embedder}, optimizers=optimizers, batch_size=16,
        loss_funcs={"metric_loss": loss_fn}, mining_funcs={"tuple_miner": miners.MultiSimilarityMiner()},
        dataset=torch.utils.data.TensorDataset(data, labels), dataloader_num_workers=0,
        data_and_label_getter=lambda batch: batch)
    trainer.train(num_epochs=1)
    assert torch.isfinite(torch.tensor(trainer.losses["metric_loss"]))
    assert not torch.equal(loss_fn.proxies, before)


def _namespace(backend):
    return torch.ops.fastcdml_interpret if interpreting(backend) else torch.ops.fastcdml


@pytest.mark.parametrize("backend", KERNELS)
def test_opcheck(backend):
    x, y = torch.randn(5, 12, device=DEVICE), torch.tensor([0, 2, 2, 6, 1], device=DEVICE)  # 6: another slice's
    p, w = torch.randn(6, 12, device=DEVICE), torch.rand(5, device=DEVICE)
    scale = torch.tensor(1 / 3, device=DEVICE)
    op = _namespace(backend).proxy_anchor_fwd
    torch.library.opcheck(op, (x.requires_grad_(), y, p.requires_grad_(), w, scale, 1 / 6, 0.1, 32.0, True, True))
    torch.library.opcheck(op, (x.detach().bfloat16(), y.int(), p.detach(), None, scale, 0.5, -0.2, 8.0, False, True))
    torch.library.opcheck(op, (x.detach(), y, p.detach(), None, scale, 0.5, 0.1, 32.0, False, False))


@pytest.mark.parametrize("backend", KERNELS)
def test_compiled_training_compiles_once_and_matches_eager(backend):
    batches = [(torch.randn(12, 16, device=DEVICE), torch.randint(0, 5, (12,), device=DEVICE)) for _ in range(4)]
    make = lambda: fastcdml.ProxyAnchorLoss(9, 16, backend=backend).to(DEVICE)  # noqa: E731
    assert_compiled_matches_eager(make, batches, lambda loss_fn: loss_fn.proxies.grad.clone(), backend="inductor")
    x, y = batches[0]
    with pytest.raises(RuntimeError, match=r"labels must lie in \[0, 9\)"):
        torch.compile(make(), fullgraph=True)(x, y + 9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_init_centers_sets_proxies_to_class_means(backend):
    loss_fn = fastcdml.ProxyAnchorLoss(6, 8, backend=backend).to(DEVICE)
    before = loss_fn.proxies.detach().clone()
    x, y = torch.randn(9, 8, device=DEVICE), torch.tensor([0, 0, 2, 2, 2, 5, 0, 5, 2], device=DEVICE)
    loss_fn.init_centers_(x, y)
    xh = torch.nn.functional.normalize(x, dim=1)
    for k in (0, 2, 5):
        torch.testing.assert_close(loss_fn.proxies[k], torch.nn.functional.normalize(xh[y == k].mean(0), dim=0),
                                   atol=1e-5, rtol=1e-5)
    for k in (1, 3, 4):  # absent classes keep their proxies
        assert torch.equal(loss_fn.proxies[k], before[k])


@pytest.mark.parametrize("backend", KERNELS)
def test_grad_output_scales_and_a_second_backward_is_refused(backend):
    loss_fn = fastcdml.ProxyAnchorLoss(7, 8, backend=backend).to(DEVICE)
    x, y = torch.randn(6, 8, device=DEVICE, requires_grad=True), torch.tensor([0, 1, 1, 3, 6, 6], device=DEVICE)
    expected = torch.autograd.grad(loss_fn(x, y), [x, loss_fn.proxies])
    loss = loss_fn(x, y)
    got = torch.autograd.grad(loss * -2.5, [x, loss_fn.proxies], retain_graph=True)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, -2.5 * e)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(loss, [x, loss_fn.proxies])

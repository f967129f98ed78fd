"""fastcdml's drop-ins vs pytorch-metric-learning's classes of the same name (the oracle): loss, gradient to the
embeddings and to ``W``, with and without mined tuples, state_dict round trips, every backend, fp32 error
<= 1e-5 relative to PML run in float64."""
import math

import pytest
import torch

import fastcdml
from fastcdml.losses._pml import miner_weights

from .conftest import DEVICE
from .helpers import assert_compiled_matches_eager, compare_with_pml, kernel_backends, rel

pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
lmu = pytest.importorskip("pytorch_metric_learning.utils.loss_and_miner_utils")

BACKENDS = ["reference"] + kernel_backends("ccl", DEVICE)
CLASSES = {  # name -> (constructor kwargs, sub-centers)
    "NormalizedSoftmaxLoss": ({}, 1),
    "CosFaceLoss": ({}, 1),
    "ArcFaceLoss": ({}, 1),
    "SubCenterArcFaceLoss": ({"sub_centers": 3}, 3),
}


def interpreting(backend):
    return backend == "triton" and DEVICE.type == "cpu"


def shapes(backend):
    return (19, 203, 40) if interpreting(backend) else (37, 1001, 72)


def pair(name, c, d, backend, **kwargs):
    """(PML loss in float64, ours with PML's W loaded through its state_dict)."""
    pml = getattr(pml_losses, name)(num_classes=c, embedding_size=d, **CLASSES[name][0]).double()
    ours = getattr(fastcdml, name)(c, d, **CLASSES[name][0], backend=backend, **kwargs).to(DEVICE)
    ours.load_state_dict({"W": pml.W.detach().float()})
    return pml, ours


def batch(b, c, d, w, k):
    """Embeddings from unrelated to close to a sub-center of their class (trained queries), one nearly opposite to
    its class (ArcFace's fallback branch; not exactly, where PML's gradient is infinite), float32 on DEVICE, and
    labels."""
    y = torch.randint(0, c, (b,))
    cols = torch.nn.functional.normalize(w.detach().double().t(), dim=1)
    own = cols[y * k + torch.randint(0, k, (b,))]
    a = torch.rand(b, 1, dtype=torch.float64)
    x = (a * own + (1 - a) * torch.randn(b, d, dtype=torch.float64) / math.sqrt(d)) * (0.5 + torch.rand(b, 1))
    x[1] = -cols[y[1] * k: y[1] * k + k].sum(0) + 0.2 * torch.randn(d, dtype=torch.float64) / math.sqrt(d)
    return x.float().to(DEVICE), y.to(DEVICE)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", CLASSES)
def test_matches_pml(backend, name):
    b, c, d = shapes(backend)
    pml, ours = pair(name, c, d, backend)
    x, y = batch(b, c, d, pml.W, CLASSES[name][1])
    compare_with_pml(pml, ours, "W", x, y, what=f"{name}/{backend}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["CosFaceLoss", "SubCenterArcFaceLoss"])
@pytest.mark.parametrize("kind", ["pairs", "triplets", "empty"])
def test_miner_weights_match_pml(backend, name, kind):
    """Mined tuples become PML's per-sample weights (rows mined twice weigh more, unmined rows 0)."""
    b, c, d = shapes(backend)
    pml, ours = pair(name, c, d, backend)
    x, y = batch(b, c, d, pml.W, CLASSES[name][1])
    idx = lambda n: torch.randint(0, b // 2, (n,))  # noqa: E731  (half the batch is never mined)
    tuples = {"pairs": (idx(9), idx(9), idx(5), idx(5)), "triplets": (idx(7), idx(7), idx(7)),
              "empty": (torch.tensor([], dtype=torch.long),) * 3}[kind]
    expected = lmu.convert_to_weights(tuples, y.cpu(), dtype=torch.float32)
    got = miner_weights(tuples, b, y.device)
    torch.testing.assert_close(got.cpu() if got is not None else torch.ones(b), expected)
    compare_with_pml(pml, ours, "W", x, y, tuples, what=f"{name}/{backend}/{kind}")


def test_miner_from_pml_miner():
    """A real PML miner's output, pairs from MultiSimilarityMiner, through the call PML's trainers make."""
    miners = pytest.importorskip("pytorch_metric_learning.miners")
    pml, ours = pair("ArcFaceLoss", 20, 16, "reference")
    x, y = batch(40, 20, 16, pml.W, 1)
    y = y % 5
    tuples = miners.MultiSimilarityMiner(epsilon=0.5)(x.cpu(), y.cpu())
    assert sum(len(t) for t in tuples) > 0
    compare_with_pml(pml, ours, "W", x, y, tuples, what="ArcFace with MultiSimilarityMiner")


@pytest.mark.parametrize("name", CLASSES)
def test_state_dict_round_trip(name):
    """PML -> ours -> PML: the same keys, shapes and values; defaults and attributes as PML's."""
    kwargs, k = CLASSES[name]
    pml = getattr(pml_losses, name)(num_classes=11, embedding_size=6, **kwargs)
    ours = getattr(fastcdml, name)(11, 6, **kwargs)
    assert ours.W.shape == pml.W.shape == (6, 11 * k)
    assert [n for n, _ in ours.named_parameters()] == ["W"]
    ours.load_state_dict(pml.state_dict())
    back = getattr(pml_losses, name)(num_classes=11, embedding_size=6, **kwargs)
    back.load_state_dict(ours.state_dict())
    assert torch.equal(back.W, pml.W)
    for attr in ("margin", "scale", "temperature", "sub_centers"):
        if hasattr(pml, attr):
            assert getattr(ours, attr) == pytest.approx(getattr(pml, attr)), attr


@pytest.mark.parametrize("name", CLASSES)
def test_get_logits_and_optimizer_step(name):
    """get_logits as PML's, and one SGD step on W from loss_fn.parameters() lands where PML's does."""
    pml, ours = pair(name, 30, 12, "reference")
    pml = pml.float()
    x, y = batch(16, 30, 12, pml.W, CLASSES[name][1])
    torch.testing.assert_close(ours.get_logits(x), pml.get_logits(x.cpu()).to(DEVICE), rtol=1e-5, atol=1e-4)
    for fn in (pml, ours):
        opt = torch.optim.SGD(fn.parameters(), lr=0.1)
        fn(x.to(fn.W.device), y.to(fn.W.device)).backward()
        opt.step()
    assert rel(ours.W, pml.W) < 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_momentum_mode(backend):
    """update="momentum": no parameters, W a buffer of unit columns, moved in training mode only (each query
    moving its most similar sub-center), identically on every backend; a PML W loads and is normalised."""
    c, d, k = 9, 16, 3
    pml = pml_losses.SubCenterArcFaceLoss(num_classes=c, embedding_size=d, sub_centers=k)
    x, y = batch(24, c, d, pml.W, k)
    fns = {}
    for name in dict.fromkeys(["reference", backend]):
        fn = fastcdml.SubCenterArcFaceLoss(c, d, sub_centers=k, update="momentum", backend=name).to(DEVICE)
        fn.load_state_dict(pml.state_dict())
        assert list(fn.parameters()) == []
        torch.testing.assert_close(fn.W.norm(dim=0), torch.ones(c * k, device=DEVICE))
        before = fn.W.clone()
        fn.eval()
        fn(x, y)
        assert torch.equal(fn.W, before)
        fn.train()
        xr = x.clone().requires_grad_()
        fn(xr, y).backward()
        assert xr.grad.isfinite().all()
        moved = fastcdml.reference.ccl.subcenter_rows(before.t(), x, y, k)
        changed = (fn.W != before).any(dim=0)
        assert changed.nonzero().flatten().tolist() == sorted(set(moved.tolist()))
        fns[name] = fn
    torch.testing.assert_close(fns[backend].W, fns["reference"].W, rtol=0, atol=1e-6)


def test_unsupported_arguments_are_named():
    with pytest.raises(ValueError, match="reducer"):
        fastcdml.ArcFaceLoss(10, 8, reducer=object())
    with pytest.raises(ValueError, match="distance"):
        fastcdml.CosFaceLoss(10, 8, distance=object())
    with pytest.raises(ValueError, match="weight_regularizer"):
        fastcdml.CosFaceLoss(10, 8, weight_regularizer=object())
    with pytest.raises(TypeError, match="bogus"):
        fastcdml.NormalizedSoftmaxLoss(10, 8, bogus=1)
    loss_fn = fastcdml.NormalizedSoftmaxLoss(10, 8)
    x, y = torch.randn(4, 8), torch.arange(4)
    with pytest.raises(ValueError, match="ref_emb"):
        loss_fn(x, y, None, x, y)
    with pytest.raises(ValueError, match="labels"):
        loss_fn(x)


@pytest.mark.parametrize("name", CLASSES)
def test_pml_trainer_with_miner(name):
    """PML's MetricLossOnly trainer with a MultiSimilarityMiner and a loss optimizer runs each drop-in: the
    trainer calls loss(embeddings, labels, indices_tuple) and steps ``metric_loss_optimizer`` on W."""
    trainers = pytest.importorskip("pytorch_metric_learning.trainers")
    miners = pytest.importorskip("pytorch_metric_learning.miners")
    y = torch.arange(64) % 8
    data = torch.randn(8, 10)[y] + 0.5 * torch.randn(64, 10)
    dataset = torch.utils.data.TensorDataset(data, y)
    trunk, embedder = torch.nn.Linear(10, 16), torch.nn.Identity()
    loss_fn = getattr(fastcdml, name)(8, 16, **CLASSES[name][0])
    before = loss_fn.W.detach().clone()
    sgd = lambda params: torch.optim.SGD(params, lr=0.01)  # noqa: E731
    trainer = trainers.MetricLossOnly(
        models={"trunk": trunk, "embedder": embedder},
        optimizers={"trunk_optimizer": sgd(trunk.parameters()), "metric_loss_optimizer": sgd(loss_fn.parameters())},
        batch_size=16, loss_funcs={"metric_loss": loss_fn},
        mining_funcs={"tuple_miner": miners.MultiSimilarityMiner(epsilon=0.1)}, dataset=dataset,
        data_device=torch.device("cpu"), dataloader_num_workers=0)
    trainer.train(num_epochs=1)
    assert torch.isfinite(torch.tensor(trainer.losses["metric_loss"]))
    assert not torch.equal(loss_fn.W.detach(), before)


@pytest.mark.parametrize("update", ["gradient", "momentum"])
def test_compiles_fullgraph(update):
    """A training step through torch.compile(fullgraph=True) compiles once over several steps and matches eager
    (loss, gradients to the embeddings and to W, and the momentum bank)."""
    batches = [(torch.randn(12, 16, device=DEVICE), torch.randint(0, 6, (12,), device=DEVICE)) for _ in range(4)]
    assert_compiled_matches_eager(
        lambda: fastcdml.SubCenterArcFaceLoss(6, 16, sub_centers=2, update=update).to(DEVICE), batches,
        lambda loss_fn: (loss_fn.W.detach().clone(), loss_fn.W.grad))


@pytest.mark.parametrize("update", ["gradient", "momentum"])
def test_init_centers_sets_subcenters_to_class_means(update):
    """The bank base class gives the drop-ins ``init_centers_``: each row moves the sub-center of its class it is
    most similar to, to that sub-center's normalised mean (the momentum step with μ = 0); absent classes and
    unchosen sub-centers keep their columns of ``W``."""
    c, d, k = 7, 12, 3
    loss_fn = fastcdml.SubCenterArcFaceLoss(c, d, sub_centers=k, update=update)
    x, y = torch.randn(30, d), torch.randint(0, c - 2, (30,))  # the last two classes are absent
    before = loss_fn.W.detach().clone()
    assert loss_fn.init_centers_(x, y) is loss_fn
    rows = before.t() / before.t().norm(dim=1, keepdim=True) if update == "gradient" else before.t()
    expected = fastcdml.reference.ccl.ccl_momentum_update(before.t().contiguous(), x, y, 0.0, k)
    moved = fastcdml.reference.ccl.subcenter_rows(rows, x, y, k).unique()
    torch.testing.assert_close(loss_fn.W.detach().t()[moved], expected[moved], rtol=0, atol=1e-6)
    untouched = torch.ones(c * k, dtype=torch.bool)
    untouched[moved] = False
    assert torch.equal(loss_fn.W.detach()[:, untouched], before[:, untouched])
    assert isinstance(loss_fn.W, torch.nn.Parameter) == (update == "gradient")

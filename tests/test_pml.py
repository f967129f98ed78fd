"""pytorch-metric-learning's call contract on the loss modules, with PML itself as the oracle: positional
``indices_tuple``, miner weights, PML's trainers and miners, the cross-batch memory's miner and enqueue_mask, and
clear errors for what we cannot honour."""
import pytest
import torch

import fastcdml
from fastcdml.reference import cbml_loss
from fastcdml.reference.cbml import pack_pairs

from .helpers import clustered_labels, kernel_backends

pml = pytest.importorskip("pytorch_metric_learning")
from pytorch_metric_learning import losses as pml_losses, miners, trainers  # noqa: E402

BACKENDS = ["reference"] + kernel_backends("ccl", torch.device("cpu"))
LIVELY = dict(pos_a=0.3, pos_b=0.4, neg_a=0.2, neg_b=0.3, margin=0.6, variance_weight=0.5, mean_weight=0.3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mined", [False, True], ids=["all", "miner-weighted"])
def test_gradient_mode_ccl_equals_pml_normalized_softmax(backend, mined):
    b, c, d = 37, 101, 24
    x, y = torch.randn(b, d), torch.randint(0, c, (b,))
    theirs = pml_losses.NormalizedSoftmaxLoss(c, d, temperature=0.05)
    ours = fastcdml.CenterContrastiveLoss(c, d, margin=0.0, center_weight=0.0, update="gradient", backend=backend,
                                          centers=theirs.W.detach().t())
    with torch.no_grad():  # ours normalises the rows it is given; start from exactly PML's W
        ours.centers.copy_(theirs.W.t())
    # triplets over a subset of rows, some repeated: rows weigh 0, 1/3, 2/3 or 1 (PML's convert_to_weights)
    indices = (torch.tensor([0, 0, 0, 4, 9]), torch.tensor([1, 2, 4, 5, 30]), torch.tensor([6, 7, 8, 4, 36])) \
        if mined else None
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    expected, got = theirs(xa, y, indices), ours(xb, y, indices)
    expected.backward()
    got.backward()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.centers.grad, theirs.W.grad.t(), rtol=1e-5, atol=1e-6)


def test_call_contract_positional_and_errors():
    x, y = torch.randn(8, 6), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    ccl = fastcdml.CenterContrastiveLoss(4, 6)
    ccl(x, y, None, None, None)  # how PML's trainers call a loss
    with pytest.raises(ValueError, match="ref_emb / ref_labels are not supported"):
        ccl(x, y, None, x, y)
    with pytest.raises(ValueError, match="needs labels"):
        ccl(x)
    cbml = fastcdml.ContrastiveBayesianLoss()
    cbml(x, y, miners.MultiSimilarityMiner()(x, y))  # the third positional slot is indices_tuple, as in PML
    for kwargs, err, match in [
        (dict(reducer=object()), ValueError, "reducer is not supported"),
        (dict(distance=pml.distances.LpDistance()), ValueError, r"distance=LpDistance\(\) is not supported"),
        (dict(embedding_regularizer=object()), ValueError, "embedding_regularizer is not supported"),
        (dict(colour="red"), TypeError, "unexpected keyword argument 'colour'"),
    ]:
        with pytest.raises(err, match=match):
            fastcdml.CenterContrastiveLoss(4, 6, **kwargs)
        with pytest.raises(err, match=match):
            fastcdml.ContrastiveBayesianLoss(**kwargs)
    fastcdml.CenterContrastiveLoss(4, 6, distance=pml.distances.CosineSimilarity())  # what we compute anyway


def test_memory_miner_mines_against_the_filled_reference_set():
    torch.manual_seed(3)
    miner = miners.MultiSimilarityMiner(epsilon=0.3)
    loss_fn = fastcdml.ContrastiveBayesianLoss(memory_size=20, miner=miner, backend="reference", **LIVELY)
    seen_x, seen_y = [], []
    for step in range(3):
        x, y = torch.randn(8, 6), clustered_labels(8, 2, 3)
        refs = torch.cat([x] + [torch.cat(seen_x)[-20:]] if seen_x else [x])
        ref_y = torch.cat([y] + [torch.cat(seen_y)[-20:]] if seen_y else [y])
        a1, p, a2, n = miner(x, y, refs, ref_y)
        mask = pack_pairs(torch.cat([a1, a2]), torch.cat([p, n]), 8, refs.shape[0])
        expected = cbml_loss(x, y, refs[8:] if refs.shape[0] > 8 else None, ref_y[8:], pair_mask=mask,
                             include_self=True, **LIVELY)
        torch.testing.assert_close(loss_fn(x, y), expected.float(), msg=f"step {step}")
        seen_x.append(torch.nn.functional.normalize(x, dim=1))
        seen_y.append(y)


def test_enqueue_mask_rows_are_only_enqueued():
    x, y = torch.randn(10, 6), clustered_labels(10, 2, 3)
    enqueue = torch.zeros(10, dtype=torch.bool)
    enqueue[::2] = True
    loss_fn = fastcdml.ContrastiveBayesianLoss(memory_size=16, backend="reference", **LIVELY)
    xr = x.clone().requires_grad_()
    loss = loss_fn(xr, y, enqueue_mask=enqueue)
    expected = cbml_loss(x[~enqueue], y[~enqueue], x[enqueue], y[enqueue], include_self=False, **LIVELY)
    torch.testing.assert_close(loss, expected.float())
    loss.backward()
    assert (xr.grad[enqueue] == 0).all() and (xr.grad[~enqueue] != 0).any()  # references are detached, as in PML
    assert loss_fn.memory_filled == 5 and set(loss_fn.memory_labels[:5].tolist()) == set(y[enqueue].tolist())
    with pytest.raises(ValueError, match="mutually exclusive"):
        loss_fn(x, y, miners.MultiSimilarityMiner()(x, y), enqueue_mask=enqueue)


@pytest.mark.parametrize("make_loss", [
    lambda: fastcdml.CenterContrastiveLoss(6, 8),
    lambda: fastcdml.CenterContrastiveLoss(6, 8, update="gradient", margin=0.0, center_weight=0.0),
    lambda: fastcdml.ContrastiveBayesianLoss(**LIVELY),
    lambda: fastcdml.ContrastiveBayesianLoss(memory_size=32, miner=miners.MultiSimilarityMiner(), **LIVELY),
], ids=["ccl-momentum", "ccl-gradient", "cbml", "cbml-memory-miner"])
def test_pml_trainer_with_a_miner_trains_our_losses(make_loss):
    torch.manual_seed(0)
    labels = torch.arange(6).repeat_interleave(8)
    data = torch.randn(48, 12) + 2 * torch.nn.functional.one_hot(labels, 12).float()
    dataset = torch.utils.data.TensorDataset(data, labels)
    trunk, embedder = torch.nn.Linear(12, 16), torch.nn.Linear(16, 8)
    loss_fn = make_loss()
    optimizers = {"trunk_optimizer": torch.optim.SGD(trunk.parameters(), lr=0.1),
                  "embedder_optimizer": torch.optim.SGD(embedder.parameters(), lr=0.1)}
    if list(loss_fn.parameters()):
        optimizers["metric_loss_optimizer"] = torch.optim.SGD(loss_fn.parameters(), lr=0.1)
    before = embedder.weight.detach().clone()
    trainer = trainers.MetricLossOnly(
        models={"trunk": trunk, "embedder": embedder}, optimizers=optimizers, batch_size=16,
        loss_funcs={"metric_loss": loss_fn}, mining_funcs={"tuple_miner": miners.MultiSimilarityMiner()},
        dataset=dataset, dataloader_num_workers=0,
        data_and_label_getter=lambda batch: batch)
    trainer.train(num_epochs=2)
    assert torch.isfinite(torch.tensor(trainer.losses["metric_loss"]))
    assert not torch.equal(embedder.weight, before)

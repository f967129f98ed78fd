"""torch.compile(fullgraph=True) of a training step calling each loss module, on the backend ``auto`` picks: one
compilation for many steps (the bank and the cross-batch memory are state, not guards), the same loss, gradients
and state as eager, and the input checks still fire inside the graph."""
import warnings

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import fastcdml

from .helpers import clustered_labels

STEPS = 12  # the memory (32 slots, 12 rows a step) fills, wraps and cycles its write position


def _step(net, loss_fn, x, y):
    return loss_fn(net(x), y)


def _state(loss_fn):
    if isinstance(loss_fn, fastcdml.CenterContrastiveLoss):
        return loss_fn.centers.clone()
    return torch.cat([loss_fn.memory_emb, loss_fn.memory_labels[:, None].float(),
                      loss_fn.memory_ptr.expand(loss_fn.memory_size, 1).float()], dim=1)


@pytest.mark.parametrize("loss", ["ccl", "cbml"])
def test_compiled_training_compiles_once_and_matches_eager(loss, device):
    warnings.simplefilter("ignore")
    # fresh batches: a repeated batch would tie exactly with its own memory entries
    batches = [(torch.randn(12, 16, device=device), clustered_labels(12, 2, 3).to(device)) for _ in range(STEPS)]
    results, counter = [], None
    for compiled in (False, True):
        torch.manual_seed(1)
        net = torch.nn.Linear(16, 16).to(device)
        loss_fn = (fastcdml.CenterContrastiveLoss(8, 16) if loss == "ccl"
                   else fastcdml.ContrastiveBayesianLoss(memory_size=32, neg_b=0.3, margin=0.5, embedding_size=16)).to(device)
        step = _step
        if compiled:
            torch._dynamo.reset()
            counter = CompileCounterWithBackend("inductor")
            step = torch.compile(_step, fullgraph=True, backend=counter)
        losses = []
        for x, y in batches:
            out = step(net, loss_fn, x, y)
            out.backward()
            losses.append(out.detach())
        results.append((torch.stack(losses), net.weight.grad.clone(), _state(loss_fn)))
    assert counter.frame_count == 1, f"{STEPS} compiled steps took {counter.frame_count} compilations"
    for eager, comp, what in zip(*results, ("losses", "accumulated grad", "state")):
        torch.testing.assert_close(comp, eager, atol=1e-5, rtol=1e-5, msg=what)
    if loss == "ccl":
        with pytest.raises(RuntimeError, match=r"labels must lie in \[0, 8\)"):
            torch.compile(_step, fullgraph=True)(net, loss_fn, x, y + 8)

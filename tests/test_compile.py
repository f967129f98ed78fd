"""torch.compile(fullgraph=True) of a model calling each loss module, on the backend ``auto`` picks: same loss,
gradients and bank as eager, and the input checks still fire inside the graph."""
import warnings

import pytest
import torch

import fastcdml

from .helpers import clustered_labels


def _step(net, loss_fn, x, y):
    return loss_fn(net(x), y)


@pytest.mark.parametrize("loss", ["ccl", "cbml"])
def test_compiled_step_matches_eager(loss, device):
    warnings.simplefilter("ignore")
    # a fresh batch per step: a repeated batch would tie exactly with its own memory entries
    batches = [(torch.randn(12, 16, device=device), clustered_labels(12, 2, 3).to(device)) for _ in range(2)]
    results = []
    for compiled in (False, True):
        torch.manual_seed(1)
        net = torch.nn.Linear(16, 16).to(device)
        loss_fn = (fastcdml.CenterContrastiveLoss(8, 16) if loss == "ccl"
                   else fastcdml.ContrastiveBayesianLoss(memory_size=32, neg_b=0.3, margin=0.5)).to(device)
        step = torch.compile(_step, fullgraph=True) if compiled else _step
        for x, y in batches:  # the second step sees the updated bank / filled memory
            out = step(net, loss_fn, x, y)
            out.backward()
        state = loss_fn.centers if loss == "ccl" else loss_fn.memory_emb[: loss_fn.memory_filled]
        results.append((out.detach(), net.weight.grad.clone(), state.clone()))
    for eager, comp, what in zip(*results, ("loss", "grad", "state")):
        torch.testing.assert_close(comp, eager, atol=1e-5, rtol=1e-5, msg=what)
    if loss == "ccl":
        with pytest.raises(RuntimeError, match=r"labels must lie in \[0, 8\)"):
            torch.compile(_step, fullgraph=True)(net, loss_fn, x, y + 8)

"""The smoke that .ci/install_smoke.sh runs in a fresh venv holding an installed sdist or wheel.

    python install_smoke.py cpp [CHECKOUT]     # a CCL and a CBML training step forced onto the C++ backend
    TRITON_INTERPRET=1 python install_smoke.py triton [CHECKOUT]   # the same on the Triton kernels, interpreted

With CHECKOUT (the source tree) it also checks that fastcdml was imported from site-packages, not from there.

It must run from outside the source tree: the package under test is the installed one.
"""
import sys
import time
from pathlib import Path

import torch

import fastcdml
from fastcdml import _extension

backend = sys.argv[1]
checkout = Path(sys.argv[2]).resolve() if len(sys.argv) > 2 else None
here = Path(fastcdml.__file__).resolve()
if checkout is not None:  # the installed package, not the source tree
    assert "site-packages" in here.parts and checkout not in here.parents, f"fastcdml imported from {here}"
torch.manual_seed(0)

start = time.perf_counter()
if backend == "cpp":
    module, origin, reason = _extension.load()
    assert module is not None, f"the C++ backend is unavailable: {reason}"
    # an isolated build has no torch, hence no prebuilt extension: the kernels must come from the first-use compile
    assert origin in ("jit-built", "jit-cached"), origin
    print(f"C++ backend: {origin} from {module.__file__}")



def train_step(loss_fn, name):
    """One step of a small embedding model: forward, loss, backward, optimizer step; the weights must move."""
    model = torch.nn.Linear(16, 32)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    inputs, labels = torch.randn(48, 16), torch.randint(0, 10, (48,))
    before = model.weight.detach().clone()
    loss = loss_fn(model(inputs), labels)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss) and torch.isfinite(model.weight.grad).all(), f"{name}: non-finite loss or gradient"
    assert not torch.equal(model.weight.detach(), before), f"{name}: the step did not move the weights"
    return loss.item()


ccl = fastcdml.CenterContrastiveLoss(num_classes=10, embedding_dim=32, backend=backend)
bank = ccl.centers.clone()
ccl_loss = train_step(ccl, "CCL")
assert not torch.equal(ccl.centers, bank), "the CCL momentum step did not update the center bank"
cbml = fastcdml.ContrastiveBayesianLoss(memory_size=96, embedding_dim=32, backend=backend)
cbml_loss = train_step(cbml, "CBML")
train_step(cbml, "CBML with memory")
print(f"{backend}: CCL ({ccl_loss:.3f}) and CBML ({cbml_loss:.3f}) training steps OK in "
      f"{time.perf_counter() - start:.1f} s, fastcdml from {here.parent}")

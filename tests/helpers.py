"""Shared test helpers: the tolerance rules, backend lists, input makers and the PML and compile comparisons."""
from __future__ import annotations

import torch

from fastcdml._backend import unavailable_reason

# Pass rule: error of the backend <= 2 x error of the reference run in that dtype + a floor.
FLOOR = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def lowest(*dtypes):
    """The dtype whose tolerance applies: bf16 if any input is bf16, else fp16 if any is, else fp32."""
    return next((d for d in (torch.bfloat16, torch.float16) if d in dtypes), torch.float32)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |a − e| / max(1, max |e|), NaN-aware (a NaN anywhere counts as infinite error)."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert a.shape == e.shape, f"shape {tuple(a.shape)} != {tuple(e.shape)}"
    if a.numel() == 0:
        return 0.0
    diff = (a - e).abs()
    if torch.isnan(diff).any():
        return float("inf")
    return (diff.max() / e.abs().max().clamp_min(1.0)).item()


def assert_close(actual, expected64, reference_lowp, dtype, what: str) -> None:
    """``actual`` vs the float64 reference, allowing twice the error the reference itself makes in ``dtype``."""
    bound = 2 * rel_err(reference_lowp, expected64) + FLOOR[dtype]
    err = rel_err(actual, expected64)
    assert err <= bound, f"{what}: relative error {err:.3e} > bound {bound:.3e} for {dtype}"


def kernel_backends(loss: str, device: torch.device) -> list[str]:
    """The non-reference backends that can run ``loss`` on ``device`` in this process."""
    return [b for b in ("triton", "cpp") if unavailable_reason(b, loss, device.type) is None]


def unit_rows(n: int, d: int, dtype=torch.float32, device="cpu") -> torch.Tensor:
    w = torch.randn(n, d, dtype=torch.float64)
    return (w / w.norm(dim=1, keepdim=True)).to(dtype=dtype, device=device)


def clustered_labels(b: int, lo: int = 3, hi: int = 7) -> torch.Tensor:
    """Labels with lo..hi samples per class, shuffled (CBML needs positives in the batch)."""
    labels, k = [], 0
    while len(labels) < b:
        labels += [k] * int(torch.randint(lo, hi + 1, ()))
        k += 1
    return torch.tensor(labels[:b])[torch.randperm(b)]


def assert_compiled_matches_eager(make_loss, batches, state, backend: str = "eager") -> None:
    """A fresh ``make_loss()`` run eagerly and through ``torch.compile(fullgraph=True, backend=backend)`` over
    ``batches`` of (embeddings, labels), one backward each: one compiled frame, and the same losses, embedding
    gradients and ``state(loss_fn)`` after the steps."""
    from torch._dynamo.testing import CompileCounterWithBackend

    results, counter = [], CompileCounterWithBackend(backend)
    for compiled in (False, True):
        torch.manual_seed(1)
        loss_fn = make_loss()
        step = loss_fn
        if compiled:
            torch._dynamo.reset()
            step = torch.compile(loss_fn, fullgraph=True, backend=counter)
        out = []
        for x, y in batches:
            xr = x.clone().requires_grad_()
            loss = step(xr, y)
            loss.backward()
            out.append((loss.detach(), xr.grad))
        results.append((out, state(loss_fn)))
    assert counter.frame_count == 1
    torch.testing.assert_close(results[1], results[0], rtol=1e-5, atol=1e-6)


# --- PML as the oracle: float64 PML against our float32 run, relative to the largest expected value -------------
PML_TOL = 1e-5


def rel(actual, expected):
    """max |a − e| / max |e| over the whole tensor."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    return ((a - e).abs().max() / e.abs().max()).item()


def loss_and_grads(loss_fn, weight, x, y, indices_tuple=None, dtype=None):
    """(loss, ∂loss/∂x, ∂loss/∂weight) of ``loss_fn(x, y, indices_tuple)`` with x cast to ``dtype``."""
    xr = x.detach().to(dtype or x.dtype).requires_grad_()
    loss = loss_fn(xr, y.to(xr.device), indices_tuple)
    gx, gw = torch.autograd.grad(loss, [xr, weight])
    return loss.detach(), gx, gw


def compare_with_pml(theirs, ours, weight_name, x, y, indices_tuple=None, what="", tol=PML_TOL):
    """PML's loss ``theirs`` (float64, on the CPU) against ``ours`` (float32): loss and gradients to the embeddings
    and to the weight attribute ``weight_name`` within ``tol``; returns both triples (ours, theirs)."""
    expected = loss_and_grads(theirs, getattr(theirs, weight_name), x.cpu(), y.cpu(), indices_tuple, torch.float64)
    got = loss_and_grads(ours, getattr(ours, weight_name), x, y, indices_tuple)
    for name, a, e in zip(("loss", "grad embeddings", f"grad {weight_name}"), got, expected):
        assert a.dtype == torch.float32
        err = rel(a, e)
        assert err <= tol, f"{what} {name}: relative error {err:.2e} vs PML"
    return got, expected

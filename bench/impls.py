"""Implementations the benchmark compares: one training step per (loss, impl), built on fresh random inputs.

A *step* is what one iteration of training costs the loss, identical for every implementation where the
implementation allows it:

* CCL (``variant="momentum"``): forward, backward to the queries, momentum update of the (C, D) center bank.
* CBML (``variant="self"``): forward and backward, the reference set is the batch itself.
* CBML (``variant="memory"``): forward and backward against the batch followed by a memory bank of M entries
  (no gradient to the bank), then the batch is enqueued into the FIFO bank.
* margin (``variant="gradient"``): PML's NormalizedSoftmax, CosFace, ArcFace, SubCenterArcFace (K = 3), ProxyNCA
  and SoftTriple (K = 10) with their default hyper-parameters, fastcdml's drop-in against PML's class of the same
  name: forward, backward to the embeddings and to the learnable proxies (``W`` (D, C·K), ``proxies`` (C, D),
  ``fc`` (D, C·K)); no optimizer step.
* proxy_anchor (``variant="gradient"``): PML's ProxyAnchorLoss (δ = 0.1, α = 32) against fastcdml's drop-in:
  forward, backward to the embeddings and to the learnable proxies (C, D); no optimizer step. Sizes that would
  not finish or fit on the machine are not run (:func:`over_budget`), and the run records why.

Peers that do more or less work than that say so in :data:`NOTES`. Inputs are random normal (never zeros),
labels uniform; CBML batches hold 4 samples per class so every row has positives.
"""
from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
from dataclasses import dataclass
from typing import Callable

import torch

from fastcdml import functional as F
from fastcdml._backend import resolve
from fastcdml.reference import cbml as ref_cbml
from fastcdml.reference import ccl as ref_ccl

# Hyper-parameters of every CCL step (the library defaults; τ also for the cross-entropy peers).
TAU, MARGIN, CENTER_WEIGHT, MOMENTUM = 0.05, 0.1, 1.0, 0.9
CBML_PER_CLASS = 4

IMPLS = {
    "ccl": ("fastcdml", "reference", "torch_compile", "pml_normsoftmax", "pml_proxyanchor", "cce", "liger"),
    "cbml": ("fastcdml", "reference", "torch_compile", "pml_multisimilarity", "pml_contrastive"),
    "margin": tuple(f"{who}_{name}" for name in ("normalizedsoftmax", "cosface", "arcface", "subcenter", "proxynca",
                                                 "softtriple") for who in ("fastcdml", "pml")),
    "proxy_anchor": ("fastcdml", "pml"),
}
# the margin family: bench name -> (class name in fastcdml and PML, proxies per class K, constructor arguments)
MARGIN_CLASSES = {"normalizedsoftmax": ("NormalizedSoftmaxLoss", 1, {}), "cosface": ("CosFaceLoss", 1, {}),
                  "arcface": ("ArcFaceLoss", 1, {}), "subcenter": ("SubCenterArcFaceLoss", 3, {"sub_centers": 3}),
                  "proxynca": ("ProxyNCALoss", 1, {}), "softtriple": ("SoftTripleLoss", 10, {})}
_PACKAGE = {"pml": "pytorch_metric_learning", "cce": "cut_cross_entropy", "liger": "liger_kernel"}
_DIST = {"pml": "pytorch-metric-learning", "cce": "cut-cross-entropy", "liger": "liger-kernel"}
_GPU_ONLY = ("cce", "liger")

NOTES = {
    "torch_compile": "torch.compile (inductor, dynamic=False) of the reference forward and of its bank update; "
                     "compilation is excluded by the warm-up.",
    "pml_normsoftmax": "pytorch-metric-learning NormalizedSoftmaxLoss(τ=0.05): learnable proxies get a gradient "
                       "(one more B×C×D product than the momentum step), no margin, no center pull, no bank update.",
    "pml_proxyanchor": "pytorch-metric-learning ProxyAnchorLoss: learnable proxies get a gradient (one more B×C×D "
                       "product), a different loss, no bank update.",
    "cce": "cut-cross-entropy linear_cross_entropy on x̂/τ against a bank stored in the input dtype: no margin, no "
           "center pull, gradient filtering (filter_eps='auto'); the bank update is fastcdml's.",
    "liger": "Liger-Kernel LigerFusedLinearCrossEntropyLoss on x̂/τ against a bank stored in the input dtype: no "
             "margin, no center pull; the bank update is fastcdml's.",
    "pml_multisimilarity": "pytorch-metric-learning MultiSimilarityLoss (all pairs, no miner); with CrossBatchMemory "
                           "for the memory variant (its M entries include the batch: B fewer references).",
    "pml_contrastive": "pytorch-metric-learning ContrastiveLoss (all pairs, no miner); with CrossBatchMemory for the "
                       "memory variant (its M entries include the batch: B fewer references).",
}


@dataclass(frozen=True)
class Case:
    """One measurement: ``C`` is the number of classes (CCL) or memory entries M (CBML memory; B in self mode)."""

    loss: str
    impl: str
    variant: str
    B: int
    C: int
    D: int
    dtype: str

    def label(self) -> str:
        c = "self" if self.variant == "self" else self.C
        return f"{self.loss} {self.impl} {self.B}x{c}x{self.D} {self.dtype}"


@dataclass
class Step:
    """A built step: ``run()`` does one training step; ``backend`` names what actually computed it."""

    run: Callable[[], None]
    backend: str


def unavailable(impl: str, device: torch.device) -> str | None:
    """Why ``impl`` cannot run on ``device``, or None."""
    family = impl.split("_")[0]
    if family in _PACKAGE and importlib.util.find_spec(_PACKAGE[family]) is None:
        return f"{_DIST[family]} is not installed (pip install 'fastcdml[peers]')"
    if family in _GPU_ONLY and device.type != "cuda":
        return f"{_DIST[family]} runs on CUDA only"
    return None


def _version(family: str) -> str:
    return f"{_DIST[family]} {importlib.metadata.version(_DIST[family])}"


def products(case: Case) -> list[tuple[int, int, int]]:
    """The matrix products (m, n, k), an (m × k)·(k × n) each, that the loss contract needs per step, the same for
    every impl: their FLOPs are :func:`nominal_gflop`, and their ``torch.mm`` time is the row's GEMM floor.

    CCL: the similarities X·Wᵀ and the softmax-weighted center sum P·W. margin: those two over the C·K proxies and
    the proxy gradient Pᵀ·X. proxy_anchor: the same three (the fused kernels recompute the similarities twice
    more). CBML over R references: the similarities, the query gradient, and the gradient of the batch part of the
    reference set (B × B).
    """
    b, c, d = case.B, case.C, case.D
    if case.loss == "ccl":
        return [(b, c, d), (b, d, c)]
    if case.loss in ("margin", "proxy_anchor"):
        rows = c * (MARGIN_CLASSES[case.impl.split("_", 1)[1]][1] if case.loss == "margin" else 1)
        return [(b, rows, d), (b, d, rows), (rows, d, b)]
    refs = b + (c if case.variant == "memory" else 0)
    return [(b, refs, d), (b, d, refs), (b, d, b)]


def nominal_gflop(case: Case) -> float:
    """FLOPs of :func:`products`, in GFLOP."""
    return sum(2 * m * n * k for m, n, k in products(case)) / 1e9


def make_inputs(case: Case, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    """Fresh random inputs for ``case`` (never zeros): queries ``x`` (B, D) requiring grad, ``y`` (B,) and, for
    CCL, a unit-row fp32 ``bank`` (C, D); for CBML memory, a unit-row ``bank`` (M, D) in the input dtype with
    ``bank_labels`` (M,)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    dtype = getattr(torch, case.dtype)
    x = torch.randn(case.B, case.D, generator=g).to(device, dtype).requires_grad_()
    if case.loss == "ccl":
        y = torch.randint(0, case.C, (case.B,), generator=g)
        bank = ref_ccl.normalize_rows(torch.randn(case.C, case.D, generator=g))
        return {"x": x, "y": y.to(device), "bank": bank.to(device)}
    if case.loss in ("margin", "proxy_anchor"):
        return {"x": x, "y": torch.randint(0, case.C, (case.B,), generator=g).to(device)}
    n_classes = max(case.B // CBML_PER_CLASS, 1)
    y = (torch.arange(case.B) % n_classes)[torch.randperm(case.B, generator=g)]
    out = {"x": x, "y": y.to(device)}
    if case.variant == "memory":
        bank = ref_ccl.normalize_rows(torch.randn(case.C, case.D, generator=g)).to(dtype)
        out["bank"], out["bank_labels"] = bank.to(device), torch.randint(0, n_classes, (case.C,), generator=g).to(device)
    return out


def build(case: Case, inputs: dict[str, torch.Tensor]) -> Step:
    """The step of ``case.impl`` on ``inputs`` (from :func:`make_inputs`); may mutate the bank in ``inputs``."""
    return _BUILDERS[case.loss][case.impl.split("_")[0]](case, **inputs)


# --------------------------------------------------------------------------------------------------- CCL


def _ccl_own(case, x, y, bank):
    backend = {"fastcdml": "auto", "reference": "reference"}[case.impl]
    resolved = resolve(backend, "ccl", x.device).name

    def run():
        x.grad = None
        F.center_contrastive_loss(x, y, bank, TAU, MARGIN, CENTER_WEIGHT, backend=backend, check_inputs=False).backward()
        F.center_momentum_update_(bank, x.detach(), y, MOMENTUM, backend=backend, check_inputs=False)

    return Step(run, resolved)


def _ccl_compile(case, x, y, bank):
    loss_fn = torch.compile(lambda x, y, w: ref_ccl.ccl_loss_rows(x, y, w, TAU, MARGIN, CENTER_WEIGHT).mean(),
                            dynamic=False)
    update = torch.compile(ref_ccl.ccl_momentum_update_, dynamic=False)

    def run():
        x.grad = None
        loss_fn(x, y, bank).backward()
        update(bank, x.detach(), y, MOMENTUM)

    return Step(run, "inductor")


def _ccl_pml(case, x, y, bank):
    from pytorch_metric_learning import losses

    if case.impl == "pml_normsoftmax":
        loss = losses.NormalizedSoftmaxLoss(case.C, case.D, temperature=TAU)
        with torch.no_grad():
            loss.W.copy_(bank.t())
    else:
        loss = losses.ProxyAnchorLoss(case.C, case.D)
        with torch.no_grad():
            loss.proxies.copy_(bank)
    loss = loss.to(x.device, x.dtype)

    def run():
        x.grad = None
        loss.zero_grad(set_to_none=True)
        loss(x, y).backward()

    return Step(run, _version("pml"))


def _ccl_fused_ce(case, x, y, bank):
    """cut-cross-entropy or Liger-Kernel cross entropy of x̂/τ against the bank, then fastcdml's bank update."""
    bank = bank.to(x.dtype)
    if case.impl == "cce":
        from cut_cross_entropy import linear_cross_entropy

        def ce(e):
            return linear_cross_entropy(e, bank, y)
    else:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        flce = LigerFusedLinearCrossEntropyLoss()

        def ce(e):
            return flce(bank, e, y)

    def run():
        x.grad = None
        ce((ref_ccl.normalize_rows(x) / TAU).to(x.dtype)).backward()
        F.center_momentum_update_(bank, x.detach(), y, MOMENTUM, check_inputs=False)

    return Step(run, _version(case.impl))


# ------------------------------------------------------------------------------------------------ margin


def _margin(case, x, y):
    """fastcdml's drop-in or PML's class of the same name, default hyper-parameters, the proxies (its one
    parameter) from the same seed."""
    who, name = case.impl.split("_", 1)
    cls, _, kwargs = MARGIN_CLASSES[name]
    if who == "pml":
        from pytorch_metric_learning import losses

        loss_fn, backend = getattr(losses, cls)(num_classes=case.C, embedding_size=case.D, **kwargs), _version("pml")
    else:
        import fastcdml

        loss_fn = getattr(fastcdml, cls)(case.C, case.D, check_inputs=False, **kwargs)
        backend = resolve("auto", "ccl", x.device).name
    (weight,) = loss_fn.parameters()
    with torch.no_grad():
        weight.copy_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(1)))
    loss_fn = loss_fn.to(x.device)
    (weight,) = loss_fn.parameters()

    def run():
        x.grad = None
        weight.grad = None
        loss_fn(x, y).backward()

    return Step(run, backend)


# ------------------------------------------------------------------------------------------- proxy anchor

# What a proxy-anchor step needs, for :func:`over_budget`: PML's extra memory per B×C element (two int64 one-hot
# masks and about a dozen fp32 B×C temporaries; 43.6 B measured at B = 256, C = 100k), and roughly the nominal
# GFLOP/s (6·B·C·D per step) each implementation reached at C = 1k on this project's 2-core CPU (bench/NOTES.md:
# 1–6 and 0.3–4.4), used to leave out sizes that would run for longer than the budget.
PML_BYTES_PER_BC = 44
CPU_NOMINAL_GFLOPS = {"fastcdml": 2.0, "pml": 1.0}


def _available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))


def over_budget(case: Case, device: torch.device, max_case_s: float) -> str | None:
    """Why a proxy-anchor ``case`` is left out on ``device``: PML's B×C temporaries would not fit in the memory
    available now, or (CPU) the estimated time of the timed steps (about 13 of them with the warm-ups and the
    memory run, at :data:`CPU_NOMINAL_GFLOPS`) exceeds ``max_case_s``. None: run it."""
    if case.loss != "proxy_anchor":
        return None
    if case.impl == "pml":
        need = PML_BYTES_PER_BC * case.B * case.C + 4 * case.C * case.D * 3
        have = _available_bytes(device)
        if need > 0.8 * have:
            return (f"not run: PML needs ~{need / 2**30:.1f} GiB of B×C temporaries "
                    f"({PML_BYTES_PER_BC} B per element), {have / 2**30:.1f} GiB available")
    if device.type == "cpu":
        seconds = 13 * nominal_gflop(case) / CPU_NOMINAL_GFLOPS[case.impl]
        if seconds > max_case_s:
            return f"not run: ~{seconds:,.0f} s estimated (> {max_case_s:.0f} s budget) on this CPU"
    return None


def _proxy_anchor(case, x, y):
    """fastcdml's ProxyAnchorLoss or PML's, default hyper-parameters, proxies from the same seed."""
    if case.impl == "pml":
        from pytorch_metric_learning import losses

        loss_fn, backend = losses.ProxyAnchorLoss(case.C, case.D), _version("pml")
    else:
        import fastcdml

        loss_fn = fastcdml.ProxyAnchorLoss(case.C, case.D, check_inputs=False)
        backend = resolve("auto", "proxy_anchor", x.device).name
    with torch.no_grad():
        loss_fn.proxies.copy_(torch.randn(loss_fn.proxies.shape, generator=torch.Generator().manual_seed(1)))
    loss_fn = loss_fn.to(x.device)

    def run():
        x.grad = None
        loss_fn.proxies.grad = None
        loss_fn(x, y).backward()

    return Step(run, backend)


# -------------------------------------------------------------------------------------------------- CBML

_CBML_HYPER = dict(pos_a=0.5, pos_b=0.5, neg_a=1.0, neg_b=0.01, margin=0.1, variance_weight=1.0, mean_weight=0.2,
                   phi="log")


class _Fifo:
    """The cross-batch memory's FIFO write (the module's ``_enqueue``), shared by the impls that need one."""

    def __init__(self, bank, bank_labels):
        self.bank, self.bank_labels, self.ptr = bank, bank_labels, 0

    @torch.no_grad()
    def push(self, x, y):
        b = min(x.shape[0], self.bank.shape[0])
        slots = (torch.arange(b, device=x.device) + self.ptr) % self.bank.shape[0]
        self.bank.index_copy_(0, slots, ref_ccl.normalize_rows(x[-b:]).to(self.bank.dtype))
        self.bank_labels.index_copy_(0, slots, y[-b:])
        self.ptr = (self.ptr + b) % self.bank.shape[0]


def _cbml_step(x, y, bank, bank_labels, loss_fn):
    """Forward + backward of ``loss_fn(x, y, refs, ref_labels)``, then the FIFO write in the memory variant."""
    fifo = _Fifo(bank, bank_labels) if bank is not None else None

    def run():
        x.grad = None
        loss_fn(x, y, bank, bank_labels).backward()
        if fifo is not None:
            fifo.push(x.detach(), y)

    return run


def _cbml_own(case, x, y, bank=None, bank_labels=None):
    backend = {"fastcdml": "auto", "reference": "reference"}[case.impl]
    resolved = resolve(backend, "cbml", x.device).name
    loss_fn = functools.partial(F.contrastive_bayesian_loss, include_self=True, backend=backend, check_inputs=False,
                                **_CBML_HYPER)
    return Step(_cbml_step(x, y, bank, bank_labels, loss_fn), resolved)


def _cbml_compile(case, x, y, bank=None, bank_labels=None):
    loss_fn = torch.compile(functools.partial(ref_cbml.cbml_loss, include_self=True, top_k=0, **_CBML_HYPER),
                            dynamic=False)
    return Step(_cbml_step(x, y, bank, bank_labels, loss_fn), "inductor")


def _cbml_pml(case, x, y, bank=None, bank_labels=None):
    from pytorch_metric_learning import losses

    loss = losses.MultiSimilarityLoss() if case.impl == "pml_multisimilarity" else losses.ContrastiveLoss()
    if bank is not None:
        loss = losses.CrossBatchMemory(loss, case.D, memory_size=case.C)
        loss.embedding_memory, loss.label_memory, loss.has_been_filled = bank, bank_labels, True

    def run():
        x.grad = None
        loss(x, y).backward()

    return Step(run, _version("pml"))


_BUILDERS = {
    "ccl": {"fastcdml": _ccl_own, "reference": _ccl_own, "torch": _ccl_compile, "pml": _ccl_pml,
            "cce": _ccl_fused_ce, "liger": _ccl_fused_ce},
    "cbml": {"fastcdml": _cbml_own, "reference": _cbml_own, "torch": _cbml_compile, "pml": _cbml_pml},
    "margin": {"fastcdml": _margin, "pml": _margin},
    "proxy_anchor": {"fastcdml": _proxy_anchor, "pml": _proxy_anchor},
}

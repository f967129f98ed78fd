"""Drop-in replacements for pytorch-metric-learning's pair losses: ``NTXentLoss``, ``SupConLoss``,
``MultiSimilarityLoss`` and ``ContrastiveLoss``, on the fused pair kernels (math: ``docs/spec.md``,
``fastcdml.reference.pair``).

They take PML's constructor arguments and defaults and PML's call, ``loss_fn(embeddings, labels,
indices_tuple=None, ref_emb=None, ref_labels=None)``, and return PML's value: the same pairs (every pair of the
batch with itself, self pairs excluded, or of the batch against ``ref_emb``; a miner's pairs or triplets when
``indices_tuple`` is given, with their multiplicities), the same reduction (NTXent: mean over positive pairs;
SupCon: mean over the rows whose loss is > 0; MultiSimilarity: mean over rows; Contrastive: mean over the
non-zero positive-pair losses plus mean over the non-zero negative-pair losses) and the same zero for batches
without pairs. The fused backends never form the B×R similarity matrix: each row's statistics are reduced tile
by tile, and a mined tuple is passed as a (B, R) uint8 matrix of pair multiplicities.

What differs from PML: the loss is float32 (float64 for float64 inputs on the reference backend); ``reducer``,
regularizers and distances other than PML's default are refused with an error naming them; mined positive pairs
must share their labels and negative pairs must not (as every PML miner produces them), which is checked;
``ref_emb`` needs ``ref_labels``.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import _checks
from .._backend import BACKENDS, Backend, resolve
from ..ops import pair as pair_ops
from ..reference import pair as pair_reference
from ..reference.pair import KINDS
from . import _pml

MAX_MULTIPLICITY = 255  # pair multiplicities travel as uint8


def tuple_pairs(indices_tuple, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """PML's ``convert_to_pairs`` of a mined tuple: ``(a1, p, a2, n)`` (triplets ``(a, p, n)`` give
    ``(a, p, a, n)``), int64 on ``device``."""
    parts = [t.to(device).long() for t in _pml._check_tuple(indices_tuple)]
    if len(parts) == 3:
        a, p, n = parts
        return a, p, a, n
    return tuple(parts)


def pair_counts(pairs, labels, ref_labels) -> torch.Tensor:
    """The (B, R) uint8 multiplicities of the pairs ``(a1, p, a2, n)``; checks the indices' range and that
    positives share the anchor's label and negatives do not."""
    a1, p, a2, n = pairs
    b, r = labels.shape[0], ref_labels.shape[0]
    for name, t, size in (("anchor", a1, b), ("positive", p, r), ("anchor", a2, b), ("negative", n, r)):
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= size):
            raise ValueError(f"indices_tuple: {name} indices must lie in [0, {size}), got values from "
                             f"{int(t.min())} to {int(t.max())}")
    if a1.numel() and not bool((labels[a1] == ref_labels[p]).all()):
        raise ValueError("indices_tuple: every positive pair must share its label (fastcdml's pair losses tell "
                         "positives from negatives by the labels, as PML's miners mine them)")
    if a2.numel() and bool((labels[a2] == ref_labels[n]).any()):
        raise ValueError("indices_tuple: a negative pair shares its label (fastcdml's pair losses tell positives "
                         "from negatives by the labels, as PML's miners mine them)")
    counts = torch.zeros(b * r, dtype=torch.uint8, device=labels.device)
    flat, mult = torch.unique(torch.cat([a1 * r + p, a2 * r + n]), return_counts=True)
    if mult.numel() and int(mult.max()) > MAX_MULTIPLICITY:
        raise ValueError(f"indices_tuple lists a pair {int(mult.max())} times; at most {MAX_MULTIPLICITY} "
                         "repetitions are supported")
    counts[flat] = mult.to(torch.uint8)
    return counts.view(b, r)


def check_batch(embeddings, labels, backend: Backend, check_inputs: bool) -> None:
    _checks.embeddings(embeddings, "embeddings", backend, check_values=check_inputs)
    _checks.labels(labels, "labels", embeddings, "embeddings", check_values=check_inputs)


def compute(backend: Backend, kind: str, params: tuple, x, labels, ref, ref_labels, exclude=None, counts=None):
    """The loss through ``backend`` (inputs already checked); 0 (attached to ``x``) without references."""
    if x.shape[0] == 0 or ref.shape[0] == 0:
        return x.sum(dtype=torch.float32) * 0.0 + ref.sum(dtype=torch.float32) * 0.0
    family = backend.bind(pair_ops, pair_reference)
    return family.pair_loss(kind, x, labels, ref, ref_labels, params, exclude, counts)


class PairLoss(nn.Module):
    """The common part of the four drop-ins: ``kind`` and ``params`` (the kind's hyper-parameters in constructor
    order) select the loss; ``backend`` (``"auto"``, ``"triton"``, ``"cpp"``, ``"reference"``) and
    ``check_inputs`` (shapes, dtypes, devices and finiteness, synchronising with the device) as everywhere in
    fastcdml."""

    kind: str

    def __init__(self, params: tuple, backend: str, check_inputs: bool, pml_options: dict):
        super().__init__()
        _pml.reject_options(type(self).__name__, pml_options)
        _checks.choice(backend, "backend", BACKENDS)
        self.params, self.backend, self.check_inputs = tuple(float(v) for v in params), backend, check_inputs

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        """The loss (0-d float32) in PML's call contract; see the module docstring."""
        labels = _pml.require_labels(type(self).__name__, labels)
        backend = resolve(self.backend, "pair", _checks.tensor(embeddings, "embeddings").device)
        check_batch(embeddings, labels, backend, self.check_inputs)
        exclude = None
        if ref_emb is None:
            if ref_labels is not None:
                raise ValueError("ref_labels needs ref_emb")
            ref_emb, ref_labels = embeddings, labels
        elif ref_labels is None:
            raise ValueError("ref_emb needs ref_labels")
        else:
            _checks.embeddings(ref_emb, "ref_emb", backend, embeddings.shape[1], self.check_inputs)
            _checks.same_device(ref_emb, "ref_emb", embeddings, "embeddings")
            _checks.labels(ref_labels, "ref_labels", ref_emb, "ref_emb", check_values=self.check_inputs)
        counts = None
        if indices_tuple is not None:
            counts = pair_counts(tuple_pairs(indices_tuple, embeddings.device), labels, ref_labels)
        elif ref_labels is labels:  # PML drops the diagonal exactly when the reference labels are the labels
            b, r = embeddings.shape[0], ref_emb.shape[0]
            exclude = torch.arange(b, device=embeddings.device)
            exclude = torch.where(exclude < r, exclude, -1)
        return compute(backend, self.kind, self.params, embeddings, labels, ref_emb, ref_labels, exclude, counts)

    def extra_repr(self) -> str:
        return f"params={self.params}, backend={self.backend!r}"


class NTXentLoss(PairLoss):
    """PML's ``NTXentLoss(temperature=0.07)`` (InfoNCE with every negative of the anchor): for each positive pair
    (i, p), ``softplus(log Σ_{n ∈ N_i} exp(S_in/τ) − S_ip/τ)``, averaged over the positive pairs.
    embeddings (B, D) fp32/bf16/fp16, labels (B,) int64/int32; returns a float32 scalar."""

    kind = KINDS[0]

    def __init__(self, temperature: float = 0.07, backend: str = "auto", check_inputs: bool = True, **pml_options):
        super().__init__((temperature,), backend, check_inputs, pml_options)
        self.temperature = temperature


class SupConLoss(PairLoss):
    """PML's ``SupConLoss(temperature=0.1)``: per row, ``LSE_{P ∪ N}(S/τ) − mean_P(S/τ)``, averaged over the
    rows whose loss is > 0 (PML's ``AvgNonZeroReducer``). embeddings (B, D), labels (B,); float32 scalar."""

    kind = KINDS[1]

    def __init__(self, temperature: float = 0.1, backend: str = "auto", check_inputs: bool = True, **pml_options):
        super().__init__((temperature,), backend, check_inputs, pml_options)
        self.temperature = temperature


class MultiSimilarityLoss(PairLoss):
    """PML's ``MultiSimilarityLoss(alpha=2, beta=50, base=0.5)``: per row,
    ``log(1 + Σ_P e^{α(base − S)})/α + log(1 + Σ_N e^{β(S − base)})/β``, averaged over the rows.
    embeddings (B, D), labels (B,); float32 scalar."""

    kind = KINDS[2]

    def __init__(self, alpha: float = 2, beta: float = 50, base: float = 0.5, backend: str = "auto",
                 check_inputs: bool = True, **pml_options):
        super().__init__((alpha, beta, base), backend, check_inputs, pml_options)
        self.alpha, self.beta, self.base = alpha, beta, base


class ContrastiveLoss(PairLoss):
    """PML's ``ContrastiveLoss(pos_margin=0, neg_margin=1)`` with PML's default distance (Euclidean between
    L2-normalised embeddings, d = √(2 − 2S)): ``mean⁺ [d − m⁺]₊ + mean⁻ [m⁻ − d]₊``, each mean over the pairs
    whose hinge is > 0 (PML's ``AvgNonZeroReducer``). embeddings (B, D), labels (B,); float32 scalar.
    ``distance`` may be given only as PML's default, ``LpDistance()`` (normalised, p = 2, power 1)."""

    kind = KINDS[3]

    def __init__(self, pos_margin: float = 0, neg_margin: float = 1, backend: str = "auto",
                 check_inputs: bool = True, **pml_options):
        distance = pml_options.pop("distance", None)
        if distance is not None and not (
                type(distance).__name__ == "LpDistance" and getattr(distance, "normalize_embeddings", False)
                and getattr(distance, "p", None) == 2 and getattr(distance, "power", None) == 1):
            raise ValueError(f"ContrastiveLoss: distance={type(distance).__name__}(...) is not supported: fastcdml's "
                             "ContrastiveLoss uses PML's default, LpDistance(normalize_embeddings=True, p=2, power=1)")
        super().__init__((pos_margin, neg_margin), backend, check_inputs, pml_options)
        self.pos_margin, self.neg_margin = pos_margin, neg_margin

"""Contrastive Bayesian Metric Learning loss: user API (module + functional), the cross-batch memory and
validation. The backend is resolved once per call, before any op runs; the math is in ``docs/spec.md``."""
from __future__ import annotations

import warnings

import torch
from torch import nn

from .. import _checks
from .._backend import BACKENDS, Backend, resolve
from ..ops import cbml as cbml_ops
from ..params import BayesianParams
from ..reference import cbml as cbml_reference
from ..reference.cbml import pack_pairs
from ..reference.ccl import normalize_rows
from . import _pml


def _cbml(backend: Backend):
    """The CBML family's functions (``fastcdml.reference.cbml`` / ``fastcdml.ops.cbml``) on ``backend``."""
    return backend.bind(cbml_ops, cbml_reference)


def _check_batch(embeddings, labels, backend: Backend, check_values: bool, ignore_negative_labels: bool) -> None:
    _checks.embeddings(embeddings, "embeddings", backend, check_values=check_values)
    _checks.labels(labels, "labels", embeddings, "embeddings", check_values=check_values,
                   non_negative=not ignore_negative_labels)


def _warn_if_no_pairs(labels, ref_labels, include_self: bool) -> None:
    """One warning (per call site) when no row of the batch can have both a positive and a negative: the loss is
    then 0 with a zero gradient, which is almost always a sampling mistake (CBML needs m > 1 samples per class)."""
    if torch.compiler.is_compiling() or labels.numel() == 0:
        return
    refs = torch.cat([labels, ref_labels.to(labels.dtype)]) if include_self else ref_labels.to(labels.dtype)
    refs = refs[refs >= 0]
    if refs.numel() == 0:
        has_pair = False
    else:
        classes, counts = refs.unique(return_counts=True)  # sorted
        at = torch.searchsorted(classes, labels).clamp_max(classes.numel() - 1)
        same = torch.where(classes[at] == labels, counts[at], 0)  # references sharing row i's label (self included)
        has_pair = bool(((same - int(include_self) > 0) & (refs.numel() - same > 0)).any())
    if not has_pair:
        warnings.warn("fastcdml: no row of this CBML batch has both a positive and a negative pair, so the loss is 0 "
                      "with no gradient; sample several classes with at least two samples each "
                      "(e.g. fastcdml.datasets.MPerClassSampler)", stacklevel=3)


def _nan_unless_finite(loss, *tensors):
    """``loss``, or NaN when any of ``tensors`` holds a non-finite value: the defined result of an unchecked
    non-finite input on every backend (a device-side test, no synchronisation)."""
    finite = torch.stack([torch.isfinite(t).all() for t in tensors]).all()
    return torch.where(finite, loss, torch.full_like(loss, float("nan")))


def contrastive_bayesian_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    ref_emb: torch.Tensor | None = None,
    ref_labels: torch.Tensor | None = None,
    *,
    include_self: bool | None = None,
    pos_a: float = 0.5,
    pos_b: float = 0.5,
    neg_a: float = 1.0,
    neg_b: float = 0.01,
    margin: float = 0.1,
    variance_weight: float = 1.0,
    mean_weight: float | None = None,
    phi: str = "log",
    negatives: str = "adaptive",
    top_k: int = 100,
    variance_center: str = "class_means",
    pos_weight: float = 0.25,
    neg_weight: float = 0.25,
    ignore_negative_labels: bool = False,
    indices_tuple=None,
    backend: str = "auto",
    check_inputs: bool = True,
) -> torch.Tensor:
    """CBML loss (Kan et al., arXiv 2210.04402) of ``embeddings`` (B, D) with ``labels`` (B,) int64/int32 ≥ 0:
    a float32 scalar ``Σ_i L_i / B`` (float64 for float64 reference inputs; 0 for an empty batch).

    Reference set: the batch itself when ``ref_emb`` is None (self pairs excluded by index); ``ref_emb`` (M, D)
    with ``ref_labels`` (M,) otherwise, used as given (gradient flows to it if it requires one). With
    ``include_self=True`` and a ``ref_emb``, the reference set is the batch followed by ``ref_emb`` (the
    cross-batch-memory layout). ``indices_tuple`` (a PML miner's pairs or triplets; anchors index the batch,
    positives and negatives the reference set) restricts the positive and negative sets to the mined pairs, through
    a B×R/8-byte bit mask. The formula is in ``docs/spec.md``.

    ``variance_center`` ``"class_means"`` (the authors' code since 2021-04) or ``"boundary"`` (their 2020 code)
    chooses the centre μ of the variance term; ``mean_weight`` h defaults to the value their example configs pair
    with it (0.2, or 0.5). ``phi`` ``"log"``, ``"sqrt"`` or ``"constant"`` (``1 + pos_weight·Σ`` and
    ``1 + neg_weight·Σ``). ``ignore_negative_labels=True`` accepts negative labels (a clusterer's outliers): such a
    row and such a reference are in no set (the row's loss is 0; the sum is still divided by B).
    ``check_inputs=True`` validates shapes, dtypes, devices, labels ≥ 0 (unless ignored) and finiteness
    (synchronising with the device) and warns when no row has both a positive and a negative (the loss is then 0);
    with ``False`` a non-finite input gives a NaN loss.
    """
    params = BayesianParams(pos_a, pos_b, neg_a, neg_b, margin, variance_weight, mean_weight, phi, negatives, top_k,
                            variance_center, pos_weight, neg_weight)
    return _loss(embeddings, labels, ref_emb, ref_labels, include_self, indices_tuple, params, backend, check_inputs,
                 ignore_negative_labels)


def _loss(embeddings, labels, ref_emb, ref_labels, include_self, indices_tuple, params, backend, check_inputs,
          ignore_negative_labels=False):
    """:func:`contrastive_bayesian_loss` with its parameters already gathered in ``params``."""
    _checks.choice(backend, "backend", BACKENDS)
    impl = resolve(backend, "cbml", _checks.tensor(embeddings, "embeddings").device)
    _check_batch(embeddings, labels, impl, check_inputs, ignore_negative_labels)
    if include_self is None:
        include_self = ref_emb is None
    if (ref_emb is None) != (ref_labels is None):
        raise ValueError("ref_emb and ref_labels must be given together")
    if ref_emb is None:
        if not include_self:
            raise ValueError("include_self=False needs ref_emb: the reference set would be empty")
        ref_emb, ref_labels = embeddings.new_empty(0, embeddings.shape[1]), labels.new_empty(0)
    else:
        _checks.embeddings(ref_emb, "ref_emb", impl, embeddings.shape[1], check_inputs)
        _checks.same_device(ref_emb, "ref_emb", embeddings, "embeddings")
        _checks.labels(ref_labels, "ref_labels", ref_emb, "ref_emb", check_values=check_inputs,
                       non_negative=not ignore_negative_labels)
    if check_inputs:
        _warn_if_no_pairs(labels, ref_labels, include_self)
    if embeddings.shape[0] == 0:
        return embeddings.sum(dtype=torch.float32) * 0.0
    mask = None
    if indices_tuple is not None:
        rows, cols = _pml.mined_pairs(indices_tuple, embeddings.device)
        width = ref_emb.shape[0] + (embeddings.shape[0] if include_self else 0)
        mask = pack_pairs(rows, cols, embeddings.shape[0], width)
    loss = _cbml(impl).cbml_loss(embeddings, labels, ref_emb, ref_labels, pair_mask=mask, include_self=include_self,
                                 **params.as_kwargs())
    return loss if check_inputs else _nan_unless_finite(loss, embeddings, ref_emb)


class ContrastiveBayesianLoss(nn.Module):
    """Contrastive Bayesian Metric Learning loss (Kan et al., arXiv 2210.04402, TPAMI), optionally with a
    cross-batch memory.

    ``loss_fn(embeddings, labels, ref_emb=None, ref_labels=None)`` with embeddings (B, D) fp32/bf16/fp16 and
    labels (B,) int64/int32 ≥ 0 returns the float32 scalar ``Σ_i L_i / B``; see :func:`contrastive_bayesian_loss`
    and ``docs/spec.md`` for the formula. Defaults are those of the authors' current code and example configs
    (``variance_center="class_means"`` with h = 0.2; ``"boundary"`` is their 2020 form, with h = 0.5 by default).
    ``ignore_negative_labels=True`` accepts negative labels, whose rows are in no set (a clusterer's outliers,
    e.g. from :func:`fastcdml.pseudo_labels`); they are never enqueued into the memory.

    ``memory_size > 0`` keeps a FIFO of the last ``memory_size`` L2-normalised, detached embeddings and their labels
    (buffers ``memory_emb`` (M, D) float32, ``memory_labels`` (M,) int64 with −1 in empty slots, and ``memory_ptr``,
    the next slot; ``memory_emb`` is allocated at the first call, when D is known, or at construction if
    ``embedding_size`` is given; ``embedding_dim`` is accepted as its alias). The reference set is then the batch
    (self excluded, gradient flows) followed by the filled memory entries (no gradient); in training mode the batch
    is enqueued after the loss is computed. As PML's ``CrossBatchMemory``: ``miner`` (a PML miner) mines the pairs
    of each step's queries against the whole reference set, ``indices_tuple`` adds pairs whose references index the
    batch, and ``enqueue_mask`` (B,) bool marks rows that are only enqueued (the others are the queries, compared
    with the memory and the enqueued rows). The memory always has its full shape (empty slots are ignored by their
    label), so a compiled training step compiles once (give ``embedding_size``: a memory allocated at the first call
    changes shape once, which costs one more compilation). Rows that are not finite are never enqueued (with
    ``check_inputs=False`` they reach the loss, which is then NaN on every backend). ``ref_emb`` cannot be combined
    with a memory.
    """

    def __init__(
        self,
        pos_a: float = 0.5,
        pos_b: float = 0.5,
        neg_a: float = 1.0,
        neg_b: float = 0.01,
        margin: float = 0.1,
        variance_weight: float = 1.0,
        mean_weight: float | None = None,
        phi: str = "log",
        negatives: str = "adaptive",
        top_k: int = 100,
        memory_size: int = 0,
        backend: str = "auto",
        check_inputs: bool = True,
        embedding_size: int | None = None,
        miner=None,
        variance_center: str = "class_means",
        pos_weight: float = 0.25,
        neg_weight: float = 0.25,
        ignore_negative_labels: bool = False,
        **pml_options,
    ):
        super().__init__()
        embedding_size = _checks.embedding_size_alias(embedding_size, pml_options, required=False)
        _pml.reject_options(type(self).__name__, pml_options)
        self.params = BayesianParams(pos_a, pos_b, neg_a, neg_b, margin, variance_weight, mean_weight, phi,
                                     negatives, top_k, variance_center, pos_weight, neg_weight)
        self.ignore_negative_labels = ignore_negative_labels
        _checks.choice(backend, "backend", BACKENDS)
        if memory_size < 0:
            raise ValueError(f"memory_size must be >= 0, got {memory_size}")
        if miner is not None and not memory_size:
            raise ValueError("miner= is the cross-batch memory's miner (memory_size > 0); without a memory pass the "
                             "miner's output as indices_tuple")
        self.memory_size, self.backend, self.check_inputs, self.miner = memory_size, backend, check_inputs, miner
        if memory_size:
            self.register_buffer("memory_emb", torch.zeros(memory_size, embedding_size or 0))
            self.register_buffer("memory_labels", torch.full((memory_size,), -1, dtype=torch.int64))
            self.register_buffer("memory_ptr", torch.zeros((), dtype=torch.int64))

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None,
                enqueue_mask=None):
        """The loss in PML's call order (``enqueue_mask`` as in PML's ``CrossBatchMemory``)."""
        labels = _pml.require_labels(type(self).__name__, labels)
        if not self.memory_size:
            if enqueue_mask is not None:
                raise ValueError("enqueue_mask needs a cross-batch memory (memory_size > 0)")
            return _loss(embeddings, labels, ref_emb, ref_labels, None, indices_tuple, self.params, self.backend,
                         self.check_inputs, self.ignore_negative_labels)
        if ref_emb is not None or ref_labels is not None:
            raise ValueError("ref_emb cannot be combined with memory_size > 0: the memory is the reference set")
        if indices_tuple is not None and enqueue_mask is not None:
            raise ValueError("indices_tuple and enqueue_mask are mutually exclusive (as in PML's CrossBatchMemory)")
        backend = resolve(self.backend, "cbml", _checks.tensor(embeddings, "embeddings").device)
        _check_batch(embeddings, labels, backend, self.check_inputs, self.ignore_negative_labels)
        _checks.same_device(self.memory_emb, "the memory", embeddings, "embeddings", "; move the loss with .to(device)")
        if self.memory_emb.shape[1] != embeddings.shape[1]:
            if self.memory_emb.shape[1]:
                raise ValueError(f"embeddings have dimension {embeddings.shape[1]} but the memory holds "
                                 f"{self.memory_emb.shape[1]}-dimensional entries")
            self.memory_emb = self.memory_emb.new_zeros(self.memory_size, embeddings.shape[1])
        # The memory holds rows this module normalised from checked batches: no need to scan it again.
        queries, query_labels, new = embeddings, labels, (embeddings, labels)
        ref, ref_labels, include_self = self.memory_emb, self.memory_labels, True
        if enqueue_mask is not None:
            if enqueue_mask.dtype != torch.bool or tuple(enqueue_mask.shape) != (embeddings.shape[0],):
                raise ValueError(f"enqueue_mask must be a ({embeddings.shape[0]},) bool tensor, got "
                                 f"{tuple(enqueue_mask.shape)} {enqueue_mask.dtype}")
            enqueue_mask = enqueue_mask.to(embeddings.device)
            queries, query_labels = embeddings[~enqueue_mask], labels[~enqueue_mask]
            new = (embeddings[enqueue_mask], labels[enqueue_mask])
            ref = torch.cat([normalize_rows(new[0].detach()).to(ref.dtype), ref])
            ref_labels = torch.cat([new[1].to(ref_labels.dtype), ref_labels])
            include_self = False
        if self.check_inputs:
            _warn_if_no_pairs(query_labels, ref_labels, include_self)
        if queries.shape[0] == 0:
            loss = embeddings.sum(dtype=torch.float32) * 0.0
        else:
            mask = self._mined(queries, query_labels, ref, ref_labels, include_self, indices_tuple)
            loss = _cbml(backend).cbml_loss(queries, query_labels, ref, ref_labels, pair_mask=mask,
                                            include_self=include_self, **self.params.as_kwargs())
            if not self.check_inputs:
                loss = _nan_unless_finite(loss, embeddings)
        if self.training:
            # A backend that updates in place computed its gradients in the forward, so the memory can be
            # overwritten now. The other's autograd graph still refers to the memory: give it new tensors
            # instead (an in-place write would also be mis-ordered by torch.compile's partitioner).
            self._enqueue(new[0].detach(), new[1], in_place=backend.updates_in_place)
        return loss

    @torch.no_grad()
    def _mined(self, queries, query_labels, ref, ref_labels, include_self, indices_tuple):
        """This step's pair mask, or None for every pair: the miner's pairs over the filled reference set (as PML's
        CrossBatchMemory mines them) plus those of ``indices_tuple``."""
        if self.miner is None:
            return None  # every pair, as PML's CrossBatchMemory without a miner (given tuples add nothing then)
        refs = torch.cat([queries.detach().to(ref.dtype), ref]) if include_self else ref
        refs_labels = torch.cat([query_labels.to(ref_labels.dtype), ref_labels]) if include_self else ref_labels
        filled = torch.nonzero(refs_labels >= 0).squeeze(1)
        mined = self.miner(queries.detach(), query_labels, refs[filled], refs_labels[filled])
        rows, cols = _pml.mined_pairs(mined, queries.device)
        cols = filled[cols]
        if indices_tuple is not None:
            extra_rows, extra_cols = _pml.mined_pairs(indices_tuple, queries.device)
            rows, cols = torch.cat([rows, extra_rows]), torch.cat([cols, extra_cols])
        return pack_pairs(rows, cols, queries.shape[0], refs.shape[0])

    @torch.no_grad()
    def _enqueue(self, embeddings, labels, in_place: bool):
        b = min(embeddings.shape[0], self.memory_size)
        if b == 0:
            return
        slots = (torch.arange(b, device=embeddings.device) + self.memory_ptr) % self.memory_size
        rows = normalize_rows(embeddings[-b:])
        finite = torch.isfinite(rows).all(dim=1)
        rows = torch.where(finite[:, None], rows, torch.zeros_like(rows)).to(self.memory_emb.dtype)
        new_labels = torch.where(finite & (labels[-b:] >= 0), labels[-b:].to(torch.int64), -1)
        for name, new in (("memory_emb", rows), ("memory_labels", new_labels)):
            if in_place:
                getattr(self, name).index_copy_(0, slots, new)
            else:
                setattr(self, name, getattr(self, name).index_copy(0, slots, new))
        self.memory_ptr.copy_((self.memory_ptr + b) % self.memory_size)

    @property
    def memory_filled(self) -> int:
        """How many memory slots hold an entry (reads the labels: synchronises with the device)."""
        return int((self.memory_labels >= 0).sum()) if self.memory_size else 0

    def reset_memory(self) -> None:
        """Forget every stored embedding."""
        self.memory_labels.fill_(-1)
        self.memory_ptr.zero_()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "memory_emb"
        if self.memory_size and key in state_dict:  # D is fixed by the checkpoint, not by construction
            self.memory_emb = self.memory_emb.new_empty(state_dict[key].shape)
        legacy = state_dict.pop(prefix + "_extra_state", None)
        if legacy is not None and prefix + "memory_labels" in state_dict:
            # fastcdml 0.1.0 kept the write position and fill count as extra state; slots past the fill are empty
            labels = state_dict[prefix + "memory_labels"].clone()
            labels[legacy["memory_filled"]:] = -1
            state_dict[prefix + "memory_labels"] = labels
            state_dict[prefix + "memory_ptr"] = torch.tensor(legacy["memory_ptr"], dtype=torch.int64)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"{self.params}, memory_size={self.memory_size}, backend={self.backend!r}"

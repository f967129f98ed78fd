"""``CrossBatchMemory``: pytorch-metric-learning's cross-batch memory (Wang et al., "Cross-Batch Memory for
Embedding Learning") around fastcdml's pair losses and its Contrastive Bayesian loss.

PML's semantics, step by step: the batch (or, with ``enqueue_mask``, its masked rows) is written into a FIFO of
``memory_size`` detached embeddings and labels first; the queries (the batch, or its unmasked rows) are then
compared with the filled part of the memory, which therefore holds the batch itself. Without ``enqueue_mask`` each
query's own slot is no positive of it (PML's ``remove_self_comparisons``); with a ``miner`` the pairs are the
miner's output on (queries, memory), with the self pairs removed; an ``indices_tuple`` adds its pairs (indices into
the queries and the filled memory). Gradients flow to the queries only (the memory is detached).

Without a miner and without ``indices_tuple`` the fused backends never form a B×M matrix: the self slots travel as
one index per row. Mined pairs travel as a (B, M) uint8 multiplicity matrix (pair losses) or a (B, M/8)-byte bit
mask (Contrastive Bayesian loss).
"""
from __future__ import annotations

import torch
from torch import nn

from .. import _checks
from .._backend import resolve
from ..reference.cbml import pack_pairs
from . import _pml
from .cbml import ContrastiveBayesianLoss, _cbml
from .pair import PairLoss, check_batch, compute, pair_counts, tuple_pairs


def _concatenate(mined, given, labels):
    """PML's ``create_indices_tuple`` tail: ``given`` converted to ``mined``'s arity, then appended."""
    given = tuple(t.to(labels.device).long() for t in _pml._check_tuple(given))
    if len(given) == 3 and len(mined) == 4:
        a, p, n = given
        given = (a, p, a, n)
    elif len(given) == 4 and len(mined) == 3:
        a1, p, a2, n = given
        i, j = torch.where(a1[:, None] == a2[None, :])
        given = (a1[i], p[i], n[j])
    return tuple(torch.cat([m.long(), g]) for m, g in zip(mined, given))


def _remove_self(mined, slots):
    """PML's ``remove_self_comparisons``: drop the positive pairs (or triplets) whose positive is the anchor's own
    memory slot."""
    mined = tuple(t.to(slots.device).long() for t in _pml._check_tuple(mined))
    keep = mined[1] != slots[mined[0]]
    if len(mined) == 3:
        return tuple(t[keep] for t in mined)
    a1, p, a2, n = mined
    return a1[keep], p[keep], a2, n


class CrossBatchMemory(nn.Module):
    """PML's ``CrossBatchMemory(loss, embedding_size, memory_size=1024, miner=None)``.

    ``loss``: a fastcdml ``NTXentLoss``, ``SupConLoss``, ``MultiSimilarityLoss``, ``ContrastiveLoss`` or a
    ``ContrastiveBayesianLoss`` without a memory of its own. ``forward(embeddings, labels, indices_tuple=None,
    enqueue_mask=None)`` with embeddings (B, embedding_size) and labels (B,) int64/int32 returns the loss (0-d
    float32). State (in ``state_dict``): ``embedding_memory`` (memory_size, embedding_size) in the embeddings'
    dtype (as PML, the memory follows the embeddings' device and dtype), ``label_memory`` (memory_size,) int64,
    ``queue_idx`` (the next slot) and ``has_been_filled``. ``reset_queue()`` empties it. Every check runs before
    the memory is written, so a rejected call leaves it untouched. Unlike PML, a step that enqueues nothing does not
    mark the memory as filled.
    """

    def __init__(self, loss, embedding_size: int, memory_size: int = 1024, miner=None, **pml_options):
        super().__init__()
        if not isinstance(loss, (PairLoss, ContrastiveBayesianLoss)):
            raise TypeError("CrossBatchMemory takes a fastcdml NTXentLoss, SupConLoss, MultiSimilarityLoss, "
                            f"ContrastiveLoss or ContrastiveBayesianLoss, got {type(loss).__name__}")
        if isinstance(loss, ContrastiveBayesianLoss) and loss.memory_size:
            raise ValueError("the ContrastiveBayesianLoss given to CrossBatchMemory must not have a memory of its own "
                             "(memory_size=0)")
        _pml.reject_options(type(self).__name__, pml_options)
        if embedding_size < 1 or memory_size < 1:
            raise ValueError(f"embedding_size and memory_size must be >= 1, got {embedding_size} and {memory_size}")
        self.loss, self.miner = loss, miner
        self.embedding_size, self.memory_size = embedding_size, memory_size
        self.register_buffer("embedding_memory", torch.zeros(memory_size, embedding_size))
        self.register_buffer("label_memory", torch.zeros(memory_size, dtype=torch.int64))
        self.register_buffer("queue_idx", torch.zeros((), dtype=torch.int64))
        self.register_buffer("has_been_filled", torch.zeros((), dtype=torch.bool))

    def reset_queue(self) -> None:
        """Forget every stored embedding."""
        self.embedding_memory.zero_()
        self.label_memory.zero_()
        self.queue_idx.zero_()
        self.has_been_filled.zero_()

    def _check(self, embeddings, labels, indices_tuple, enqueue_mask):
        if indices_tuple is not None and enqueue_mask is not None:
            raise ValueError("indices_tuple and enqueue_mask are mutually exclusive")
        is_cbml = isinstance(self.loss, ContrastiveBayesianLoss)
        backend = resolve(self.loss.backend, "cbml" if is_cbml else "pair",
                          _checks.tensor(embeddings, "embeddings").device)
        labels = _pml.require_labels(type(self).__name__, labels)
        check_batch(embeddings, labels, backend, self.loss.check_inputs)
        if is_cbml and self.loss.check_inputs:
            _checks.labels(labels, "labels", embeddings, "embeddings", non_negative=True)
        if embeddings.shape[1] != self.embedding_size:
            raise ValueError(f"embeddings have dimension {embeddings.shape[1]} but CrossBatchMemory was built with "
                             f"embedding_size={self.embedding_size}")
        if enqueue_mask is not None:
            if (not isinstance(enqueue_mask, torch.Tensor) or enqueue_mask.dtype != torch.bool
                    or tuple(enqueue_mask.shape) != (embeddings.shape[0],)):
                raise ValueError(f"enqueue_mask must be a ({embeddings.shape[0]},) bool tensor")
            queued = int(enqueue_mask.sum())
        else:
            queued = embeddings.shape[0]
        if queued > self.memory_size:
            raise ValueError(f"{queued} embeddings to enqueue do not fit in memory_size={self.memory_size}")
        return backend

    def forward(self, embeddings, labels, indices_tuple=None, enqueue_mask=None):
        """The loss of the queries against the memory after this step's enqueue (see the class docstring)."""
        backend = self._check(embeddings, labels, indices_tuple, enqueue_mask)
        device = embeddings.device
        self.embedding_memory = self.embedding_memory.to(device=device, dtype=embeddings.dtype)
        self.label_memory = self.label_memory.to(device)
        self.queue_idx, self.has_been_filled = self.queue_idx.to(device), self.has_been_filled.to(device)
        labels = labels.to(device)
        if enqueue_mask is not None:
            enqueue_mask = enqueue_mask.to(device)
            new, new_labels = embeddings[enqueue_mask], labels[enqueue_mask]
            embeddings, labels = embeddings[~enqueue_mask], labels[~enqueue_mask]
        else:
            new, new_labels = embeddings, labels
        slots = self._enqueue(new.detach(), new_labels)
        filled = self.memory_size if bool(self.has_been_filled) else int(self.queue_idx)
        mem, mem_labels = self.embedding_memory[:filled], self.label_memory[:filled]
        self_slots = slots if enqueue_mask is None else None
        mined = None
        if self.miner is not None:
            mined = self.miner(embeddings, labels, mem, mem_labels)
            if self_slots is not None:
                mined = _remove_self(mined, self_slots)
        if indices_tuple is not None:
            if mined is None:  # PML lists every pair (minus the self pairs) and appends the given ones
                mined = self._all_pairs(labels, mem_labels, self_slots)
            mined = _concatenate(mined, indices_tuple, labels)
        if isinstance(self.loss, ContrastiveBayesianLoss):
            return self._cbml(backend, embeddings, labels, mem, mem_labels, self_slots, mined)
        exclude = counts = None
        if mined is not None:
            counts = pair_counts(tuple_pairs(mined, device), labels, mem_labels)
        else:
            exclude = self_slots
        return compute(backend, self.loss.kind, self.loss.params, embeddings, labels, mem, mem_labels, exclude,
                       counts)

    @staticmethod
    def _all_pairs(labels, mem_labels, self_slots):
        """PML's ``get_all_pairs_indices`` of (queries, memory) without the self pairs: (a1, p, a2, n)."""
        same = labels[:, None] == mem_labels[None, :]
        a2, n = torch.where(~same)
        if self_slots is not None:
            same[torch.arange(labels.shape[0], device=labels.device), self_slots] = False
        a1, p = torch.where(same)
        return a1, p, a2, n

    def _cbml(self, backend, queries, labels, mem, mem_labels, self_slots, mined):
        b, r = queries.shape[0], mem.shape[0]
        if mined is not None:
            rows, cols = _pml.mined_pairs(mined, queries.device)
            mask = pack_pairs(rows, cols, b, r)
        else:
            mask = None
            if self_slots is not None:  # every pair but the self pairs: an all-ones bit mask with one bit cleared
                mask = torch.full((b, -(-r // 8)), 255, dtype=torch.uint8, device=queries.device)
                rows = torch.arange(b, device=queries.device)
                bits = (1 << (self_slots % 8)).to(torch.uint8)
                mask[rows, self_slots // 8] &= ~bits
        if b == 0 or r == 0:
            return queries.sum(dtype=torch.float32) * 0.0
        return _cbml(backend).cbml_loss(queries, labels, mem, mem_labels, pair_mask=mask, include_self=False,
                                        **self.loss.params.as_kwargs())

    @torch.no_grad()
    def _enqueue(self, new, new_labels):
        """Write ``new`` at the queue position (PML's ``add_to_memory``); returns the slots written."""
        b = new.shape[0]
        slots = (torch.arange(b, device=new.device) + self.queue_idx) % self.memory_size
        if b == 0:
            return slots
        self.embedding_memory.index_copy_(0, slots, new.to(self.embedding_memory.dtype))
        self.label_memory.index_copy_(0, slots, new_labels.to(torch.int64))
        prev = self.queue_idx.clone()
        self.queue_idx.copy_((self.queue_idx + b) % self.memory_size)
        self.has_been_filled |= self.queue_idx <= prev
        return slots

    def extra_repr(self) -> str:
        return f"embedding_size={self.embedding_size}, memory_size={self.memory_size}"

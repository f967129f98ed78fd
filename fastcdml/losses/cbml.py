"""Contrastive Bayesian Metric Learning loss: user API (module + functional), the cross-batch memory, validation;
the backend is chosen here, before any op runs."""
from __future__ import annotations

import torch
from torch import nn

from .. import _checks
from .._backend import BACKENDS, resolve
from ..ops import cbml as ops
from ..reference import cbml as reference
from ..reference.ccl import normalize_rows

NEGATIVES = ("adaptive", "topk")


def _check_hyper(pos_b, neg_b, margin, variance_weight, mean_weight, phi, negatives, top_k, backend):
    _checks.positive(pos_b, "pos_b")
    _checks.positive(neg_b, "neg_b")
    _checks.positive(margin, "margin", strict=False)
    _checks.positive(variance_weight, "variance_weight", strict=False)
    if not 0.0 <= mean_weight <= 1.0:
        raise ValueError(f"mean_weight must be in [0, 1], got {mean_weight}")
    _checks.choice(phi, "phi", reference.PHIS)
    _checks.choice(negatives, "negatives", NEGATIVES)
    if negatives == "topk" and top_k < 1:
        raise ValueError(f"top_k must be >= 1 with negatives='topk', got {top_k}")
    _checks.choice(backend, "backend", BACKENDS)


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
    mean_weight: float = 0.1,
    phi: str = "log",
    negatives: str = "adaptive",
    top_k: int = 100,
    backend: str = "auto",
    check_inputs: bool = True,
) -> torch.Tensor:
    """CBML loss (Kan et al., arXiv 2210.04402) of ``embeddings`` (B, D) with ``labels`` (B,): a float32 scalar
    ``Σ_i L_i / B`` (float64 for float64 reference inputs; 0 for an empty batch).

    Reference set: the batch itself when ``ref_emb`` is None (self pairs excluded by index); ``ref_emb`` (M, D)
    with ``ref_labels`` (M,) otherwise, used as given (gradient flows to it if it requires one). With
    ``include_self=True`` and a ``ref_emb``, the reference set is the batch followed by ``ref_emb`` (the
    cross-batch-memory layout). The formula is in :mod:`fastcdml.reference.cbml`.
    """
    _check_hyper(pos_b, neg_b, margin, variance_weight, mean_weight, phi, negatives, top_k, backend)
    impl, namespace = resolve(backend, "cbml", _checks.tensor(embeddings, "embeddings").device)
    _checks.embeddings(embeddings, "embeddings", impl, check_values=check_inputs)
    _checks.labels(labels, "labels", embeddings, "embeddings", check_values=check_inputs)
    if include_self is None:
        include_self = ref_emb is None
    if (ref_emb is None) != (ref_labels is None):
        raise ValueError("ref_emb and ref_labels must be given together")
    if ref_emb is None:
        if not include_self:
            raise ValueError("include_self=False needs ref_emb: the reference set would be empty")
        ref_emb, ref_labels = embeddings.new_empty(0, embeddings.shape[1]), labels.new_empty(0)
    else:
        _checks.tensor(ref_emb, "ref_emb")
        _checks.embeddings(ref_emb, "ref_emb", impl, embeddings.shape[1], check_inputs)
        _checks.same_device(ref_emb, "ref_emb", embeddings, "embeddings")
        _checks.labels(ref_labels, "ref_labels", ref_emb, "ref_emb", check_values=check_inputs)
    hyper = dict(pos_a=pos_a, pos_b=pos_b, neg_a=neg_a, neg_b=neg_b, margin=margin, variance_weight=variance_weight,
                 mean_weight=mean_weight, phi=phi, negatives=negatives, top_k=top_k)
    return _cbml(embeddings, labels, ref_emb, ref_labels, include_self, hyper, impl, namespace)


def _cbml(embeddings, labels, ref_emb, ref_labels, include_self, hyper, impl, namespace):
    """The loss on validated inputs (``ref_emb`` (M, D), M may be 0) with the backend already chosen."""
    if embeddings.shape[0] == 0:
        return embeddings.sum(dtype=torch.float32) * 0.0
    h = dict(hyper)
    h["top_k"] = h["top_k"] if h.pop("negatives") == "topk" else 0
    if impl == "reference":
        return reference.cbml_loss(embeddings, labels, ref_emb if ref_emb.shape[0] else None, ref_labels,
                                   include_self=include_self, **h)
    return ops.cbml_loss(embeddings, labels, ref_emb, ref_labels, include_self, h["pos_a"], h["pos_b"], h["neg_a"],
                         h["neg_b"], h["margin"], h["variance_weight"], h["mean_weight"], h["phi"], h["top_k"],
                         namespace)


class ContrastiveBayesianLoss(nn.Module):
    """Contrastive Bayesian Metric Learning loss (Kan et al., arXiv 2210.04402, TPAMI), optionally with a
    cross-batch memory.

    ``loss_fn(embeddings, labels, ref_emb=None, ref_labels=None)`` with embeddings (B, D) fp32/bf16/fp16 and
    labels (B,) int64/int32 returns the float32 scalar ``Σ_i L_i / B``; see :func:`contrastive_bayesian_loss`
    and :mod:`fastcdml.reference.cbml` for the formula. Defaults are the paper's reference code's.

    ``memory_size > 0`` keeps a FIFO of the last ``memory_size`` L2-normalised, detached embeddings and their
    labels (buffers ``memory_emb`` float32 and ``memory_labels``; allocated at the first call, when D is known,
    or at construction if ``embedding_dim`` is given). The reference set is then the batch (self excluded,
    gradient flows) followed by the filled memory entries (no gradient); in training mode the batch is enqueued
    after the loss is computed. ``ref_emb`` cannot be combined with a memory.
    """

    def __init__(
        self,
        pos_a: float = 0.5,
        pos_b: float = 0.5,
        neg_a: float = 1.0,
        neg_b: float = 0.01,
        margin: float = 0.1,
        variance_weight: float = 1.0,
        mean_weight: float = 0.1,
        phi: str = "log",
        negatives: str = "adaptive",
        top_k: int = 100,
        memory_size: int = 0,
        backend: str = "auto",
        check_inputs: bool = True,
        embedding_dim: int | None = None,
    ):
        super().__init__()
        _check_hyper(pos_b, neg_b, margin, variance_weight, mean_weight, phi, negatives, top_k, backend)
        if memory_size < 0:
            raise ValueError(f"memory_size must be >= 0, got {memory_size}")
        self.hyper = dict(pos_a=pos_a, pos_b=pos_b, neg_a=neg_a, neg_b=neg_b, margin=margin,
                          variance_weight=variance_weight, mean_weight=mean_weight, phi=phi, negatives=negatives,
                          top_k=top_k)
        self.memory_size, self.backend, self.check_inputs = memory_size, backend, check_inputs
        self.memory_ptr = 0  # next slot to write; saved through get_extra_state
        self.memory_filled = 0
        if memory_size:
            self.register_buffer("memory_emb", torch.zeros(memory_size, embedding_dim or 0))
            self.register_buffer("memory_labels", torch.zeros(memory_size, dtype=torch.int64))

    def forward(self, embeddings, labels, ref_emb=None, ref_labels=None):
        if not self.memory_size:
            return contrastive_bayesian_loss(embeddings, labels, ref_emb, ref_labels, **self.hyper,
                                             backend=self.backend, check_inputs=self.check_inputs)
        if ref_emb is not None:
            raise ValueError("ref_emb cannot be combined with memory_size > 0: the memory is the reference set")
        impl, namespace = resolve(self.backend, "cbml", _checks.tensor(embeddings, "embeddings").device)
        _checks.embeddings(embeddings, "embeddings", impl, check_values=self.check_inputs)
        _checks.labels(labels, "labels", embeddings, "embeddings", check_values=self.check_inputs)
        _checks.same_device(self.memory_emb, "the memory", embeddings, "embeddings", "; move the loss with .to(device)")
        if self.memory_emb.shape[1] != embeddings.shape[1]:
            if self.memory_filled:
                raise ValueError(f"embeddings have dimension {embeddings.shape[1]} but the memory holds "
                                 f"{self.memory_emb.shape[1]}-dimensional entries")
            self.memory_emb = self.memory_emb.new_zeros(self.memory_size, embeddings.shape[1])
        # The memory holds rows this module normalised from checked batches: no need to scan it again.
        n = self.memory_filled
        loss = _cbml(embeddings, labels, self.memory_emb[:n], self.memory_labels[:n], True, self.hyper, impl, namespace)
        if self.training:
            # The fused op computed its gradients in the forward, so the memory can be overwritten in place. The
            # reference's autograd graph still refers to the memory: give it a new tensor instead (an in-place
            # write would also be mis-ordered by torch.compile's partitioner).
            self._enqueue(embeddings.detach(), labels, in_place=impl != "reference")
        return loss

    @torch.no_grad()
    def _enqueue(self, embeddings, labels, in_place: bool):
        b = min(embeddings.shape[0], self.memory_size)
        if b == 0:
            return
        slots = (torch.arange(b, device=embeddings.device) + self.memory_ptr) % self.memory_size
        rows = normalize_rows(embeddings[-b:]).to(self.memory_emb.dtype)
        for name, new in (("memory_emb", rows), ("memory_labels", labels[-b:].to(torch.int64))):
            if in_place:
                getattr(self, name).index_copy_(0, slots, new)
            else:
                setattr(self, name, getattr(self, name).index_copy(0, slots, new))
        self.memory_ptr = (self.memory_ptr + b) % self.memory_size
        self.memory_filled = min(self.memory_filled + b, self.memory_size)

    def reset_memory(self) -> None:
        """Forget every stored embedding."""
        self.memory_ptr = self.memory_filled = 0

    def get_extra_state(self):
        return {"memory_ptr": self.memory_ptr, "memory_filled": self.memory_filled}

    def set_extra_state(self, state):
        self.memory_ptr, self.memory_filled = state["memory_ptr"], state["memory_filled"]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "memory_emb"
        if self.memory_size and key in state_dict:  # D is fixed by the checkpoint, not by construction
            self.memory_emb = self.memory_emb.new_empty(state_dict[key].shape)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.hyper.items()) + f", memory_size={self.memory_size}"

"""Center Contrastive Loss: user API (module + functional), state and validation. The backend is resolved once
per call, before any op runs; the math is in ``docs/spec.md``."""
from __future__ import annotations

import warnings

import torch
from torch import nn

from .. import _checks, distributed as _distributed
from .._backend import BACKENDS, Backend, resolve
from ..params import CenterParams
from ..reference.ccl import EPS, normalize_rows
from . import _pml

UPDATES = ("momentum", "gradient")
_ONE_CLASS = "with a single class the softmax term is constant and only the center pull trains"
BANK_DTYPES = (torch.float32, torch.bfloat16)


def _check_module_args(num_classes, embedding_dim, momentum, reduction, backend, dtype):
    """The constructor checks shared by the CCL modules (the loss parameters check themselves)."""
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}: {_ONE_CLASS}")
    if embedding_dim < 1:
        raise ValueError(f"embedding_dim must be >= 1, got {embedding_dim}")
    _check_call_args(momentum, reduction, backend)
    _checks.choice(dtype, "dtype", BANK_DTYPES)


def _check_call_args(momentum, reduction, backend):
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must be in [0, 1), got {momentum}")
    _checks.choice(reduction, "reduction", _checks.REDUCTIONS)
    _checks.choice(backend, "backend", BACKENDS)


def _check_inputs(embeddings, labels, centers, backend: Backend, check_inputs, embedding_dim=None):
    _checks.embeddings(embeddings, "embeddings", backend, embedding_dim, check_inputs)
    if centers.dim() != 2 or centers.shape[1] != embeddings.shape[1]:
        raise ValueError(f"centers must have shape (num_classes, {embeddings.shape[1]}), got {tuple(centers.shape)}")
    _checks.same_device(centers, "centers", embeddings, "embeddings", "; move the loss with .to(device)")
    _checks.labels(labels, "labels", embeddings, "embeddings", centers.shape[0], check_inputs)


def _empty(embeddings, centers, reduction):
    zero = embeddings.sum(dtype=torch.float32) * 0.0
    if centers.requires_grad:
        zero = zero + centers.sum(dtype=torch.float32) * 0.0
    return zero if reduction != "none" else zero.expand(0)


def _device(embeddings) -> torch.device:
    return _checks.tensor(embeddings, "embeddings").device


def center_contrastive_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    centers: torch.Tensor,
    temperature: float = 0.05,
    margin: float = 0.1,
    center_weight: float = 1.0,
    reduction: str = "mean",
    backend: str = "auto",
    check_inputs: bool = True,
) -> torch.Tensor:
    """CCL of ``embeddings`` (B, D) with ``labels`` (B,) against ``centers`` (C, D); no bank update.

    ``L_i = logsumexp_j z_ij − z_{i,y_i} − 2λ·s_{i,y_i}`` with ``s_ij = x̂_i·W_j``, ``z_ij = (s_ij − m[j=y_i])/τ``.
    ``centers`` is used as given (normalise it yourself if it is learnable); gradients flow to it if it requires
    them. Returns a float32 scalar (``mean``/``sum``; float64 for float64 reference inputs) or the (B,) vector
    (``none``). An empty batch gives 0 (``mean`` and ``sum``) or an empty vector.
    """
    params = CenterParams(temperature, margin, center_weight)
    _check_call_args(0.0, reduction, backend)
    impl = resolve(backend, "ccl", _device(embeddings))
    _check_inputs(embeddings, labels, centers, impl, check_inputs)
    if centers.shape[0] == 1:
        warnings.warn(f"fastcdml: center_contrastive_loss got one center: {_ONE_CLASS}", stacklevel=2)
    if embeddings.shape[0] == 0:
        return _empty(embeddings, centers, reduction)
    return _checks.reduce(impl.ccl_rows(embeddings, labels, centers, params), reduction)


def center_momentum_update_(
    centers: torch.Tensor,
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    momentum: float = 0.9,
    backend: str = "auto",
    check_inputs: bool = True,
) -> torch.Tensor:
    """In place, no gradient: ``W_k ← normalize(μ·W_k + (1 − μ)·mean_{i: y_i = k} x̂_i)`` for each class k in the
    batch. Absent classes are untouched; an invalid batch raises before anything is written. Returns ``centers``.
    """
    _check_call_args(momentum, "mean", backend)
    impl = resolve(backend, "ccl", _device(embeddings))
    _check_inputs(embeddings, labels, centers, impl, check_inputs)
    if not centers.is_contiguous():
        raise ValueError("centers must be contiguous to be updated in place")
    if embeddings.shape[0] == 0:
        return centers
    new = impl.ccl_update(centers, embeddings.detach(), labels, momentum)
    return new if new is centers else centers.copy_(new)


class CenterContrastiveLoss(nn.Module):
    """Center Contrastive Loss with a class-center bank (Cai, Xiong, Tian, arXiv 2308.00458).

    Call as ``loss_fn(embeddings, labels)`` with embeddings (B, embedding_dim) fp32/bf16/fp16 (fp64 with
    ``backend="reference"``) and labels (B,) int64/int32 in ``[0, num_classes)``. Each L2-normalised query is
    compared with every center by a temperature softmax with an additive cosine margin at its own class, plus a
    pull ``2λ·s_{i,y_i}`` toward its center (``λ‖x̂ − W_y‖²`` up to a constant)::

        L_i = logsumexp_j ((s_ij − m[j = y_i]) / τ) − (s_{i,y_i} − m) / τ − 2λ·s_{i,y_i},   s_ij = x̂_i · W_j

    ``update="momentum"`` (default): ``centers`` is a float32 (or ``dtype``) buffer of unit rows; in training
    mode, after the loss is computed from the current bank, each class k in the batch moves to
    ``normalize(μ·W_k + (1 − μ)·mean_{y_i = k} x̂_i)`` in place. Only the queries get a gradient.
    ``update="gradient"``: ``centers`` is a Parameter, normalised in forward, trained by the optimizer
    (a fused NormalizedSoftmax / ProxyNCA-style loss); no momentum update.

    ``check_inputs=True`` validates shapes, dtypes, devices, label range and finiteness before anything runs
    (the value checks synchronise with the device); with ``False`` an out-of-range label gives a NaN loss row and
    is ignored by the update, and non-finite embeddings give NaN without touching the bank rows they would spoil.
    The defaults τ = 0.05, m = 0.1, λ = 1, μ = 0.9, the update rule and the random start are fastcdml's choices,
    not the paper's; ``docs/spec.md`` (section 1, "Defaults and where they come from") gives the reason for each.
    To start from a pretrained network, :meth:`init_centers_` sets the bank to the class means of its embeddings.

    It follows pytorch-metric-learning's call contract (``forward(embeddings, labels, indices_tuple, ref_emb,
    ref_labels)``, mined tuples as per-sample weights); PML options it cannot honour (``reducer``, a distance
    other than cosine, regularizers) raise an error that names them.

    ``distributed="auto"`` (default): when torch.distributed is initialised with world size > 1, each momentum
    step all-gathers the batch of every rank of ``process_group`` (sizes may differ) and updates the bank with the
    global batch in rank order, so all ranks keep the bank of a single process trained on the concatenated
    batches; the loss stays the rank's own. All ranks must then call the loss together; a bad input on one rank
    raises the same error on every rank. ``True`` forces this (even at world size 1), ``False`` turns it off.
    ``stats`` (:class:`fastcdml.distributed.CommStats`) counts the bytes of those all-gathers per step and rank
    (:func:`fastcdml.distributed.step_bytes`) and logs them at DEBUG level on ``"fastcdml.distributed"``.
    """

    def __init__(
        self,
        num_classes: int,
        embedding_dim: int,
        temperature: float = 0.05,
        margin: float = 0.1,
        center_weight: float = 1.0,
        momentum: float = 0.9,
        update: str = "momentum",
        reduction: str = "mean",
        backend: str = "auto",
        check_inputs: bool = True,
        centers: torch.Tensor | None = None,
        dtype: torch.dtype = torch.float32,
        generator: torch.Generator | None = None,
        distributed: bool | str = "auto",
        process_group=None,
        **pml_options,
    ):
        super().__init__()
        _pml.reject_options(type(self).__name__, pml_options)
        self.params = CenterParams(temperature, margin, center_weight)
        _check_module_args(num_classes, embedding_dim, momentum, reduction, backend, dtype)
        _checks.choice(update, "update", UPDATES)
        _checks.choice(distributed, "distributed", ("auto", True, False))
        self.num_classes, self.embedding_dim, self.momentum = num_classes, embedding_dim, momentum
        self.update, self.reduction, self.backend, self.check_inputs = update, reduction, backend, check_inputs
        self.distributed, self.process_group = distributed, process_group
        self.stats = _distributed.CommStats()
        if centers is None:
            centers = torch.randn(num_classes, embedding_dim, generator=generator)
        elif tuple(centers.shape) != (num_classes, embedding_dim):
            raise ValueError(f"centers must have shape ({num_classes}, {embedding_dim}), got {tuple(centers.shape)}")
        bank = normalize_rows(centers.detach()).to(dtype).contiguous()
        if update == "gradient":
            self.centers = nn.Parameter(bank)
        else:
            self.register_buffer("centers", bank)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor | None = None, indices_tuple=None,
                ref_emb=None, ref_labels=None) -> torch.Tensor:
        """The loss of ``embeddings`` (B, D) with ``labels`` (B,), in PML's call order: a mined ``indices_tuple``
        (pairs or triplets) weights each row by how often it was mined, as PML's proxy losses do (the bank update
        still uses every row); ``ref_emb`` / ``ref_labels`` are not supported."""
        name = type(self).__name__
        labels = _pml.require_labels(name, labels)
        _pml.no_reference(name, ref_emb, ref_labels)
        backend = resolve(self.backend, "ccl", _device(embeddings))
        momentum_step = self.training and self.update == "momentum"

        def check():
            _check_inputs(embeddings, labels, self.centers, backend, self.check_inputs, self.embedding_dim)

        if momentum_step and _distributed.enabled(self.distributed, self.process_group):
            # the global batch in rank order; a bad input on any rank raises the same error on every rank
            self.stats.start_step(self.process_group)
            batch = _distributed.gather_batch(embeddings, labels, check, self.process_group, self.stats)[:2]
            self.stats.log_step(type(self).__name__, self.process_group)
        else:
            check()
            batch = (embeddings, labels)
        if embeddings.shape[0] == 0:
            loss = _empty(embeddings, self.centers, self.reduction)
        else:
            centers = self.centers
            if self.update == "gradient":
                centers = centers / centers.float().norm(dim=1, keepdim=True).clamp_min(EPS)
            rows = backend.ccl_rows(embeddings, labels, centers, self.params)
            weights = _pml.miner_weights(indices_tuple, rows.shape[0], rows.device)
            loss = _checks.reduce(rows if weights is None else rows * weights, self.reduction)
        if momentum_step and batch[0].shape[0]:
            # The loss was computed from the bank before this step. A backend that updates in place computed the
            # query gradient already; the other one's autograd graph holds the old bank, so swap the buffer
            # instead of writing into it (an in-place write would also be mis-ordered by torch.compile).
            self.centers = backend.ccl_update(self.centers, batch[0].detach(), batch[1], self.momentum)
        return loss

    @torch.no_grad()
    def init_centers_(self, embeddings: torch.Tensor, labels: torch.Tensor) -> "CenterContrastiveLoss":
        """Set the center of every class in ``labels`` to ``normalize(mean_{y_i = k} x̂_i)`` of ``embeddings`` (N, D)
        (e.g. a pretrained network's embeddings of the training set), in place, in either update mode; the rows of
        absent classes keep their values. With distribution enabled (see ``distributed``) every rank passes its
        part of the data and the means are over all ranks' rows (all ranks must call it together). Returns self."""
        backend = resolve(self.backend, "ccl", _device(embeddings))

        def check():
            _check_inputs(embeddings, labels, self.centers, backend, self.check_inputs, self.embedding_dim)

        if _distributed.enabled(self.distributed, self.process_group):
            embeddings, labels = _distributed.gather_batch(embeddings, labels, check, self.process_group)[:2]
        else:
            check()
        if embeddings.shape[0]:
            new = backend.ccl_update(self.centers.detach(), embeddings.detach(), labels, 0.0)  # μ = 0: the means
            if new is not self.centers:
                self.centers.copy_(new)
        return self

    @property
    def temperature(self) -> float:
        return self.params.temperature

    @property
    def margin(self) -> float:
        return self.params.margin

    @property
    def center_weight(self) -> float:
        return self.params.center_weight

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, embedding_dim={self.embedding_dim}, {self.params}, "
                f"momentum={self.momentum}, update={self.update!r}, reduction={self.reduction!r}, "
                f"backend={self.backend!r}")

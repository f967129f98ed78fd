"""Center Contrastive Loss: user API (module + functional), state and validation. The backend is resolved once
per call, before any op runs; the math is in ``docs/spec.md``."""
from __future__ import annotations

import warnings

import torch

from .. import _checks, distributed as _distributed
from .._backend import BACKENDS, Backend, resolve
from ..params import CenterParams
from . import _pml
from ._bank import ONE_CLASS, Bank, ccl, check_args, check_momentum, empty_loss

def _check_inputs(embeddings, labels, centers, backend: Backend, check_inputs):
    _checks.embeddings(embeddings, "embeddings", backend, None, check_inputs)
    if centers.dim() != 2 or centers.shape[1] != embeddings.shape[1]:
        raise ValueError(f"centers must have shape (num_classes, {embeddings.shape[1]}), got {tuple(centers.shape)}")
    _checks.same_device(centers, "centers", embeddings, "embeddings")
    _checks.labels(labels, "labels", embeddings, "embeddings", centers.shape[0], check_inputs)


def _functional_backend(embeddings, backend: str) -> Backend:
    _checks.choice(backend, "backend", BACKENDS)
    return resolve(backend, "ccl", _checks.tensor(embeddings, "embeddings").device)


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

    The per-row loss ``L_i`` of ``docs/spec.md`` §1 (``fastcdml.reference.ccl.ccl_loss_rows``). ``centers`` is
    used as given (normalise it yourself if it is learnable); gradients flow to it if it requires them. Returns a float32 scalar (``mean``/``sum``; float64 for float64 reference inputs) or the (B,) vector
    (``none``). An empty batch gives 0 (``mean`` and ``sum``) or an empty vector.
    """
    params = CenterParams(temperature, margin, center_weight)
    _checks.choice(reduction, "reduction", _checks.REDUCTIONS)
    impl = _functional_backend(embeddings, backend)
    _check_inputs(embeddings, labels, centers, impl, check_inputs)
    if centers.shape[0] == 1:
        warnings.warn(f"fastcdml: center_contrastive_loss got one center: {ONE_CLASS}", stacklevel=2)
    if embeddings.shape[0] == 0:
        return empty_loss(embeddings, centers, reduction)
    return _checks.reduce(ccl(impl).ccl_loss_rows(embeddings, labels, centers, *params.as_args()), reduction)


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
    check_momentum(momentum)
    impl = _functional_backend(embeddings, backend)
    _check_inputs(embeddings, labels, centers, impl, check_inputs)
    if not centers.is_contiguous():
        raise ValueError("centers must be contiguous to be updated in place")
    if embeddings.shape[0] == 0:
        return centers
    new = ccl(impl).ccl_momentum_update(centers, embeddings.detach(), labels, momentum)
    return new if new is centers else centers.copy_(new)


class CenterContrastiveLoss(Bank):
    """Center Contrastive Loss with a class-center bank (Cai, Xiong, Tian, arXiv 2308.00458).

    Call as ``loss_fn(embeddings, labels)`` with embeddings (B, embedding_size) fp32/bf16/fp16 (fp64 with
    ``backend="reference"``) and labels (B,) int64/int32 in ``[0, num_classes)``. Each L2-normalised query is
    compared with every center by a temperature softmax with an additive cosine margin at its own class, plus a
    pull toward its center (the formula: ``docs/spec.md`` §1, ``fastcdml.reference.ccl``).

    ``update="momentum"`` (default): ``centers`` is a float32 (or ``dtype``) buffer of unit rows; in training
    mode, after the loss is computed from the current bank, each class in the batch moves toward its batch mean by
    the momentum update (``fastcdml.reference.ccl.ccl_momentum_update``), in place. Only the queries get a
    gradient.
    ``update="gradient"``: ``centers`` is a Parameter, normalised in forward, trained by the optimizer
    (a fused NormalizedSoftmax / ProxyNCA-style loss); no momentum update.

    ``check_inputs=True`` validates shapes, dtypes, devices, label range and finiteness before anything runs
    (the value checks synchronise with the device); with ``False`` an out-of-range label gives a NaN loss row and
    is ignored by the update, and non-finite embeddings give NaN without touching the bank rows they would spoil.
    The defaults τ = 0.05, m = 0.1, λ = 1, μ = 0.9, the update rule and the random start are fastcdml's choices,
    not the paper's; ``docs/spec.md`` (section 1, "Defaults and where they come from") gives the reason for each.
    To start from a pretrained network, :meth:`init_centers_` sets the bank to the class means of its embeddings
    (with distribution enabled, every rank passes its part of the data and all ranks call it together).
    ``embedding_dim`` is accepted as an alias of ``embedding_size``.

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
        embedding_size: int | None = None,
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
        embedding_size = _checks.embedding_size_alias(embedding_size, pml_options)
        _pml.reject_options(type(self).__name__, pml_options)
        params = CenterParams(temperature, margin, center_weight)
        check_args(num_classes, embedding_size, update, momentum, backend, reduction, dtype)
        _checks.choice(distributed, "distributed", ("auto", True, False))
        if centers is None:
            centers = torch.randn(num_classes, embedding_size, generator=generator)
        elif tuple(centers.shape) != (num_classes, embedding_size):
            raise ValueError(f"centers must have shape ({num_classes}, {embedding_size}), got {tuple(centers.shape)}")
        super().__init__(num_classes, embedding_size, params, update, momentum, backend, check_inputs, centers, dtype)
        self.reduction, self.distributed, self.process_group = reduction, distributed, process_group
        self.stats = _distributed.CommStats()

    def _checked_batch(self, embeddings, labels, backend, momentum_step):
        """With distribution enabled, a momentum step (and :meth:`init_centers_`) moves the bank with the global
        batch in rank order; a bad input on any rank raises the same error on every rank."""
        if not (momentum_step and _distributed.enabled(self.distributed, self.process_group)):
            return super()._checked_batch(embeddings, labels, backend, momentum_step)
        self.stats.start_step(self.process_group)
        batch = _distributed.gather_batch(embeddings, labels, lambda: self._check(embeddings, labels, backend),
                                          self.process_group, self.stats)[:2]
        self.stats.log_step(type(self).__name__, self.process_group)
        return batch

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
        return (f"num_classes={self.num_classes}, embedding_size={self.embedding_size}, {self.params}, "
                f"momentum={self.momentum}, update={self.update!r}, reduction={self.reduction!r}, "
                f"backend={self.backend!r}")

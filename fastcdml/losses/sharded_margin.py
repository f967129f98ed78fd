"""Class-sharded versions of the margin-softmax drop-ins (``fastcdml.losses.margin``): for 10⁵–10⁷ identities,
the way Partial FC (An et al. 2021) shards the classifier, on the fused per-slice kernels.

``ShardedNormalizedSoftmaxLoss``, ``ShardedCosFaceLoss``, ``ShardedArcFaceLoss`` and ``ShardedSubCenterArcFaceLoss``
take the single-process class's arguments (PML's) plus ``shard_sizes``, ``sample_rate`` and ``process_group``.
Rank r stores only the columns of PML's ``W`` (embedding_size, num_classes·K) that belong to its classes
``[start, stop)``: ``W`` of shape (embedding_size, (stop − start)·K), a Parameter trained by the optimizer on the
local slice (``update="gradient"``, PML's) or, with ``update="momentum"``, a buffer of unit columns. The step is
:class:`fastcdml.losses.sharded_ccl.ShardedBank`'s (all-gather of the batch, a MAX all-reduce and a SUM
reduce-scatter; in gradient mode an all-reduce of every row's sum-exp, an all-gather of the rows' grad_output in
backward and a local proxy gradient, never an all-reduce of W's gradient). Each rank's loss is PML's on its own rows (miner weights included); its value and
the embeddings' gradient equal the single-process loss's on that batch; W's slice receives the average over ranks
of each rank's loss gradient (DDP's convention; with equal batch sizes, the single-process gradient on the
concatenated batch). Do not wrap these losses in DDP.

Checkpoints: ``state_dict()`` holds the slice and its class range; ``load_state_dict`` also takes a full
``{"W": (D, C·K)}`` (PML's or the single-process drop-in's state dict, :meth:`full_state_dict`,
``merge_shards``) and keeps this rank's columns, so a checkpoint re-shards to any world size. ``W`` is drawn
like PML's (Gaussian, or ``weight_init_func`` applied to the rank's slice) but in class blocks, so that with
torch seeded alike on every rank it does not depend on the world size.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .. import _checks
from ..params import CenterParams
from . import _pml
from .margin import arcface_params, check_args, cosface_params, normalized_softmax_params, scaled_cosines
from .sharded_ccl import ShardedBank


class _ShardedMarginSoftmaxLoss(ShardedBank):
    """The shared sharded drop-in: PML's call contract on :class:`ShardedBank` with PML's ``W`` layout."""

    KEY, COLUMNS = "W", True

    def __init__(self, num_classes: int, embedding_size: int, params: CenterParams, update: str, momentum: float,
                 backend: str, check_inputs: bool, weight_init_func, shard_sizes, sample_rate, process_group,
                 pml_kwargs):
        check_args(type(self).__name__, num_classes, embedding_size, update, momentum, backend, pml_kwargs)
        super().__init__(num_classes, embedding_size, params, update, momentum, backend, check_inputs, None,
                         torch.float32, None, shard_sizes, sample_rate, process_group,
                         normalize_init=update == "momentum", init=weight_init_func)

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        """The mean over this rank's batch of the miner-weighted per-sample losses, float32 (PML's call contract);
        a collective: every rank calls it (and backward) together."""
        name = type(self).__name__
        labels = _pml.require_labels(name, labels)
        _pml.no_reference(name, ref_emb, ref_labels)
        device = _checks.tensor(embeddings, "embeddings").device
        labels = _checks.tensor(labels, "labels").to(device)
        rows = self.loss_rows(embeddings, labels)
        weights = _pml.miner_weights(indices_tuple, rows.shape[0], device)
        return self._reduce(rows if weights is None else rows * weights.to(rows.dtype), "mean")

    def get_logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(B, stop − start): the scaled class cosines of this rank's classes, no margin (PML's ``get_logits``,
        restricted to the slice; not a collective)."""
        return scaled_cosines(embeddings, self.bank_rows(), self.params)


class ShardedNormalizedSoftmaxLoss(_ShardedMarginSoftmaxLoss):
    """Class-sharded :class:`fastcdml.NormalizedSoftmaxLoss` (see the module docstring)."""

    def __init__(self, num_classes: int, embedding_size: int, temperature: float = 0.05, *,
                 update: str = "gradient", momentum: float = 0.9, backend: str = "auto", check_inputs: bool = True,
                 weight_init_func=None, shard_sizes: Sequence[int] | None = None, sample_rate: float = 1.0,
                 process_group=None, **kwargs):
        super().__init__(num_classes, embedding_size, normalized_softmax_params(temperature), update, momentum,
                         backend, check_inputs, weight_init_func, shard_sizes, sample_rate, process_group, kwargs)
        self.temperature = temperature


class ShardedCosFaceLoss(_ShardedMarginSoftmaxLoss):
    """Class-sharded :class:`fastcdml.CosFaceLoss` (see the module docstring)."""

    def __init__(self, num_classes: int, embedding_size: int, margin: float = 0.35, scale: float = 64, *,
                 update: str = "gradient", momentum: float = 0.9, backend: str = "auto", check_inputs: bool = True,
                 weight_init_func=None, shard_sizes: Sequence[int] | None = None, sample_rate: float = 1.0,
                 process_group=None, **kwargs):
        super().__init__(num_classes, embedding_size, cosface_params(margin, scale), update, momentum, backend,
                         check_inputs, weight_init_func, shard_sizes, sample_rate, process_group, kwargs)
        self.margin, self.scale = margin, scale


class ShardedArcFaceLoss(_ShardedMarginSoftmaxLoss):
    """Class-sharded :class:`fastcdml.ArcFaceLoss` (``margin`` in degrees, kept in radians in ``self.margin``)."""

    def __init__(self, num_classes: int, embedding_size: int, margin: float = 28.6, scale: float = 64, *,
                 update: str = "gradient", momentum: float = 0.9, backend: str = "auto", check_inputs: bool = True,
                 weight_init_func=None, shard_sizes: Sequence[int] | None = None, sample_rate: float = 1.0,
                 process_group=None, sub_centers: int = 1, **kwargs):
        params = arcface_params(margin, scale, sub_centers)
        super().__init__(num_classes, embedding_size, params, update, momentum, backend, check_inputs,
                         weight_init_func, shard_sizes, sample_rate, process_group, kwargs)
        self.margin, self.scale = params.margin, scale


class ShardedSubCenterArcFaceLoss(ShardedArcFaceLoss):
    """Class-sharded :class:`fastcdml.SubCenterArcFaceLoss`: a rank owns all K sub-center columns of its classes."""

    def __init__(self, num_classes: int, embedding_size: int, margin: float = 28.6, scale: float = 64,
                 sub_centers: int = 3, **kwargs):
        super().__init__(num_classes, embedding_size, margin, scale, sub_centers=sub_centers, **kwargs)

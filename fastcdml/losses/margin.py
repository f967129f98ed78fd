"""Drop-in replacements for pytorch-metric-learning's margin-softmax proxy losses, on the fused CCL kernels.

``NormalizedSoftmaxLoss``, ``CosFaceLoss``, ``ArcFaceLoss`` and ``SubCenterArcFaceLoss`` take PML's constructor
arguments and defaults, keep PML's learnable ``W`` of shape (embedding_size, num_classes·K) (so a PML
``state_dict`` loads unchanged and ``parameters()`` feeds a loss optimizer), offer ``get_logits`` as PML does,
and are called as PML's losses are: ``loss_fn(embeddings, labels, indices_tuple=None)``. Each is the CCL family's
per-row loss (``docs/spec.md`` §1b, ``fastcdml.reference.ccl``) with scale S = 1/τ, no center pull, PML's column
layout (class j owns columns j·K … j·K+K−1 of W, the class cosine is the max over them) and the label transform
``t(c) = c`` (NormalizedSoftmax), ``c − m`` (CosFace), ``cos(arccos c + m)`` with PML's fallback past θ = π − m
(ArcFace, SubCenterArcFace), averaged with PML's miner weights (``fastcdml.losses._pml.miner_weights``). One
fused kernel computes the loss, the query gradient and the proxy gradient without a B×C matrix.

``update="momentum"`` (not in PML) makes ``W`` a buffer of unit columns that, in training mode, moves toward the
batch's class means after each step (CCL's in-place bank, no optimizer): with sub-centers each query moves the
sub-center of its class it is most similar to. As in ``CenterContrastiveLoss``, every row of the batch moves the
bank, mined or not.

What PML accepts and these classes refuse, with an error naming it (``fastcdml.losses._pml``): ``reducer``, a
``distance`` other than ``CosineSimilarity()``, regularizers, ``collect_stats``, ``ref_emb`` / ``ref_labels``
(PML's proxy losses refuse those too). ``weight_init_func`` is honoured. The loss is float32 whatever the
embeddings' dtype (PML returns the embeddings' dtype).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..params import CenterParams
from ..reference.ccl import ADDITIVE_ANGULAR, ADDITIVE_COSINE, class_cosines, compute_dtype, normalize_rows
from . import _pml
from ._bank import Bank, check_args as check_bank_args


def normalized_softmax_params(temperature: float) -> CenterParams:
    return CenterParams(temperature, 0.0, 0.0)


def cosface_params(margin: float, scale: float) -> CenterParams:
    return CenterParams(1.0 / scale, margin, 0.0, ADDITIVE_COSINE)


def arcface_params(margin_degrees: float, scale: float, sub_centers: int = 1) -> CenterParams:
    return CenterParams(1.0 / scale, math.radians(margin_degrees), 0.0, ADDITIVE_ANGULAR, sub_centers)


def check_args(name: str, num_classes, embedding_size, update, momentum, backend, pml_kwargs) -> None:
    """The constructor checks the margin drop-ins share with their sharded versions."""
    _pml.reject_options(name, pml_kwargs)
    check_bank_args(num_classes, embedding_size, update, momentum, backend)


def initial_columns(embedding_size: int, columns: int, weight_init_func) -> torch.Tensor:
    """PML's initial ``W`` (embedding_size, columns): ``weight_init_func`` (default ``nn.init.normal_``) applied
    to an empty matrix."""
    w = torch.empty(embedding_size, columns)
    (weight_init_func or nn.init.normal_)(w)
    return w


class _MarginSoftmaxLoss(Bank):
    """The shared module: PML's ``W`` of shape (embedding_size, C·K) as the bank's columns; subclasses set the
    parameters. In momentum mode ``W`` is a buffer of unit columns (a loaded one, e.g. PML's, is normalised)."""

    KEY, COLUMNS, NORMALIZE_ON_LOAD = "W", True, True

    def __init__(self, num_classes, embedding_size, params: CenterParams, update, momentum, backend, check_inputs,
                 weight_init_func, pml_kwargs):
        check_args(type(self).__name__, num_classes, embedding_size, update, momentum, backend, pml_kwargs)
        w = initial_columns(embedding_size, num_classes * params.sub_centers, weight_init_func)
        super().__init__(num_classes, embedding_size, params, update, momentum, backend, check_inputs, w.t(),
                         normalize=update == "momentum")

    def get_logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(B, num_classes) class cosines times the scale, without the margin (PML's ``get_logits``)."""
        return scaled_cosines(embeddings, self.bank_rows(), self.params)

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, embedding_size={self.embedding_size}, {self.params}, "
                f"update={self.update!r}, backend={self.backend!r}")


def scaled_cosines(embeddings: torch.Tensor, bank: torch.Tensor, params: CenterParams) -> torch.Tensor:
    """Class cosines of ``embeddings`` against the (C·K, D) ``bank`` times the scale 1/τ, no margin (B, C)."""
    dtype = compute_dtype(embeddings, bank)
    return class_cosines(normalize_rows(embeddings, dtype), bank.to(dtype), params.sub_centers) / params.temperature


class NormalizedSoftmaxLoss(_MarginSoftmaxLoss):
    """PML's ``NormalizedSoftmaxLoss``: softmax over the cosines to the normalised columns of ``W`` at temperature
    τ (no margin). ``update``, ``momentum``, ``backend`` and ``check_inputs`` are fastcdml's (see the module)."""

    def __init__(self, num_classes: int, embedding_size: int, temperature: float = 0.05, *,
                 update: str = "gradient", momentum: float = 0.9, backend: str = "auto", check_inputs: bool = True,
                 weight_init_func=None, **kwargs):
        super().__init__(num_classes, embedding_size, normalized_softmax_params(temperature), update, momentum,
                         backend, check_inputs, weight_init_func, kwargs)
        self.temperature = temperature


class CosFaceLoss(_MarginSoftmaxLoss):
    """PML's ``CosFaceLoss``: scale·(c − m) at the label, scale·c elsewhere (``margin`` in cosine units)."""

    def __init__(self, num_classes: int, embedding_size: int, margin: float = 0.35, scale: float = 64, *,
                 update: str = "gradient", momentum: float = 0.9, backend: str = "auto", check_inputs: bool = True,
                 weight_init_func=None, **kwargs):
        super().__init__(num_classes, embedding_size, cosface_params(margin, scale), update, momentum, backend,
                         check_inputs, weight_init_func, kwargs)
        self.margin, self.scale = margin, scale


class ArcFaceLoss(_MarginSoftmaxLoss):
    """PML's ``ArcFaceLoss``: scale·cos(θ + m) at the label (``margin`` given in degrees and kept in radians in
    ``self.margin``, as PML does), with PML's fallback scale·(cos θ − m·sin m) past θ = π − m. ``sub_centers``
    (1 here) is how :class:`SubCenterArcFaceLoss` reuses it."""

    def __init__(self, num_classes: int, embedding_size: int, margin: float = 28.6, scale: float = 64, *,
                 update: str = "gradient", momentum: float = 0.9, backend: str = "auto", check_inputs: bool = True,
                 weight_init_func=None, sub_centers: int = 1, **kwargs):
        params = arcface_params(margin, scale, sub_centers)
        super().__init__(num_classes, embedding_size, params, update, momentum, backend, check_inputs,
                         weight_init_func, kwargs)
        self.margin, self.scale = params.margin, scale


class SubCenterArcFaceLoss(ArcFaceLoss):
    """PML's ``SubCenterArcFaceLoss``: ArcFace on the class cosine max_k c_{j,k} over ``sub_centers`` columns per
    class (class j owns columns j·K … j·K+K−1 of ``W``); each class's gradient reaches its argmax sub-center."""

    def __init__(self, num_classes: int, embedding_size: int, margin: float = 28.6, scale: float = 64,
                 sub_centers: int = 3, **kwargs):
        super().__init__(num_classes, embedding_size, margin, scale, sub_centers=sub_centers, **kwargs)

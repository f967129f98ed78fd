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

``ProxyNCALoss`` (PML's ``proxies`` (C, D); NormalizedSoftmax at τ = 1/(2·softmax_scale), PML's anchor-only
miner weights and its dropping of rows whose label probability underflows) and ``SoftTripleLoss`` (PML's ``fc``
(D, C·K); the class cosine is the softmax-weighted mean of its K centres, ``CenterParams.gamma``) run on the same
kernels; they are trained by gradient only.

What PML accepts and these classes refuse, with an error naming it (``fastcdml.losses._pml``): ``reducer``, a
``distance`` other than ``CosineSimilarity()``, regularizers, ``collect_stats``, ``ref_emb`` / ``ref_labels``
(PML's proxy losses refuse those too). ``weight_init_func`` is honoured. The loss is float32 whatever the
embeddings' dtype (PML returns the embeddings' dtype).
"""
from __future__ import annotations

import dataclasses
import functools
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


def initial_columns(embedding_size: int, columns: int, weight_init_func, default=nn.init.normal_) -> torch.Tensor:
    """PML's initial ``W`` (embedding_size, columns): ``weight_init_func`` (default ``default``, PML's
    ``nn.init.normal_``) applied to an empty matrix."""
    w = torch.empty(embedding_size, columns)
    (weight_init_func or default)(w)
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
    return class_cosines(normalize_rows(embeddings, dtype), bank.to(dtype), params.sub_centers,
                         params.gamma) / params.temperature


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


class ProxyNCALoss(Bank):
    """PML's ``ProxyNCALoss``: NCA against one learnable proxy per class, ``proxies`` (num_classes, embedding_size)
    initialised as PML does (``weight_init_func``, default ``torch.nn.init.normal_``).

    PML computes ``softmax_j(−s·‖x̂_i − p̂_j‖²)`` (its default distance, squared Euclidean between L2-normalised
    vectors) and takes ``−log`` of the label's probability. With unit vectors ``‖x̂ − p̂‖² = 2 − 2·x̂·p̂``, and the
    constant cancels in the softmax, so this is exactly :class:`NormalizedSoftmaxLoss` at temperature
    ``τ = 1/(2·softmax_scale)`` on the rows of ``proxies``, and runs on the same kernels.

    Miner weights as PML's NCA: a row weighs the number of times it is an *anchor* of the mined tuples over the
    largest such count (positives and negatives are not counted).

    PML's reduction: a row whose label probability ``exp(−L_i)`` underflows to 0 is dropped, and the loss is the
    mean of the (miner-weighted) kept rows; with every row dropped it is NaN with zero gradients (as PML's mean
    of nothing). The underflow is judged in the computation dtype: float32 for the fused kernels whatever the
    embeddings' dtype (L_i > ~103.3), float64 for float64 embeddings on the reference (L_i > ~744.4); since
    ``L_i ≤ 4·softmax_scale + log(num_classes)``, it needs ``softmax_scale`` above ~24 (float32). PML judges it in
    the embeddings' dtype, so for float16 / bfloat16 embeddings it drops rows from a smaller ``L_i`` than fastcdml
    (``docs/spec.md``). An empty batch gives 0.

    ``softmax_scale`` must be > 0. ``distance`` may be PML's default ``LpDistance(power=2)`` (what is computed);
    any other distance, a reducer, regularizers and ``collect_stats`` are refused with an error naming them.
    ``backend`` and ``check_inputs`` as in :class:`NormalizedSoftmaxLoss`; the proxies are trained by gradient.
    """

    KEY = "proxies"

    def __init__(self, num_classes: int, embedding_size: int, softmax_scale: float = 1, *, backend: str = "auto",
                 check_inputs: bool = True, weight_init_func=None, **kwargs):
        name = type(self).__name__
        if "distance" in kwargs and _is_squared_l2(kwargs["distance"]):
            del kwargs["distance"]
        elif "distance" in kwargs:
            raise ValueError(f"{name}: distance={type(kwargs['distance']).__name__}() is not supported: ProxyNCA "
                             "compares L2-normalised embeddings by squared Euclidean distance (PML's default "
                             "LpDistance(power=2))")
        check_args(name, num_classes, embedding_size, "gradient", 0.0, backend, kwargs)
        if not softmax_scale > 0:
            raise ValueError(f"softmax_scale must be > 0, got {softmax_scale}")
        proxies = torch.empty(num_classes, embedding_size)
        (weight_init_func or nn.init.normal_)(proxies)
        super().__init__(num_classes, embedding_size, normalized_softmax_params(1.0 / (2.0 * softmax_scale)),
                         "gradient", 0.0, backend, check_inputs, proxies, normalize=False)
        self.softmax_scale = softmax_scale

    def _reduce(self, rows, indices_tuple):
        """PML's rule: drop the rows whose label probability exp(−L_i) is 0, average the (weighted) others."""
        weights = _pml.miner_weights(indices_tuple, rows.shape[0], rows.device, anchors_only=True)
        keep = torch.exp(-rows) > 0
        kept = torch.where(keep, rows if weights is None else rows * weights.to(rows.dtype), 0.0)
        n = keep.sum()
        return torch.where(n > 0, kept.sum() / n.clamp_min(1), float("nan"))

    def get_logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(B, num_classes) squared Euclidean distances between the normalised embeddings and proxies (PML's
        ``get_logits``: its distance matrix)."""
        return (2.0 - scaled_cosines(embeddings, self.bank_rows(), normalized_softmax_params(0.5))).clamp_min(0.0)

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, embedding_size={self.embedding_size}, "
                f"softmax_scale={self.softmax_scale}, backend={self.backend!r}")


def _is_squared_l2(distance) -> bool:
    """Whether ``distance`` is PML's ``LpDistance(p=2, power=2)`` on normalised embeddings (ProxyNCA's default)."""
    return (type(distance).__name__ == "LpDistance" and getattr(distance, "p", None) == 2
            and getattr(distance, "power", None) == 2 and getattr(distance, "normalize_embeddings", False))


class SoftTripleLoss(Bank):
    """PML's ``SoftTripleLoss``: ``centers_per_class`` K learnable centres per class, PML's ``fc``
    (embedding_size, num_classes·K) (class j owns columns j·K … j·K+K−1, PML's initialisation
    ``kaiming_uniform_(a=√5)`` unless ``weight_init_func`` is given). With ``s_ijk`` the cosine of query i and
    centre k of class j (PML's ``CosineSimilarity``: both normalised)::

        S_ij = Σ_k softmax_k(s_ijk/γ)·s_ijk                         (PML's ``get_logits``)
        L_i  = w_i·cross_entropy(la·(S_i − margin·onehot(y_i)), y_i),   loss = mean_i L_i

    i.e. the margin-softmax family at scale ``la``, an additive cosine ``margin`` on the label, and the
    softmax-weighted mean over a class's centres in place of SubCenterArcFace's max (``CenterParams.gamma`` = γ);
    every centre of a class gets a share of its gradient, ``∂S_ij/∂s_ijk = q_ijk·(1 + (s_ijk − S_ij)/γ)``. One
    fused pass, no B×(C·K) matrix. ``w_i``: PML's miner weights (``convert_to_weights``).

    As PML, ``self.gamma`` holds 1/γ. ``la`` and ``gamma`` must be > 0, ``margin`` ≥ 0. Not supported (an error
    names them): PML's ``weight_regularizer`` / ``weight_reg_weight`` (the SoftTriple paper's centre regulariser is
    one: add its term to the loss yourself), a ``distance`` other than ``CosineSimilarity()``, ``reducer``,
    ``collect_stats``. ``backend`` and ``check_inputs`` as in :class:`NormalizedSoftmaxLoss`; ``fc`` is trained by
    gradient. The loss is float32.
    """

    KEY, COLUMNS = "fc", True

    def __init__(self, num_classes: int, embedding_size: int, centers_per_class: int = 10, la: float = 20,
                 gamma: float = 0.1, margin: float = 0.01, *, backend: str = "auto", check_inputs: bool = True,
                 weight_init_func=None, **kwargs):
        check_args(type(self).__name__, num_classes, embedding_size, "gradient", 0.0, backend, kwargs)
        for name, value in (("la", la), ("gamma", gamma)):
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        if not isinstance(centers_per_class, int) or centers_per_class < 1:
            raise ValueError(f"centers_per_class must be an integer >= 1, got {centers_per_class}")
        params = CenterParams(1.0 / la, margin, 0.0, ADDITIVE_COSINE, centers_per_class, gamma)
        fc = initial_columns(embedding_size, num_classes * centers_per_class, weight_init_func,
                             functools.partial(nn.init.kaiming_uniform_, a=math.sqrt(5)))
        super().__init__(num_classes, embedding_size, params, "gradient", 0.0, backend, check_inputs, fc.t(),
                         normalize=False)
        self.centers_per_class, self.la, self.gamma, self.margin = centers_per_class, la, 1.0 / gamma, margin

    def get_logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(B, num_classes) ``S_ij``, the softmax-weighted centre cosines, without ``la`` or the margin (PML's)."""
        return scaled_cosines(embeddings, self.bank_rows(), dataclasses.replace(self.params, temperature=1.0))

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, embedding_size={self.embedding_size}, "
                f"centers_per_class={self.centers_per_class}, la={self.la}, gamma={1.0 / self.gamma}, "
                f"margin={self.margin}, backend={self.backend!r}")

"""Drop-in replacements for pytorch-metric-learning's margin-softmax proxy losses, on the fused CCL kernels.

``NormalizedSoftmaxLoss``, ``CosFaceLoss``, ``ArcFaceLoss`` and ``SubCenterArcFaceLoss`` take PML's constructor
arguments and defaults, keep PML's learnable ``W`` of shape (embedding_size, num_classes·K) (so a PML
``state_dict`` loads unchanged and ``parameters()`` feeds a loss optimizer), offer ``get_logits`` as PML does,
and are called as PML's losses are: ``loss_fn(embeddings, labels, indices_tuple=None)``. They compute, with
``c_ij`` the cosine of query i and class j (the max over its K sub-centers, PML's column layout: class j owns
columns j·K … j·K+K−1 of W) and scale S = 1/τ::

    L_i = w_i · (logsumexp_j S·c'_ij − S·c'_{i,y_i}),    c'_ij = c_ij off the label, t(c_{i,y_i}) at it
    loss = mean_i L_i                                       (PML's MeanReducer)

with ``t(c) = c`` (NormalizedSoftmax), ``c − m`` (CosFace), ``cos(arccos c + m)`` with PML's fallback
``c − m·sin m`` past θ = π − m (ArcFace, SubCenterArcFace), and ``w_i`` PML's miner weights: without an
``indices_tuple`` all 1, else the number of times row i appears in the mined tuples divided by the largest such
count (``pytorch_metric_learning.utils.loss_and_miner_utils.convert_to_weights``). One fused kernel computes
the loss, the query gradient and the proxy gradient without a B×C matrix; the math is in ``docs/spec.md`` and
``fastcdml.reference.ccl``.

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

import dataclasses
import functools
import math

import torch
from torch import nn

from .. import _checks
from .._backend import BACKENDS, resolve
from ..params import CenterParams
from ..reference.ccl import ADDITIVE_ANGULAR, ADDITIVE_COSINE, EPS, class_cosines, compute_dtype, normalize_rows
from . import _pml

UPDATES = ("gradient", "momentum")


def normalized_softmax_params(temperature: float) -> CenterParams:
    return CenterParams(temperature, 0.0, 0.0)


def cosface_params(margin: float, scale: float) -> CenterParams:
    return CenterParams(1.0 / scale, margin, 0.0, ADDITIVE_COSINE)


def arcface_params(margin_degrees: float, scale: float, sub_centers: int = 1) -> CenterParams:
    return CenterParams(1.0 / scale, math.radians(margin_degrees), 0.0, ADDITIVE_ANGULAR, sub_centers)


def check_args(name: str, num_classes, embedding_size, update, momentum, backend, pml_kwargs) -> None:
    """The constructor checks the margin drop-ins share with their sharded versions."""
    _pml.reject_options(name, pml_kwargs)
    if num_classes < 2 or embedding_size < 1:
        raise ValueError(f"num_classes must be >= 2 and embedding_size >= 1, got {num_classes}, {embedding_size}")
    _checks.choice(update, "update", UPDATES)
    _checks.choice(backend, "backend", BACKENDS)
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must be in [0, 1), got {momentum}")


class _ProxyRowsLoss(nn.Module):
    """PML's call contract on the CCL kernels, shared by every proxy-softmax drop-in: checks, backend choice, the
    per-row losses of the embeddings against ``self._bank()`` (C·K, D) with ``self.params``, PML's miner weights
    and a reduction (``_reduce``); ``_after_rows`` lets a subclass move its bank."""

    params: CenterParams
    num_classes: int
    embedding_size: int
    backend: str
    check_inputs: bool
    _ANCHOR_WEIGHTS = False  # miner weights count anchors only (PML's NCA losses)

    def _bank(self) -> torch.Tensor:
        raise NotImplementedError

    def _reduce(self, rows: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
        """PML's MeanReducer over the miner-weighted rows."""
        return (rows if weights is None else rows * weights.to(rows.dtype)).mean()

    def _after_rows(self, backend, bank, embeddings, labels) -> None:
        """Called after the loss of a non-empty batch (the momentum step of a bank)."""

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        """The miner-weighted per-sample losses reduced as PML does, float32 (PML's call contract)."""
        name = type(self).__name__
        labels = _pml.require_labels(name, labels)
        _pml.no_reference(name, ref_emb, ref_labels)
        device = _checks.tensor(embeddings, "embeddings").device
        labels = _checks.tensor(labels, "labels").to(device)
        backend = resolve(self.backend, "ccl", device)
        _checks.embeddings(embeddings, "embeddings", backend, self.embedding_size, self.check_inputs)
        _checks.labels(labels, "labels", embeddings, "embeddings", self.num_classes, self.check_inputs)
        weights = _pml.miner_weights(indices_tuple, embeddings.shape[0], device, self._ANCHOR_WEIGHTS)
        bank = self._bank()
        if embeddings.shape[0] == 0:
            return embeddings.sum(dtype=torch.float32) * 0.0 + bank.sum(dtype=torch.float32) * 0.0
        loss = self._reduce(backend.ccl_rows(embeddings, labels, bank, self.params), weights)
        self._after_rows(backend, bank, embeddings, labels)
        return loss


class _MarginSoftmaxLoss(_ProxyRowsLoss):
    """The shared module: state (``W``), PML's call contract, backend choice; subclasses set the parameters."""

    def __init__(self, num_classes, embedding_size, params: CenterParams, update, momentum, backend, check_inputs,
                 weight_init_func, pml_kwargs):
        super().__init__()
        check_args(type(self).__name__, num_classes, embedding_size, update, momentum, backend, pml_kwargs)
        self.params = params
        self.num_classes, self.embedding_size = num_classes, embedding_size
        self.update, self.momentum, self.backend, self.check_inputs = update, momentum, backend, check_inputs
        w = torch.empty(embedding_size, num_classes * params.sub_centers)
        (weight_init_func or nn.init.normal_)(w)
        if update == "gradient":
            self.W = nn.Parameter(w)
        else:  # the bank: unit rows, contiguous as (C·K, D), exposed with PML's (D, C·K) shape
            self.register_buffer("W", normalize_rows(w.t()).contiguous().t())
            self.register_load_state_dict_post_hook(_normalize_loaded_bank)

    @property
    def sub_centers(self) -> int:
        return self.params.sub_centers

    def _bank(self) -> torch.Tensor:
        """The (C·K, D) rows the kernels read: the unit columns of ``W`` transposed."""
        if self.update == "gradient":
            return unit_columns(self.W).t()
        if not self.W.t().is_contiguous():  # e.g. after a load or a move that did not keep the layout
            self.W = self.W.t().contiguous().t()
        return self.W.t()

    def _after_rows(self, backend, bank, embeddings, labels):
        if self.training and self.update == "momentum":
            new = backend.ccl_update(bank, embeddings.detach(), labels, self.momentum, self.sub_centers)
            if new is not bank:  # the reference returns a new bank: autograd still holds the old one
                self.W = new.t()

    def get_logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(B, num_classes) class cosines times the scale, without the margin (PML's ``get_logits``)."""
        return scaled_cosines(embeddings, self._bank(), self.params)

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, embedding_size={self.embedding_size}, {self.params}, "
                f"update={self.update!r}, backend={self.backend!r}")


def unit_columns(w: torch.Tensor) -> torch.Tensor:
    """``w`` with each column divided by max(its fp32 norm, eps), differentiable (a learnable bank's kernel view)."""
    return w / w.float().norm(dim=0, keepdim=True).clamp_min(EPS)


def scaled_cosines(embeddings: torch.Tensor, bank: torch.Tensor, params: CenterParams) -> torch.Tensor:
    """Class cosines of ``embeddings`` against the (C·K, D) ``bank`` times the scale 1/τ, no margin (B, C)."""
    dtype = compute_dtype(embeddings, bank)
    return class_cosines(normalize_rows(embeddings, dtype), bank.to(dtype), params.sub_centers,
                         params.gamma) / params.temperature


def _normalize_loaded_bank(module, incompatible_keys):
    """Momentum mode keeps unit bank rows: a loaded ``W`` (e.g. PML's, not normalised) has its columns normalised
    (and its (C·K, D) rows made contiguous) right after loading."""
    with torch.no_grad():
        module.W = normalize_rows(module.W.t()).to(module.W.dtype).contiguous().t()


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


class ProxyNCALoss(_ProxyRowsLoss):
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
    ``L_i ≤ 4·softmax_scale + log(num_classes)``, it needs ``softmax_scale`` above ~25 (float32). PML judges it in
    the embeddings' dtype, so for float16 / bfloat16 embeddings it drops rows from a smaller ``L_i`` than fastcdml
    (``docs/spec.md``). An empty batch gives 0.

    ``softmax_scale`` must be > 0. ``distance`` may be PML's default ``LpDistance(power=2)`` (what is computed);
    any other distance, a reducer, regularizers and ``collect_stats`` are refused with an error naming them.
    ``backend`` and ``check_inputs`` as in :class:`NormalizedSoftmaxLoss`.
    """

    _ANCHOR_WEIGHTS = True

    def __init__(self, num_classes: int, embedding_size: int, softmax_scale: float = 1, *, backend: str = "auto",
                 check_inputs: bool = True, weight_init_func=None, **kwargs):
        super().__init__()
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
        self.params = normalized_softmax_params(1.0 / (2.0 * softmax_scale))
        self.num_classes, self.embedding_size, self.softmax_scale = num_classes, embedding_size, softmax_scale
        self.backend, self.check_inputs = backend, check_inputs
        self.proxies = nn.Parameter(torch.empty(num_classes, embedding_size))
        (weight_init_func or nn.init.normal_)(self.proxies.data)

    def _bank(self) -> torch.Tensor:
        return unit_columns(self.proxies.t()).t()

    def _reduce(self, rows, weights):
        """PML's rule: drop the rows whose label probability exp(−L_i) is 0, average the (weighted) others."""
        keep = torch.exp(-rows) > 0
        kept = torch.where(keep, rows if weights is None else rows * weights.to(rows.dtype), 0.0)
        n = keep.sum()
        return torch.where(n > 0, kept.sum() / n.clamp_min(1), float("nan"))

    def get_logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(B, num_classes) squared Euclidean distances between the normalised embeddings and proxies (PML's
        ``get_logits``: its distance matrix)."""
        params = normalized_softmax_params(0.5)  # 2·cosine
        return (2.0 - scaled_cosines(embeddings, self._bank(), params)).clamp_min(0.0)

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, embedding_size={self.embedding_size}, "
                f"softmax_scale={self.softmax_scale}, backend={self.backend!r}")


def _is_squared_l2(distance) -> bool:
    """Whether ``distance`` is PML's ``LpDistance(p=2, power=2)`` on normalised embeddings (ProxyNCA's default)."""
    return (type(distance).__name__ == "LpDistance" and getattr(distance, "p", None) == 2
            and getattr(distance, "power", None) == 2 and getattr(distance, "normalize_embeddings", False))


class SoftTripleLoss(_ProxyRowsLoss):
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
    ``collect_stats``. ``backend`` and ``check_inputs`` as in :class:`NormalizedSoftmaxLoss`. The loss is float32.
    """

    def __init__(self, num_classes: int, embedding_size: int, centers_per_class: int = 10, la: float = 20,
                 gamma: float = 0.1, margin: float = 0.01, *, backend: str = "auto", check_inputs: bool = True,
                 weight_init_func=None, **kwargs):
        super().__init__()
        check_args(type(self).__name__, num_classes, embedding_size, "gradient", 0.0, backend, kwargs)
        for name, value in (("la", la), ("gamma", gamma)):
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        if not isinstance(centers_per_class, int) or centers_per_class < 1:
            raise ValueError(f"centers_per_class must be an integer >= 1, got {centers_per_class}")
        self.params = CenterParams(1.0 / la, margin, 0.0, ADDITIVE_COSINE, centers_per_class, gamma)
        self.num_classes, self.embedding_size, self.centers_per_class = num_classes, embedding_size, centers_per_class
        self.la, self.gamma, self.margin = la, 1.0 / gamma, margin
        self.backend, self.check_inputs = backend, check_inputs
        self.fc = nn.Parameter(torch.empty(embedding_size, num_classes * centers_per_class))
        (weight_init_func or functools.partial(nn.init.kaiming_uniform_, a=math.sqrt(5)))(self.fc.data)

    def _bank(self) -> torch.Tensor:
        return unit_columns(self.fc).t()

    def get_logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(B, num_classes) ``S_ij``, the softmax-weighted centre cosines, without ``la`` or the margin (PML's)."""
        return scaled_cosines(embeddings, self._bank(), dataclasses.replace(self.params, temperature=1.0))

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, embedding_size={self.embedding_size}, "
                f"centers_per_class={self.centers_per_class}, la={self.la}, gamma={1.0 / self.gamma}, "
                f"margin={self.margin}, backend={self.backend!r}")

"""The hyper-parameters of each loss family, named once: the modules, the functional API, the backends and the
tests all pass these frozen dataclasses around. Each validates itself on construction, and its error names the
argument. The math they parametrise is in ``docs/spec.md``."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from ._checks import choice

PHIS = ("log", "sqrt", "constant")
NEGATIVES = ("adaptive", "topk")
VARIANCE_CENTERS = ("class_means", "boundary")
# h of the authors' example configs for each centre of the variance term (configs/example_*.yaml):
# 0.2 since 2022-06 with the class-means centre, 0.5 in 2020 with the boundary centre.
DEFAULT_MEAN_WEIGHT = {"class_means": 0.2, "boundary": 0.5}


def _at_least(value: float, name: str, bound: float = 0.0, strict: bool = False) -> None:
    if not (value > bound if strict else value >= bound):
        raise ValueError(f"{name} must be {'>' if strict else '>='} {bound}, got {value}")


@dataclass(frozen=True)
class CenterParams:
    """Center Contrastive Loss and its margin-softmax family (the formula: ``docs/spec.md``,
    ``fastcdml.reference.ccl``).

    ``temperature`` τ > 0 (the scale is 1/τ), ``margin`` m ≥ 0 (on the label column), ``center_weight`` λ ≥ 0
    (pull of the query toward its own center), ``margin_type`` 0 = additive cosine ``t(c) = c − m`` (CCL, CosFace,
    NormalizedSoftmax with m = 0) or 1 = additive angular ``t(c) = cos(arccos c + m)``, m in radians (ArcFace, with
    PML's fallback past π − m), ``sub_centers`` K ≥ 1 consecutive bank rows per class, ``gamma`` γ ≥ 0 how a
    class's K cosines become ``c_ij``: 0 = their max (SubCenterArcFace), > 0 = their softmax-weighted mean
    ``Σ_k softmax_k(s_ijk/γ)·s_ijk`` (SoftTriple)."""

    temperature: float = 0.05
    margin: float = 0.1
    center_weight: float = 1.0
    margin_type: int = 0
    sub_centers: int = 1
    gamma: float = 0.0

    def __post_init__(self):
        _at_least(self.temperature, "temperature", strict=True)
        _at_least(self.gamma, "gamma")
        _at_least(self.margin, "margin")
        _at_least(self.center_weight, "center_weight")
        choice(self.margin_type, "margin_type", (0, 1))
        if not isinstance(self.sub_centers, int) or self.sub_centers < 1:
            raise ValueError(f"sub_centers must be an integer >= 1, got {self.sub_centers}")

    def as_args(self) -> tuple:
        """The fields in the order of the CCL functions' positional hyper-parameters (``fastcdml.reference.ccl``
        and ``fastcdml.ops.ccl``): ``(temperature, margin, center_weight, margin_type, sub_centers)``."""
        return self.temperature, self.margin, self.center_weight, self.margin_type, self.sub_centers


@dataclass(frozen=True)
class BayesianParams:
    """Contrastive Bayesian loss: the posterior-style terms ``φ(1 + Σ exp(∓(S − a)/b))`` over the hard positives
    and negatives plus ``variance_weight ·`` the metric-variance term ``Σ_N (S − μ)²`` (``docs/spec.md``).

    ``pos_a``, ``pos_b`` > 0, ``neg_a``, ``neg_b`` > 0: the positive/negative centres and widths; ``margin`` ≥ 0:
    the hard-pair margin; ``variance_weight`` w ≥ 0; ``mean_weight`` h ∈ [0, 1], or None for the value the authors'
    example configs pair with ``variance_center`` (0.2 for ``"class_means"``, 0.5 for ``"boundary"``);
    ``phi`` ``"log"``, ``"sqrt"`` or ``"constant"`` (``1 + w·Σ exp`` with ``pos_weight`` / ``neg_weight`` ≥ 0, used by
    it only); ``negatives`` ``"adaptive"`` (margin rule) or ``"topk"`` (the ``top_k`` ≥ 1 hardest);
    ``variance_center`` ``"class_means"`` (μ = h·mean(P) + (1−h)·mean(N), the authors' code since 2021-04) or
    ``"boundary"`` (μ = (1−h)·mean(row) + h·(minP + maxN)/2, their code of 2020)."""

    pos_a: float = 0.5
    pos_b: float = 0.5
    neg_a: float = 1.0
    neg_b: float = 0.01
    margin: float = 0.1
    variance_weight: float = 1.0
    mean_weight: float | None = None
    phi: str = "log"
    negatives: str = "adaptive"
    top_k: int = 100
    variance_center: str = "class_means"
    pos_weight: float = 0.25
    neg_weight: float = 0.25

    def __post_init__(self):
        choice(self.variance_center, "variance_center", VARIANCE_CENTERS)
        if self.mean_weight is None:
            object.__setattr__(self, "mean_weight", DEFAULT_MEAN_WEIGHT[self.variance_center])
        _at_least(self.pos_b, "pos_b", strict=True)
        _at_least(self.neg_b, "neg_b", strict=True)
        _at_least(self.margin, "margin")
        _at_least(self.variance_weight, "variance_weight")
        _at_least(self.pos_weight, "pos_weight")
        _at_least(self.neg_weight, "neg_weight")
        if not 0.0 <= self.mean_weight <= 1.0:
            raise ValueError(f"mean_weight must be in [0, 1], got {self.mean_weight}")
        choice(self.phi, "phi", PHIS)
        choice(self.negatives, "negatives", NEGATIVES)
        if self.negatives == "topk" and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1 with negatives='topk', got {self.top_k}")

    def as_kwargs(self) -> dict:
        """The keyword hyper-parameters of ``cbml_loss`` in ``fastcdml.reference.cbml`` and ``fastcdml.ops.cbml``."""
        return dict(pos_a=self.pos_a, pos_b=self.pos_b, neg_a=self.neg_a, neg_b=self.neg_b, margin=self.margin,
                    variance_weight=self.variance_weight, mean_weight=self.mean_weight, phi=self.phi,
                    top_k=self.hard_negatives, variance_center=self.variance_center, pos_weight=self.pos_weight,
                    neg_weight=self.neg_weight)

    @property
    def hard_negatives(self) -> int:
        """The op-level encoding of the negative rule: 0 = adaptive, K > 0 = the K hardest."""
        return self.top_k if self.negatives == "topk" else 0


@dataclass(frozen=True)
class ProxyAnchorParams:
    """Proxy Anchor (PML's ``ProxyAnchorLoss``): ``log(1 + Σ exp(α(δ − c) + w − 1))`` over each proxy's positives
    and ``log(1 + Σ exp(α(c + δ) + w − 1))`` over its negatives (``docs/spec.md``, 1d).

    ``margin`` δ (finite; PML does not restrict its sign), ``alpha`` α > 0 (the scale). One proxy per class:
    ``sub_centers`` is 1 (what the bank base class reads)."""

    margin: float = 0.1
    alpha: float = 32.0
    sub_centers: ClassVar[int] = 1

    def __post_init__(self):
        _at_least(self.alpha, "alpha", strict=True)
        if not math.isfinite(self.margin):
            raise ValueError(f"margin must be finite, got {self.margin}")

    def as_args(self) -> tuple:
        """``(margin, alpha)``: the hyper-parameters of ``fastcdml.reference.proxy_anchor`` / ``ops.proxy_anchor``."""
        return self.margin, self.alpha

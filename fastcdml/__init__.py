"""fastcdml: fused, memory-lean deep-metric-learning losses (Center Contrastive, Contrastive Bayesian, and drop-ins
for pytorch-metric-learning's NormalizedSoftmax, CosFace, ArcFace, SubCenterArcFace, ProxyAnchor, NTXent, SupCon,
MultiSimilarity and Contrastive losses and its CrossBatchMemory).

Backends: Triton kernels on CUDA tensors, the C++ extension on CPU tensors, and the pure-PyTorch reference
everywhere; ``fastcdml.backends()`` says which this installation has. ``fastcdml.evaluation`` (retrieval
metrics) and ``fastcdml.datasets`` (CUB, Cars196, SOP, In-Shop, an m-per-class sampler) load on first use.
"""
import importlib

from . import distributed, functional, ops, reference
from ._backend import BackendUnavailable, available as backends, load_extension
from .losses import (
    ArcFaceLoss,
    CenterContrastiveLoss,
    ContrastiveBayesianLoss,
    ContrastiveLoss,
    CosFaceLoss,
    CrossBatchMemory,
    MultiSimilarityLoss,
    NTXentLoss,
    NormalizedSoftmaxLoss,
    ProxyAnchorLoss,
    ProxyNCALoss,
    SoftTripleLoss,
    ShardedArcFaceLoss,
    ShardedCenterContrastiveLoss,
    ShardedCosFaceLoss,
    ShardedNormalizedSoftmaxLoss,
    ShardedProxyAnchorLoss,
    ShardedSubCenterArcFaceLoss,
    SubCenterArcFaceLoss,
    SupConLoss,
)
from .clustering import pseudo_labels
from .params import BayesianParams, CenterParams

load_extension(build=False)  # registers the C++ CPU kernels if built; compiling waits for the first CPU op

__version__ = "0.1.0"
_LAZY = ("evaluation", "datasets")
__all__ = [
    "CenterContrastiveLoss",
    "ContrastiveBayesianLoss",
    "ShardedCenterContrastiveLoss",
    "NormalizedSoftmaxLoss",
    "CosFaceLoss",
    "ArcFaceLoss",
    "SubCenterArcFaceLoss",
    "ProxyNCALoss",
    "SoftTripleLoss",
    "ShardedNormalizedSoftmaxLoss",
    "ShardedCosFaceLoss",
    "ShardedArcFaceLoss",
    "ShardedSubCenterArcFaceLoss",
    "ProxyAnchorLoss",
    "ShardedProxyAnchorLoss",
    "NTXentLoss",
    "SupConLoss",
    "MultiSimilarityLoss",
    "ContrastiveLoss",
    "CrossBatchMemory",
    "CenterParams",
    "BayesianParams",
    "pseudo_labels",
    "BackendUnavailable",
    "backends",
    "distributed",
    "functional",
    "ops",
    "reference",
    *_LAZY,
    "__version__",
]


def __getattr__(name):
    if name in _LAZY:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'fastcdml' has no attribute {name!r}")

"""fastcdml: fused, memory-lean deep-metric-learning losses (Center Contrastive, Contrastive Bayesian).

Backends: Triton kernels on CUDA tensors, the C++ extension on CPU tensors, and the pure-PyTorch reference
everywhere; ``fastcdml.backends()`` says which this installation has.
"""
from . import distributed, functional, ops, reference
from ._backend import BackendUnavailable, available as backends, load_extension
from .losses import CenterContrastiveLoss, ContrastiveBayesianLoss, ShardedCenterContrastiveLoss

load_extension(build=False)  # registers the C++ CPU kernels if built; compiling waits for the first CPU op

__version__ = "0.1.0"
__all__ = [
    "CenterContrastiveLoss",
    "ContrastiveBayesianLoss",
    "ShardedCenterContrastiveLoss",
    "distributed",
    "BackendUnavailable",
    "backends",
    "functional",
    "ops",
    "reference",
    "__version__",
]

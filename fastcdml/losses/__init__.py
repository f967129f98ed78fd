"""User-facing loss modules."""
from .cbml import ContrastiveBayesianLoss
from .ccl import CenterContrastiveLoss
from .cross_batch_memory import CrossBatchMemory
from .margin import (ArcFaceLoss, CosFaceLoss, NormalizedSoftmaxLoss, ProxyNCALoss, SoftTripleLoss,
                     SubCenterArcFaceLoss)
from .pair import ContrastiveLoss, MultiSimilarityLoss, NTXentLoss, SupConLoss
from .proxy_anchor import ProxyAnchorLoss
from .sharded_ccl import ShardedCenterContrastiveLoss
from .sharded_margin import (ShardedArcFaceLoss, ShardedCosFaceLoss, ShardedNormalizedSoftmaxLoss,
                             ShardedSubCenterArcFaceLoss)
from .sharded_proxy_anchor import ShardedProxyAnchorLoss

__all__ = ["CenterContrastiveLoss", "ContrastiveBayesianLoss", "ShardedCenterContrastiveLoss", "NormalizedSoftmaxLoss",
           "CosFaceLoss", "ArcFaceLoss", "SubCenterArcFaceLoss", "ShardedNormalizedSoftmaxLoss", "ShardedCosFaceLoss",
           "ShardedArcFaceLoss", "ShardedSubCenterArcFaceLoss", "ProxyAnchorLoss", "ShardedProxyAnchorLoss",
           "ProxyNCALoss", "SoftTripleLoss", "NTXentLoss", "SupConLoss", "MultiSimilarityLoss", "ContrastiveLoss",
           "CrossBatchMemory"]

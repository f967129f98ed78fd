"""User-facing loss modules."""
from .cbml import ContrastiveBayesianLoss
from .ccl import CenterContrastiveLoss
from .margin import (ArcFaceLoss, CosFaceLoss, NormalizedSoftmaxLoss, ProxyNCALoss, SoftTripleLoss,
                     SubCenterArcFaceLoss)
from .sharded_ccl import ShardedCenterContrastiveLoss
from .sharded_margin import (ShardedArcFaceLoss, ShardedCosFaceLoss, ShardedNormalizedSoftmaxLoss,
                             ShardedSubCenterArcFaceLoss)

__all__ = ["CenterContrastiveLoss", "ContrastiveBayesianLoss", "ShardedCenterContrastiveLoss", "NormalizedSoftmaxLoss",
           "CosFaceLoss", "ArcFaceLoss", "SubCenterArcFaceLoss", "ShardedNormalizedSoftmaxLoss", "ShardedCosFaceLoss",
           "ShardedArcFaceLoss", "ShardedSubCenterArcFaceLoss", "ProxyNCALoss", "SoftTripleLoss"]

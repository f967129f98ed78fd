"""User-facing loss modules."""
from .cbml import ContrastiveBayesianLoss
from .ccl import CenterContrastiveLoss
from .proxy_anchor import ProxyAnchorLoss
from .margin import ArcFaceLoss, CosFaceLoss, NormalizedSoftmaxLoss, SubCenterArcFaceLoss
from .sharded_ccl import ShardedCenterContrastiveLoss
from .sharded_proxy_anchor import ShardedProxyAnchorLoss
from .sharded_margin import (ShardedArcFaceLoss, ShardedCosFaceLoss, ShardedNormalizedSoftmaxLoss,
                             ShardedSubCenterArcFaceLoss)

__all__ = ["CenterContrastiveLoss", "ContrastiveBayesianLoss", "ShardedCenterContrastiveLoss", "NormalizedSoftmaxLoss",
           "CosFaceLoss", "ArcFaceLoss", "SubCenterArcFaceLoss", "ShardedNormalizedSoftmaxLoss", "ShardedCosFaceLoss",
           "ShardedArcFaceLoss", "ShardedSubCenterArcFaceLoss", "ProxyAnchorLoss",
           "ShardedProxyAnchorLoss"]

"""User-facing loss modules."""
from .cbml import ContrastiveBayesianLoss
from .ccl import CenterContrastiveLoss
from .sharded_ccl import ShardedCenterContrastiveLoss

__all__ = ["CenterContrastiveLoss", "ContrastiveBayesianLoss", "ShardedCenterContrastiveLoss"]

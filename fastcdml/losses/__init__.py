"""User-facing loss modules."""
from .cbml import ContrastiveBayesianLoss
from .ccl import CenterContrastiveLoss

__all__ = ["CenterContrastiveLoss", "ContrastiveBayesianLoss"]

"""Functional forms of the losses (stateless; the modules own the center bank and the cross-batch memory)."""
from .losses.cbml import contrastive_bayesian_loss
from .losses.ccl import center_contrastive_loss, center_momentum_update_

__all__ = ["center_contrastive_loss", "center_momentum_update_", "contrastive_bayesian_loss"]

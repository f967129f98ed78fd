"""Pure-PyTorch references: the specification every backend is tested against, and the fallback backend."""
from .cbml import cbml_loss, cbml_loss_rows
from .ccl import ccl_loss_rows, ccl_momentum_update, ccl_momentum_update_, normalize_rows

__all__ = ["ccl_loss_rows", "ccl_momentum_update", "ccl_momentum_update_", "normalize_rows", "cbml_loss", "cbml_loss_rows"]

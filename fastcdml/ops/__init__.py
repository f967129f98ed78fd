"""torch.library ops (registration, fakes, autograd); importing this package defines them."""
from . import cbml, ccl, pair  # noqa: F401

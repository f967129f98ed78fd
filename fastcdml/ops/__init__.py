"""torch.library ops (registration, fakes, autograd); importing this package defines them."""
from . import cbml, ccl, pair, proxy_anchor  # noqa: F401

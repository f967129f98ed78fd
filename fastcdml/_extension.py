"""Loading the C++ extension ``fastcdml._C`` (CPU kernels registered against the op schemas). A leaf: imports
only torch."""
from __future__ import annotations

import importlib
from functools import lru_cache
from typing import NamedTuple

import torch


class Extension(NamedTuple):
    module: object | None  # fastcdml._C, or None
    origin: str  # "prebuilt" or "unavailable"
    reason: str | None  # why it is unavailable


@lru_cache(maxsize=None)
def load() -> Extension:
    """The extension, checked to be built for the running torch; loading it registers its CPU kernels."""
    try:
        ext = importlib.import_module("fastcdml._C")
    except ImportError as err:
        return Extension(None, "unavailable", f"the C++ extension fastcdml._C is not built ({err})")
    built = ext.build_info().get("torch")
    if built != torch.__version__:
        return Extension(None, "unavailable",
                         f"fastcdml._C was built for torch {built} but torch {torch.__version__} is running; reinstall")
    return Extension(ext, "prebuilt", None)

import os

import torch

# The interpreter must be chosen before triton kernels are imported; on a machine without CUDA the Triton
# kernels run on CPU tensors through it (the fastcdml_interpret op namespace).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import fastcdml  # noqa: E402
from fastcdml import _runtime  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(autouse=True)
def _seed_and_poison():
    torch.manual_seed(0)
    _runtime.POISON = True
    yield
    _runtime.POISON = False


@pytest.fixture
def device():
    return DEVICE


def pytest_collection_modifyitems(config, items):
    if "compile_gates" not in (config.option.markexpr or ""):
        heavy = pytest.mark.skip(reason="the offline compile gates take minutes: select them with -m compile_gates")
        for item in items:
            if "compile_gates" in item.keywords:
                item.add_marker(heavy)
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)

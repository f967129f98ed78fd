"""CBML step (forward and backward; self mode or against a memory bank) at the C++ targets: C++ vs the eager
reference."""
import pytest

from bench.run import PRESETS

TARGETS = PRESETS["cpu-targets"]


@pytest.mark.parametrize("impl", TARGETS.impls)
@pytest.mark.parametrize("size", TARGETS.sizes["cbml"])
def test_cbml_step(step_bench, size, impl):
    step_bench("cbml", impl, size)

"""CCL step (forward, backward to the queries, momentum update) at the C++ targets: C++ vs the eager reference."""
import pytest

from bench.run import PRESETS

TARGETS = PRESETS["cpu-targets"]


@pytest.mark.parametrize("impl", TARGETS.impls)
@pytest.mark.parametrize("size", TARGETS.sizes["ccl"])
def test_ccl_step(step_bench, size, impl):
    step_bench("ccl", impl, size)

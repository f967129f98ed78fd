"""pytest-benchmark suite for CPU regression tracking: ``pytest bench/ --benchmark-only`` (not part of CI's test
command). One training step, as ``python -m bench`` defines it, at the C++ backend's target sizes
(the ``cpu-targets`` preset); time only; peak memory is ``python -m bench --preset cpu-targets``'s job."""
import pytest
import torch

from bench import impls
from bench.run import PRESETS, parse_size

TARGETS = PRESETS["cpu-targets"]


@pytest.fixture
def step_bench(benchmark):
    """``step_bench(loss, impl, size)``: benchmark one training step on fresh random CPU inputs."""

    def run(loss: str, impl: str, size: str) -> None:
        case = parse_size(size, loss, impl, TARGETS.dtype)
        step = impls.build(case, impls.make_inputs(case, torch.device("cpu")))
        benchmark.extra_info.update(backend=step.backend, threads=torch.get_num_threads(),
                                    gflop=impls.nominal_gflop(case))
        benchmark.pedantic(step.run, rounds=5, warmup_rounds=1, iterations=1)

    return run

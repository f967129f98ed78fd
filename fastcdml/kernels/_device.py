"""What the launchers need to know about the GPU they launch on: SM count and per-SM limits, and how many
programs of a compiled kernel fit on one SM (occupancy from its registers, shared memory and warps).

``limits(device)`` reads the CUDA device properties; ``resources(kernel)`` reads a compiled kernel's registers
per thread and shared memory. Both are module attributes so that ``fastcdml.tools.compile_check`` can replace
them with a target's limits and ptxas's figures when it drives the launchers without a GPU.
"""
from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple

import torch


class Limits(NamedTuple):
    capability: int  # 10·major + minor, e.g. 90 for H100
    sms: int
    smem_per_block: int  # bytes a program may use (opt-in maximum)
    smem_per_sm: int  # bytes shared by the programs resident on one SM
    regs_per_sm: int  # 32-bit registers
    threads_per_sm: int


@lru_cache(maxsize=None)
def _cuda_limits(index: int) -> Limits:
    p = torch.cuda.get_device_properties(index)
    smem_sm = p.shared_memory_per_multiprocessor
    return Limits(10 * p.major + p.minor, p.multi_processor_count, smem_sm - 1024, smem_sm, 65536,
                  p.max_threads_per_multi_processor)


def limits(device: torch.device) -> Limits:
    """The limits of CUDA ``device`` (the current device when it has no index)."""
    return _cuda_limits(torch.cuda.current_device() if device.index is None else device.index)


def resources(kernel) -> tuple[int, int]:
    """(registers per thread, shared memory bytes) of a ``CompiledKernel`` (loads it on the current device)."""
    kernel._init_handles()
    return kernel.n_regs, kernel.metadata.shared


def occupancy(kernel, lim: Limits) -> int:
    """Programs of ``kernel`` resident on one SM: min over registers (allocated per warp in units of 256),
    shared memory (plus 1 KB reserved per program) and threads; at least 1."""
    regs, smem = resources(kernel)
    threads = kernel.metadata.num_warps * 32
    regs_per_warp = -(-max(regs, 1) * 32 // 256) * 256
    by_regs = lim.regs_per_sm // (regs_per_warp * kernel.metadata.num_warps)
    by_smem = lim.smem_per_sm // (smem + 1024) if smem else by_regs
    return max(1, min(by_regs, by_smem, lim.threads_per_sm // threads))

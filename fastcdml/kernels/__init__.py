"""Triton kernels, one module per loss (``ccl``, ``cbml``), each with ``@triton.jit`` kernels and typed launchers.

Nothing here is imported by ``import fastcdml``: the op layer imports a kernel module on first use, so the
package works without triton. Set ``TRITON_INTERPRET=1`` before that import to run the kernels on the CPU.
"""

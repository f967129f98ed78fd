"""How every Triton kernel family chooses its products and its launch configs: the precision policy, the
environment knobs and the config tables, in one place. It imports only torch (and the runtime leaf), so the op
layer, the compile check and the benchmarks read it without triton.

**Precision policy.** Inputs with a 16-bit side multiply in 16 bits (bf16, or fp16 for fp16 queries against an
fp32 bank). fp32 × fp32 products follow ``torch.get_float32_matmul_precision()`` as PyTorch's matmuls do:
"highest" (the default) → ``tf32x3`` (three tf32 products of hi/lo parts, ≈ fp32 accuracy), "high" → one tf32
product, "medium" → bf16 operands (:func:`fp32_products`). A family whose stages cannot take 16-bit operands for
fp32 inputs (CBML: every stage must recompute bitwise the same S) takes tf32 there instead. Accumulation,
exponentials, logarithms, norms and epilogues are fp32 everywhere.

**Knobs.** ``FASTCDML_AUTOTUNE=1`` (:func:`autotune`, read at each launch): CCL autotunes its forward and
proxy-gradient kernels over :func:`ccl_tune_space` (never the in-place update; under the interpreter over its one
config, which exercises the plumbing); CBML times whole-pipeline candidates (:data:`CBML_CANDIDATES`) once per
shape bucket and device, on a GPU only (the timing needs CUDA events). Otherwise a launch's config is a function
of the problem and the GPU only.

**Tables.** :data:`CCL_FWD_CONFIGS` / :data:`CCL_BWD_CONFIGS` (one :class:`Config` per shared-memory class of
:data:`SMEM_CLASSES`, chosen by :func:`ccl_config`; the reasons per entry and their compile figures are in
``bench/NOTES.md``); :func:`cbml_config` (one heuristic :class:`CbmlConfig`, blocks shared by every stage of a
call). Under the interpreter each family runs one small fixed config.
"""
from __future__ import annotations

import itertools
import os
import warnings
from typing import NamedTuple

import torch

from .._runtime import interpreter_active

AUTOTUNE_ENV = "FASTCDML_AUTOTUNE"
FP32_PRODUCTS = {"highest": "tf32x3", "high": "tf32", "medium": "16"}


def autotune() -> bool:
    """Whether ``FASTCDML_AUTOTUNE=1`` asks for autotuning."""
    return os.environ.get(AUTOTUNE_ENV) == "1"


def fp32_products(sixteen_bit: bool = True) -> str:
    """The product kind of fp32 × fp32 inputs that ``torch.get_float32_matmul_precision()`` asks for: ``"tf32x3"``,
    ``"tf32"`` or ``"16"`` (bf16 operands; ``"tf32"`` for a family that cannot take them, ``sixteen_bit=False``)."""
    kind = FP32_PRODUCTS[torch.get_float32_matmul_precision()]
    return "tf32" if kind == "16" and not sixteen_bit else kind


def products(x_dtype: torch.dtype, bank_dtype: torch.dtype) -> str:
    """The product kind asked for: :func:`fp32_products` for fp32 × fp32, ``"16"`` when either side is 16-bit."""
    return fp32_products() if x_dtype == bank_dtype == torch.float32 else "16"


def operand_dtype(x_dtype: torch.dtype, bank_dtype: torch.dtype, kind: str | None = None) -> torch.dtype:
    """The dtype the CCL forward's products round x̂ and the bank to for product ``kind`` (default: the kind asked
    for, :func:`products`): fp32 for fp32 products, else fp16 for fp16 queries with an fp32 bank and bf16
    otherwise."""
    if (kind or products(x_dtype, bank_dtype)) != "16":
        return torch.float32
    return torch.float16 if (x_dtype == torch.float16 and bank_dtype == torch.float32) else torch.bfloat16


def pow2(n: int, lo: int = 16) -> int:
    """The smallest power of two ≥ max(n, lo)."""
    return max(lo, 1 << (max(n, 1) - 1).bit_length())


# ------------------------------------------------------------------------------------------------------------- CCL
class Config(NamedTuple):
    """A CCL launch config."""

    rows: int  # rows a program owns (queries in the forward, centers in the proxy gradient)
    cols: int  # rows of the other operand streamed per step
    dv_split: int  # programs sharing a row block, each owning D/dv_split accumulator columns
    num_warps: int
    num_stages: int


SMEM_CLASSES = (227 * 1024, 163 * 1024, 99 * 1024)  # shared memory per block: sm_90 (H100), sm_80 (A100), sm_86/89
C = Config
# (BLOCK_D, bank element size, product kind) -> one config per SMEM_CLASSES entry, None where nothing fits without
# heavy spills (the next kind in PRODUCT_FALLBACK is used there, see ccl_config). Product kinds: "16" (bf16/fp16
# operands; an fp32 bank is staged as fp32), "tf32", "tf32x3" (fp32 operands split into hi + lo: twice the shared
# memory and registers of tf32), "ieee" (fp32 FMA products, no tensor cores). Shared memory ≈ (rows + cols·stages)·D·
# (operand bytes); registers are dominated by the fp32 accumulator, rows × D/dv_split floats. 64 rows wherever they
# fit (the M of a Hopper wgmma), 8 warps from D = 128 (two warpgroups share the accumulator), then fewer columns and
# stages, the D split of the accumulator, and fewer rows last. Each entry serves both forward variants (split-C
# partials and the fused epilogue). Offline compile figures per entry: bench/NOTES.md ("GPU-ready without a GPU").
CCL_FWD_CONFIGS = {
    (64, 2, "16"): (C(64, 64, 1, 4, 3), C(64, 64, 1, 8, 3), C(64, 64, 1, 8, 3)),  # 4 warps spill on mma.sync
    (64, 4, "16"): (C(64, 64, 1, 4, 3),) * 2 + (C(64, 64, 1, 4, 2),),
    (128, 2, "16"): (C(64, 64, 1, 8, 3),) * 2 + (C(64, 64, 1, 8, 2),),
    (128, 4, "16"): (C(64, 64, 1, 8, 2),) * 2 + (C(64, 16, 1, 8, 2),),
    (256, 2, "16"): (C(64, 32, 1, 8, 2), C(64, 64, 1, 8, 2), C(64, 32, 1, 8, 2)),
    # fp32 bank: D split 2 (without it the fused-epilogue variant spilled 944 / 84 / 56 B on sm_90a / 80 / 86)
    (256, 4, "16"): (C(64, 32, 2, 8, 2), C(64, 16, 2, 8, 2), C(64, 32, 2, 8, 1)),
    (512, 2, "16"): (C(64, 32, 2, 8, 2), C(64, 32, 1, 8, 1), C(64, 16, 1, 8, 1)),
    (512, 4, "16"): (C(64, 32, 2, 8, 1), C(64, 16, 1, 8, 1), C(32, 16, 1, 8, 1)),
    (1024, 2, "16"): (C(64, 16, 4, 8, 1), C(32, 16, 2, 8, 1), C(16, 16, 2, 8, 1)),
    (1024, 4, "16"): (C(64, 16, 4, 8, 1), C(32, 16, 2, 8, 1), C(16, 16, 2, 8, 1)),
    (64, 4, "tf32"): (C(64, 64, 1, 4, 3),) * 2 + (C(64, 64, 1, 4, 2),),
    (128, 4, "tf32"): (C(64, 64, 1, 8, 2),) * 2 + (C(64, 32, 1, 8, 2),),
    (256, 4, "tf32"): (C(64, 32, 1, 8, 2), C(64, 32, 1, 8, 2), C(64, 16, 1, 8, 1)),
    (512, 4, "tf32"): (C(64, 16, 2, 8, 1), C(32, 16, 2, 8, 1), C(16, 16, 2, 8, 1)),
    (1024, 4, "tf32"): (C(32, 16, 2, 8, 1), C(16, 16, 2, 8, 1), None),
    (64, 4, "tf32x3"): (C(64, 64, 1, 4, 2), C(32, 64, 1, 4, 2), C(32, 32, 1, 4, 2)),  # mma.sync: 64 rows spill
    (128, 4, "tf32x3"): (C(64, 32, 1, 8, 2), C(32, 32, 1, 8, 2), C(32, 32, 1, 8, 1)),
    (256, 4, "tf32x3"): (None,) * 3,  # 64 rows: 192 KB and 1.7 KB spilled per thread on sm_90a
    (512, 4, "tf32x3"): (None,) * 3,  # 5–11 KB spilled per thread at any row count that fits
    (1024, 4, "tf32x3"): (None,) * 3,
    # FMA products have no wgmma M to keep: 32 rows without the D split (1.5× fewer products than 64 rows split
    # in two); with 64 rows the fused-epilogue variant compiled to 32 registers and 9.6 / 20.9 KB of spills
    # (D = 256 / 512) on sm_90a
    (256, 4, "ieee"): (C(32, 16, 1, 8, 1),) * 3,
    (512, 4, "ieee"): (C(32, 16, 1, 8, 1),) * 3,
    (1024, 4, "ieee"): (C(32, 16, 2, 8, 1), C(16, 16, 2, 8, 1), None),
}
# The proxy gradient (rows: centers a program owns, loaded once; cols: queries streamed per step).
CCL_BWD_CONFIGS = {**CCL_FWD_CONFIGS,
                   (64, 2, "16"): (C(64, 64, 1, 4, 2),) * 3, (64, 4, "16"): (C(64, 64, 1, 4, 2),) * 3,
                   (256, 2, "16"): (C(64, 32, 1, 8, 2),) * 3,
                   (256, 4, "16"): (C(64, 32, 1, 8, 2), C(64, 16, 1, 8, 2), C(64, 32, 1, 8, 1)),  # no epilogue
                   (512, 2, "16"): (C(64, 32, 1, 8, 1), C(64, 32, 1, 8, 1), C(64, 16, 1, 8, 1)),
                   (512, 4, "16"): (C(64, 32, 1, 8, 1), C(64, 32, 1, 8, 1), C(32, 16, 1, 8, 1)),
                   (256, 4, "ieee"): (C(32, 16, 2, 8, 1),) * 3, (512, 4, "ieee"): (C(32, 16, 2, 8, 1),) * 3,
                   (1024, 4, "ieee"): (C(16, 16, 2, 8, 1),) * 2 + (None,)}
del C
# Where a kind has no config: fp32-accurate tf32x3 gives way to fp32-accurate FMA products (silently), and a
# kind that still does not fit to a less accurate one (with a warning).
PRODUCT_FALLBACK = {"tf32x3": "ieee", "ieee": "tf32", "tf32": "16"}
CCL_INTERPRETER_CONFIG = Config(32, 64, 1, 4, 1)
INTERPRETER_SMS = 8  # pretend SM count under the interpreter, so small batches take the split path


def ccl_tune_space() -> list[tuple]:
    """The (rows, cols, dv_split, num_warps, num_stages) that ``FASTCDML_AUTOTUNE=1`` searches (the interpreter's
    one config when interpreting)."""
    if interpreter_active():
        return [tuple(CCL_INTERPRETER_CONFIG)]
    return list(itertools.product((32, 64, 128), (16, 32, 64), (1, 2), (4, 8), (1, 2)))


def ccl_config(d: int, x_dtype: torch.dtype, bank_dtype: torch.dtype, smem: int, table: dict
               ) -> tuple[Config, str]:
    """(config, product kind) of a CCL kernel for embedding size ``d`` on a GPU with ``smem`` bytes of shared
    memory per block (``table``: :data:`CCL_FWD_CONFIGS` or :data:`CCL_BWD_CONFIGS`). Where the asked-for kind has
    no config (the query tile's fp32 products need D-wide operands: tf32x3 beyond D = 128, fp32 at D = 1024 with
    99 KB), the next kind of :data:`PRODUCT_FALLBACK` is used, with a warning when it is less accurate. Configs
    exist for D ≤ 1024."""
    kind = products(x_dtype, bank_dtype)
    if interpreter_active():
        return CCL_INTERPRETER_CONFIG, kind
    bd = min(max(pow2(d), 64), 1024)
    cls = next((i for i, limit in enumerate(SMEM_CLASSES) if smem >= limit), len(SMEM_CLASSES) - 1)
    while True:
        cfg = table[(bd, 4 if kind != "16" else bank_dtype.itemsize, kind)][cls]
        if cfg is not None:
            return cfg, kind
        if kind != "tf32x3":
            warnings.warn(f"fastcdml CCL: {kind} products at D={d} do not fit in {smem // 1024} KB of shared "
                          f"memory; using {PRODUCT_FALLBACK[kind]} (torch.set_float32_matmul_precision or a bf16 "
                          f"bank choose the products)", stacklevel=4)
        kind = PRODUCT_FALLBACK[kind]


def shrink(cfg: Config) -> Config | None:
    """A smaller CCL config to retry with after ``OutOfResources`` (a GPU below the smallest shared-memory class):
    fewer stages, then the accumulator's D split (halves the PV operand and accumulator), then fewer columns (down
    to 16), and only then fewer than 64 rows (64 is the smallest M of a Hopper wgmma)."""
    if cfg.num_stages > 1:
        return cfg._replace(num_stages=cfg.num_stages - 1)
    if cfg.dv_split < 4:
        return cfg._replace(dv_split=cfg.dv_split * 2)
    if cfg.cols > 16:
        return cfg._replace(cols=cfg.cols // 2)
    if cfg.rows > 16:
        return cfg._replace(rows=cfg.rows // 2)
    return None


# ------------------------------------------------------------------------------------------------------------ CBML
class CbmlConfig(NamedTuple):
    """The blocks of one CBML call, shared by every stage that computes S (so S is bitwise the same in each)."""

    block_b: int  # query rows per program
    block_n: int  # reference rows per tile
    block_d: int  # D chunk of the S products
    block_do: int  # D chunk of the gradient outputs
    num_warps: int
    num_stages: int


CBML_INTERPRETER_CONFIG = CbmlConfig(32, 64, 64, 64, 4, 1)
CBML_CANDIDATES = (  # FASTCDML_AUTOTUNE=1: tried besides the heuristic (GPU only)
    CbmlConfig(64, 64, 64, 128, 4, 3),
    CbmlConfig(64, 128, 64, 128, 8, 3),
    CbmlConfig(128, 64, 64, 128, 8, 3),
    CbmlConfig(32, 64, 32, 64, 4, 4),
    CbmlConfig(64, 32, 128, 128, 4, 2),
)


def cbml_products(x_dtype: torch.dtype, ref_dtype: torch.dtype) -> str | None:
    """The product kind of CBML's fp32 products (fp32 or mixed inputs), or None for 16-bit products (both
    inputs of one 16-bit dtype)."""
    if x_dtype == ref_dtype and x_dtype != torch.float32:
        return None
    return fp32_products(sixteen_bit=False)


def cbml_config(d: int, x_dtype: torch.dtype, ref_dtype: torch.dtype, capability: int) -> CbmlConfig:
    """The heuristic blocks for a GPU of compute ``capability`` (e.g. 90). 64 query rows: the M of a Hopper wgmma
    (top-K mode too: its key buffers live in global scratch, not registers); 8 warps: with 4, the 64×64 int64 key
    tile (top-K) and the 64×128 gradient accumulator spilled 0.3–1.1 KB per thread. tf32x3 products (hi/lo operand
    parts) before Hopper: 32 rows and 64 gradient columns (mma.sync keeps the operand fragments in registers: 64
    rows spilled 2.2–3.7 KB per thread on sm_86)."""
    if interpreter_active():
        return CBML_INTERPRETER_CONFIG
    rows = 32 if cbml_products(x_dtype, ref_dtype) == "tf32x3" and capability < 90 else 64
    return fit_cbml(CbmlConfig(rows, 64, 64, 2 * rows, 8, 3), d)


def fit_cbml(cfg: CbmlConfig, d: int) -> CbmlConfig:
    """``cfg`` with its D chunks no wider than D rounded up to a power of two (≥ 16)."""
    return cfg._replace(block_d=min(cfg.block_d, pow2(d)), block_do=min(cfg.block_do, pow2(d)))

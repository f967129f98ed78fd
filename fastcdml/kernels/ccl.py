"""Center Contrastive Loss in Triton: fused forward + query gradient, proxy gradient, in-place momentum update.

Launchers (the Triton implementations of the ``fastcdml::ccl_*`` ops; schemas and semantics in
``fastcdml/ops/ccl.py``, math in ``shared/spec/losses.md`` §1)::

    ccl_fwd(x, labels, centers, τ, m, λ, compute_grad) -> (loss_rows (B,) fp32, grad_x (B,D)|(0,D) fp32, lse (B,) fp32)
    ccl_bwd_centers(x, labels, centers, lse, grad_rows, τ, m, λ) -> grad_centers (C, D) fp32
    ccl_update_(centers, x, labels, μ) -> None  (in place)

x (B, D) fp32/bf16/fp16, labels (B,) int32/int64, centers (C, D) fp32/bf16, all contiguous.

**Forward** (``_ccl_fwd_kernel``). A program owns ``BLOCK_B`` queries, normalises them once
(x̂ = x / max(‖x‖, 1e-12), fp32) and streams its share of the bank in ``BLOCK_C``-row tiles. Per tile:
``s = x̂ Wᵀ`` (``tl.dot``, fp32 accumulation), margin at the label column, ``z = (s − m[j=y])/τ`` in base-2
units, online max ``m_i`` and sum-exp ``l_i``, and — when the gradient is wanted — the rescaled
softmax-weighted center sum ``acc_i = Σ_j p_ij W_j`` (second ``tl.dot`` on the same W tile, as in flash
attention with K = V = W) and ``ps_i = Σ_j p_ij s_ij`` (= x̂_i · Σ_j p_ij W_j). The epilogue gathers ``W_{y_i}``
and computes in fp32::

    lse_i = m_i + log l_i,   L_i = lse_i − (s_iy − m)/τ − 2λ s_iy
    g_i   = (acc_i/l_i − W_y)/τ − 2λ W_y,   x̂_i·g_i = (ps_i/l_i − s_iy)/τ − 2λ s_iy
    ∂L_i/∂x_i = (g_i − x̂_i (x̂_i·g_i)) / max(‖x_i‖, eps)

so each D-slice of the gradient is computable on its own (``DV_SPLIT`` programs may share a row block, each
owning ``D/DV_SPLIT`` columns of ``acc`` and recomputing ``s``). One read of W, two B×C×D products, no B×C
matrix. With ``compute_grad=False`` only the first product runs.

**Split C** (flash-decoding). When ``cdiv(B, BLOCK_B)·DV_SPLIT`` programs do not fill the GPU, the C tiles are
divided among ``split`` programs per row block; each writes ``(m, l, ps, acc)`` partials (``split·B·(D+3)``
fp32) and ``_ccl_combine_kernel`` merges them and runs the same epilogue. ``split`` =
``⌊SMs·occupancy / row programs⌋`` (one full wave, no ragged tail wave), capped so every split streams at
least ``MIN_TILES_PER_SPLIT`` tiles; occupancy = programs of the compiled split kernel that fit on one SM by
its registers, shared memory and warps (``_device.occupancy``; the kernel is compiled before its first launch,
once per config). Row blocks vary fastest in the grid, so the programs that read the same
bank slice run together and share it through L2.

**Proxy gradient** (``_ccl_bwd_centers_kernel``). A program owns ``BLOCK`` centers and loops over the batch,
recomputing ``s`` and ``p = exp(z − lse)`` from the saved lse, and accumulates
``Σ_i ((p_ij − [j=y_i]) − 2λτ[j=y_i]) · (g_i/τ · x̂_i)`` with ``tl.dot`` (coefficients bounded by 1 + 2λτ, the
grad_output scale is folded into the x̂ operand). No atomics; rows with an out-of-range label contribute 0
(as the reference's autograd does).

**Momentum update** (``_ccl_update_kernel``). Labels are sorted on the device (stable ``torch.sort``); B
programs are launched and the one at each segment start sums x̂ over its segment in fixed order
(``UPDATE_ROWS`` rows per step, fp32), then writes ``normalize(μ W_k + (1−μ) mean)`` into the bank (cast to the
bank's dtype) unless the label is out of range or the new row is not finite. No atomics, no host sync,
bit-identical across runs; a permutation of the batch changes the sums only by rounding.

**Precision.** ``tl.dot`` operands: bf16 when either side is bf16 or x is fp32 with a bf16 bank; fp16 when x is
fp16 and the bank fp32 (an fp32 bank tile is cast in registers — no 16-bit copy of the bank is made); fp32 × fp32
follows ``torch.get_float32_matmul_precision()`` as PyTorch's matmuls do: "highest" (the default) fp32 operands
with ``input_precision="tf32x3"`` (≈ fp32 accuracy: three tf32 products of hi/lo parts, twice the operand
shared memory), "high" one tf32 product, "medium" bf16 operands. Under the interpreter bf16 operands are
rounded to bf16 and then computed in fp32 (its bf16 ``tl.dot`` is wrong) and fp32 products are exact; the GPU
path is not affected. Everything else (norms, exp, log, sums, epilogue, update) is fp32. Offsets are int64
where B·D, C·D or split·B·D can pass 2³¹.

**Configs and tuning knobs.** ``FWD_CONFIGS`` (forward) and ``BWD_CONFIGS`` (proxy gradient, roles of rows and
columns swapped) map (padded D, bank element size, product kind) to one ``Config(rows, cols, dv_split,
num_warps, num_stages)`` per shared-memory class of ``SMEM_CLASSES`` (sm_90 227 KB, sm_80 163 KB, sm_86/89
99 KB), so that the launcher's first choice fits the GPU it runs on. Shared memory is about
``(rows + cols·stages)·D`` operand elements (fp32 bank tiles are staged as fp32; tf32x3 doubles the fp32
operands); registers are dominated by the fp32 accumulator, ``rows × D/dv_split`` floats. Rows stay at 64 (the
smallest M of a Hopper wgmma) wherever they fit, 8 warps from D = 128 (two warpgroups share the accumulator);
past that, fewer columns and stages, the D split of the accumulator (``dv_split`` programs per row block, each
recomputing ``s``: more FLOPs, fewer registers), and fewer rows last. The entries come from the offline compile
check (``python -m fastcdml compile-check``; figures and the reasons per entry in ``bench/NOTES.md``). If a
config does not fit anyway (``OutOfResources``), the launcher retries along ``_shrink`` and remembers what worked.
``config=`` and ``split=`` (keyword-only) on the launchers override the heuristics; ``FASTCDML_AUTOTUNE=1``
autotunes the forward and proxy-gradient kernels over ``_TUNE_SPACE`` (never the in-place update). Under the
interpreter: one small fixed config. Configs exist for D ≤ 1024; a larger D needs a K-loop over D for ``s``
(not implemented).
"""
from __future__ import annotations

import functools
import itertools
import os
import warnings
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from .._runtime import interpreter_active, new_output
from . import _device

INTERPRET = interpreter_active()
AUTOTUNE = os.environ.get("FASTCDML_AUTOTUNE") == "1"
LOG2E = 1.4426950408889634
MIN_TILES_PER_SPLIT = 4
UPDATE_ROWS = 8  # rows of a class segment summed per step of the update kernel


class Config(NamedTuple):
    rows: int  # rows a program owns (queries in the forward, centers in the proxy gradient)
    cols: int  # rows of the other operand streamed per step
    dv_split: int  # programs sharing a row block, each owning D/dv_split accumulator columns
    num_warps: int
    num_stages: int


SMEM_CLASSES = (227 * 1024, 163 * 1024, 99 * 1024)  # shared memory per block: sm_90 (H100), sm_80 (A100), sm_86/89
C = Config
# (BLOCK_D, bank element size, product kind) -> one config per SMEM_CLASSES entry, None where nothing fits without
# heavy spills (the next kind in _FALLBACK is used there, see _choose). Product kinds: "16" (bf16/fp16 operands;
# an fp32 bank is staged as fp32), "tf32", "tf32x3" (fp32 operands split into hi + lo: twice the shared memory and
# registers of tf32), "ieee" (fp32 FMA products, no tensor cores). Shared memory ≈ (rows + cols·stages)·D·(operand
# bytes); 64 rows wherever they fit (the M of a Hopper wgmma), then fewer columns and stages before fewer rows.
# Offline compile figures per entry: bench/NOTES.md ("GPU-ready without a GPU").
FWD_CONFIGS = {
    (64, 2, "16"): (C(64, 64, 1, 4, 3),) * 3,
    (64, 4, "16"): (C(64, 64, 1, 4, 3),) * 2 + (C(64, 64, 1, 4, 2),),
    (128, 2, "16"): (C(64, 64, 1, 8, 3),) * 2 + (C(64, 64, 1, 8, 2),),
    (128, 4, "16"): (C(64, 64, 1, 8, 2),) * 2 + (C(64, 32, 1, 8, 2),),
    (256, 2, "16"): (C(64, 64, 1, 8, 2),) * 2 + (C(64, 32, 1, 8, 2),),
    (256, 4, "16"): (C(64, 32, 1, 8, 2), C(64, 32, 1, 8, 2), C(64, 32, 1, 8, 1)),
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
    (256, 4, "ieee"): (C(64, 16, 2, 8, 1), C(32, 16, 2, 8, 1), C(32, 16, 2, 8, 1)),
    (512, 4, "ieee"): (C(64, 16, 2, 8, 1), C(32, 16, 2, 8, 1), C(32, 16, 2, 8, 1)),
    (1024, 4, "ieee"): (C(32, 16, 2, 8, 1), C(16, 16, 2, 8, 1), None),
}
# The proxy gradient (rows: centers a program owns, loaded once; cols: queries streamed per step).
BWD_CONFIGS = {**FWD_CONFIGS,
               (64, 2, "16"): (C(64, 64, 1, 4, 2),) * 3, (64, 4, "16"): (C(64, 64, 1, 4, 2),) * 3,
               (256, 2, "16"): (C(64, 32, 1, 8, 2),) * 3,
               (512, 2, "16"): (C(64, 32, 1, 8, 1), C(64, 32, 1, 8, 1), C(64, 16, 1, 8, 1)),
               (512, 4, "16"): (C(64, 32, 1, 8, 1), C(64, 32, 1, 8, 1), C(32, 16, 1, 8, 1)),
               (256, 4, "ieee"): (C(32, 16, 2, 8, 1),) * 3, (512, 4, "ieee"): (C(32, 16, 2, 8, 1),) * 3,
               (1024, 4, "ieee"): (C(16, 16, 2, 8, 1),) * 2 + (None,)}
del C
# Where a kind has no config: fp32-accurate tf32x3 gives way to fp32-accurate FMA products (silently), and a
# kind that still does not fit to a less accurate one (with a warning).
_FALLBACK = {"tf32x3": "ieee", "ieee": "tf32", "tf32": "16"}
INTERPRETER_CONFIG = Config(32, 64, 1, 4, 1)
INTERPRETER_SMS = 8  # pretend SM count under the interpreter, so small batches take the split path
# FASTCDML_AUTOTUNE=1 searches (rows, cols, dv_split, num_warps, num_stages) over this space (one config when
# interpreting, which still exercises the autotuner's plumbing).
_TUNE_SPACE = [INTERPRETER_CONFIG[:5]] if INTERPRET else list(
    itertools.product((32, 64, 128), (16, 32, 64), (1, 2), (4, 8), (1, 2)))


def block_d(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def _products(x_dtype: torch.dtype, bank_dtype: torch.dtype) -> str:
    """Product kind asked for: fp32 × fp32 follows ``torch.get_float32_matmul_precision()`` ("highest" → tf32x3,
    "high" → tf32, "medium" → bf16 operands); anything with a 16-bit side has 16-bit operands."""
    if x_dtype == bank_dtype == torch.float32:
        return {"highest": "tf32x3", "high": "tf32", "medium": "16"}[torch.get_float32_matmul_precision()]
    return "16"


def _choose(d: int, x_dtype: torch.dtype, bank_dtype: torch.dtype, smem: int, table: dict) -> tuple[Config, str]:
    """(config, product kind) for a GPU with ``smem`` bytes of shared memory per block. Where the asked-for kind
    has no config (the query tile's fp32 products need D-wide operands: tf32x3 beyond D = 128, fp32 at D = 1024
    with 99 KB), the next kind of ``_FALLBACK`` is used, with a warning when it is less accurate."""
    kind = _products(x_dtype, bank_dtype)
    if INTERPRET:
        return INTERPRETER_CONFIG, kind
    bd = min(max(block_d(d), 64), 1024)
    cls = next((i for i, limit in enumerate(SMEM_CLASSES) if smem >= limit), len(SMEM_CLASSES) - 1)
    while True:
        cfg = table[(bd, 4 if kind != "16" else bank_dtype.itemsize, kind)][cls]
        if cfg is not None:
            return cfg, kind
        if kind != "tf32x3":
            warnings.warn(f"fastcdml CCL: {kind} products at D={d} do not fit in {smem // 1024} KB of shared "
                          f"memory; using {_FALLBACK[kind]} (torch.set_float32_matmul_precision or a bf16 bank "
                          f"choose the products)", stacklevel=3)
        kind = _FALLBACK[kind]


def default_config(d: int, x_dtype: torch.dtype, bank_dtype: torch.dtype, smem: int = SMEM_CLASSES[0]) -> Config:
    """The forward's heuristic config for embedding size ``d``, the query and bank dtypes, the precision set by
    ``torch.set_float32_matmul_precision`` (fp32 products) and ``smem`` bytes of shared memory per block."""
    return _choose(d, x_dtype, bank_dtype, smem, FWD_CONFIGS)[0]


def default_split(b: int, c: int, cfg: Config, sms: int, occupancy: int) -> int:
    """Programs per row block along C: fill one wave of ``sms × occupancy`` programs (occupancy: how many
    programs of the compiled kernel fit on one SM), each split streaming ≥ MIN_TILES_PER_SPLIT tiles."""
    row_programs = triton.cdiv(b, cfg.rows) * cfg.dv_split
    cap = max(1, triton.cdiv(c, cfg.cols) // MIN_TILES_PER_SPLIT)
    return max(1, min(sms * occupancy // row_programs, cap))


def _dot_types(x_dtype: torch.dtype, bank_dtype: torch.dtype, kind: str):
    """(operand dtype, upcast bf16 to fp32 for the interpreter, input_precision) of every ``tl.dot``."""
    if kind != "16":
        dot, prec = tl.float32, kind  # tf32, tf32x3 or ieee
    else:
        dot = tl.float16 if (x_dtype == torch.float16 and bank_dtype == torch.float32) else tl.bfloat16
        prec = "tf32"  # unused with 16-bit operands
    return dot, INTERPRET and dot == tl.bfloat16, "ieee" if INTERPRET else prec


def _shrink(cfg: Config) -> Config | None:
    """A smaller config to retry with after ``OutOfResources``: fewer stages, then the accumulator's D split
    (halves the PV operand and accumulator), then fewer columns (down to 16), and only then fewer than 64 rows
    (64 is the smallest M of a Hopper wgmma)."""
    if cfg.num_stages > 1:
        return cfg._replace(num_stages=cfg.num_stages - 1)
    if cfg.dv_split < 4:
        return cfg._replace(dv_split=cfg.dv_split * 2)
    if cfg.cols > 16:
        return cfg._replace(cols=cfg.cols // 2)
    if cfg.rows > 16:
        return cfg._replace(rows=cfg.rows // 2)
    return None


_WORKING: dict = {}  # (kernel, shape/dtype key, requested config) -> the config that compiled


def _launch(kernel: str, key: tuple, requested: Config, launch) -> None:
    """``launch(cfg)`` with ``requested`` or, after ``OutOfResources``, the largest smaller config that fits."""
    cfg = _WORKING.get((kernel, key, requested), requested)
    while True:
        try:
            out = launch(cfg)
        except OutOfResources:
            smaller = _shrink(cfg)
            if smaller is None:
                raise
            cfg = smaller
            continue
        _WORKING[(kernel, key, requested)] = cfg
        return out


# ----------------------------------------------------------------------------------------------------------------
# Shared device helpers
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _load_rows(ptr, rows, rmask, cols, cmask, D):
    """fp32 tile ``ptr[rows, cols]`` of a row-major (·, D) tensor, zero outside the masks; int64 offsets."""
    offs = rows.to(tl.int64)[:, None] * D + cols[None, :]
    return tl.load(ptr + offs, mask=rmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)


@triton.jit
def _row_norm(x):
    return tl.maximum(tl.sqrt(tl.sum(x * x, axis=1)), 1e-12)


@triton.jit
def _ccl_epilogue(x_ptr, w_ptr, loss_ptr, grad_ptr, lse_ptr, rows, rmask, lab, m2, l, ps, acc, dv_cols, write_rows,
                  C, D, inv_temp, margin, two_lambda, BLOCK_D: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
                  DOT: tl.constexpr):
    """Loss, lse and the D-slice ``dv_cols`` of ∂L/∂x for ``rows`` from the merged online-softmax state.

    ``x̂`` and ``W_y`` are rounded to the ``tl.dot`` operand dtype here too, so that the label terms cancel
    against their copies inside ``lse`` and ``acc`` (otherwise a bf16 rounding error of ``s_iy`` appears
    amplified by 1/τ, e.g. L = (s_dot − s_exact)/τ − 2λs for C = 1).

    ``m2``: running max of z in base-2 units; ``l``: Σ 2^(z2 − m2); ``ps``: Σ p·s; ``acc``: Σ p·W[:, dv_cols]
    (all unnormalised, relative to ``m2``). ``write_rows``: per-row mask of the loss/lse stores (vectors only:
    the interpreter cannot broadcast a scalar boolean into a store mask).
    """
    dk = tl.arange(0, BLOCK_D)
    dmask = dk < D
    x = _load_rows(x_ptr, rows, rmask, dk, dmask, D)
    norm = _row_norm(x)
    valid = (lab >= 0) & (lab < C)
    y = tl.where(valid, lab, 0)
    wy = _load_rows(w_ptr, y, rmask, dk, dmask, D).to(DOT).to(tl.float32)
    s_y = tl.sum((x / norm[:, None]).to(DOT).to(tl.float32) * wy, axis=1)
    lse = (m2 + tl.log2(l)) * 0.6931471805599453
    loss = lse - (s_y - margin) * inv_temp - two_lambda * s_y
    loss = tl.where(valid, loss, float("nan"))
    tl.store(loss_ptr + rows, loss, mask=write_rows)
    tl.store(lse_ptr + rows, lse, mask=write_rows)
    if COMPUTE_GRAD:
        dvmask = dv_cols < D
        xh = _load_rows(x_ptr, rows, rmask, dv_cols, dvmask, D) / norm[:, None]
        wyv = _load_rows(w_ptr, y, rmask, dv_cols, dvmask, D).to(DOT).to(tl.float32)
        g = (acc / l[:, None] - wyv) * inv_temp - two_lambda * wyv
        xg = (ps / l - s_y) * inv_temp - two_lambda * s_y
        grad = (g - xh * xg[:, None]) / norm[:, None]
        grad = tl.where(valid[:, None], grad, float("nan"))
        offs = rows.to(tl.int64)[:, None] * D + dv_cols[None, :]
        tl.store(grad_ptr + offs, grad, mask=rmask[:, None] & dvmask[None, :])


# ----------------------------------------------------------------------------------------------------------------
# Forward + query gradient
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _ccl_fwd_kernel(x_ptr, labels_ptr, w_ptr, loss_ptr, grad_ptr, lse_ptr, pm_ptr, pl_ptr, pps_ptr, pacc_ptr,
                    B, C, D, SPLIT, qk_scale, inv_temp, margin, two_lambda,
                    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, DV_SPLIT: tl.constexpr,
                    COMPUTE_GRAD: tl.constexpr, EPILOGUE: tl.constexpr,
                    DOT: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr):
    """Grid (cdiv(B, BLOCK_B)·DV_SPLIT, SPLIT). Online softmax over this split's C range; epilogue or partials."""
    BLOCK_DV: tl.constexpr = BLOCK_D // DV_SPLIT
    pid_r = tl.program_id(0)
    pid_s = tl.program_id(1)
    dv = pid_r % DV_SPLIT
    rows = (pid_r // DV_SPLIT) * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask = rows < B
    dk = tl.arange(0, BLOCK_D)
    dmask = dk < D
    dv_cols = dv * BLOCK_DV + tl.arange(0, BLOCK_DV)
    dvmask = dv_cols < D
    first = rmask & ((tl.zeros_like(rows) + dv) == 0)  # loss, lse and scalar partials: written by D-slice 0

    x = _load_rows(x_ptr, rows, rmask, dk, dmask, D)
    # tl.dot operands: rounded to DOT, then widened to fp32 when UPCAST (the interpreter's bf16 dot is wrong).
    # Casts and loads in the loops are inlined: each nested jit call costs the interpreter ~10 ms per iteration.
    xq = (x / _row_norm(x)[:, None]).to(DOT)
    if UPCAST:
        xq = xq.to(tl.float32)
    lab = tl.load(labels_ptr + rows, mask=rmask, other=-1).to(tl.int64)
    lab32 = tl.where((lab >= 0) & (lab < C), lab, -1).to(tl.int32)  # int32 compares in the loop (registers)

    tiles_per_split = tl.cdiv(tl.cdiv(C, BLOCK_C), SPLIT)
    c_begin = pid_s * tiles_per_split * BLOCK_C
    c_end = tl.minimum(C, c_begin + tiles_per_split * BLOCK_C)
    m_i = tl.full([BLOCK_B], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_B], tl.float32)
    ps_i = tl.zeros([BLOCK_B], tl.float32)
    acc = tl.zeros([BLOCK_B, BLOCK_DV], tl.float32)
    w_tile = w_ptr + c_begin.to(tl.int64) * D + tl.arange(0, BLOCK_C)[:, None] * D  # advanced per tile: int32 offsets
    for c0 in range(c_begin, c_end, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        cmask = cols < c_end
        w = tl.load(w_tile + dk[None, :], mask=cmask[:, None] & dmask[None, :], other=0.0).to(DOT)
        if UPCAST:
            w = w.to(tl.float32)
        s = tl.dot(xq, tl.trans(w), input_precision=PREC)
        is_y = lab32[:, None] == cols[None, :]
        z = tl.where(cmask[None, :], (s - tl.where(is_y, margin, 0.0)) * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(z, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(z - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if COMPUTE_GRAD:
            ps_i = ps_i * alpha + tl.sum(p * s, axis=1)
            if DV_SPLIT == 1:
                wv = w
            else:
                wv = tl.load(w_tile + dv_cols[None, :], mask=cmask[:, None] & dvmask[None, :], other=0.0).to(DOT)
                if UPCAST:
                    wv = wv.to(tl.float32)
            pq = p.to(DOT)
            if UPCAST:
                pq = pq.to(tl.float32)
            acc = acc * alpha[:, None] + tl.dot(pq, wv, input_precision=PREC)
        m_i = m_new
        w_tile += BLOCK_C * D

    if EPILOGUE:
        _ccl_epilogue(x_ptr, w_ptr, loss_ptr, grad_ptr, lse_ptr, rows, rmask, lab, m_i, l_i, ps_i, acc, dv_cols,
                      first, C, D, inv_temp, margin, two_lambda, BLOCK_D, COMPUTE_GRAD, DOT)
    else:
        prow = pid_s.to(tl.int64) * B + rows
        tl.store(pm_ptr + prow, m_i, mask=first)
        tl.store(pl_ptr + prow, l_i, mask=first)
        if COMPUTE_GRAD:
            tl.store(pps_ptr + prow, ps_i, mask=first)
            tl.store(pacc_ptr + prow[:, None] * D + dv_cols[None, :], acc, mask=rmask[:, None] & dvmask[None, :])


@triton.jit
def _ccl_combine_kernel(x_ptr, labels_ptr, w_ptr, loss_ptr, grad_ptr, lse_ptr, pm_ptr, pl_ptr, pps_ptr, pacc_ptr,
                        B, C, D, SPLIT, inv_temp, margin, two_lambda,
                        BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
                        DOT: tl.constexpr):
    """Grid (cdiv(B, BLOCK_B),). Merge the SPLIT partial online-softmax states of each row, then the epilogue."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask = rows < B
    dk = tl.arange(0, BLOCK_D)
    dmask = dk < D
    m = tl.full([BLOCK_B], float("-inf"), tl.float32)
    for sp in range(SPLIT):
        m = tl.maximum(m, tl.load(pm_ptr + sp * B + rows, mask=rmask, other=0.0))
    l = tl.zeros([BLOCK_B], tl.float32)
    ps = tl.zeros([BLOCK_B], tl.float32)
    acc = tl.zeros([BLOCK_B, BLOCK_D], tl.float32)
    for sp in range(SPLIT):
        prow = sp * B + rows
        a = tl.exp2(tl.load(pm_ptr + prow, mask=rmask, other=0.0) - m)
        l += a * tl.load(pl_ptr + prow, mask=rmask, other=1.0)
        if COMPUTE_GRAD:
            ps += a * tl.load(pps_ptr + prow, mask=rmask, other=0.0)
            acc += a[:, None] * _load_rows(pacc_ptr, prow, rmask, dk, dmask, D)
    lab = tl.load(labels_ptr + rows, mask=rmask, other=-1).to(tl.int64)
    _ccl_epilogue(x_ptr, w_ptr, loss_ptr, grad_ptr, lse_ptr, rows, rmask, lab, m, l, ps, acc, dk, rmask,
                  C, D, inv_temp, margin, two_lambda, BLOCK_D, COMPUTE_GRAD, DOT)


# ----------------------------------------------------------------------------------------------------------------
# Proxy gradient
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _ccl_bwd_centers_kernel(x_ptr, labels_ptr, w_ptr, lse_ptr, g_ptr, out_ptr, B, C, D,
                            qk_scale, inv_temp, margin, pull,
                            BLOCK_C: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
                            DV_SPLIT: tl.constexpr, DOT: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr):
    """Grid (cdiv(C, BLOCK_C)·DV_SPLIT,). out[j] = Σ_i ((p_ij − [j=y_i]) − pull·[j=y_i]) · (g_i/τ) x̂_i, pull = 2λτ."""
    BLOCK_DV: tl.constexpr = BLOCK_D // DV_SPLIT
    pid = tl.program_id(0)
    dv = pid % DV_SPLIT
    cols = (pid // DV_SPLIT) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    dk = tl.arange(0, BLOCK_D)
    dmask = dk < D
    dv_cols = dv * BLOCK_DV + tl.arange(0, BLOCK_DV)
    dvmask = dv_cols < D
    w = _load_rows(w_ptr, cols, cmask, dk, dmask, D).to(DOT)  # operand casts as in the forward kernel
    if UPCAST:
        w = w.to(tl.float32)
    acc = tl.zeros([BLOCK_C, BLOCK_DV], tl.float32)
    x_tile = x_ptr + tl.arange(0, BLOCK_B)[:, None] * D  # advanced per step: int32 offsets
    for b0 in range(0, B, BLOCK_B):
        rows = b0 + tl.arange(0, BLOCK_B)
        rmask = rows < B
        x = tl.load(x_tile + dk[None, :], mask=rmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
        norm = tl.maximum(tl.sqrt(tl.sum(x * x, axis=1)), 1e-12)
        xq = (x / norm[:, None]).to(DOT)
        if UPCAST:
            xq = xq.to(tl.float32)
        s = tl.dot(xq, tl.trans(w), input_precision=PREC)
        lab = tl.load(labels_ptr + rows, mask=rmask, other=-1).to(tl.int64)
        live = rmask & (lab >= 0) & (lab < C)
        is_y = tl.where(live, lab, -1).to(tl.int32)[:, None] == cols[None, :]
        lse2 = tl.load(lse_ptr + rows, mask=rmask, other=0.0) * 1.4426950408889634
        p = tl.exp2((s - tl.where(is_y, margin, 0.0)) * qk_scale - lse2[:, None])
        coef = tl.where(live[:, None] & cmask[None, :], p - tl.where(is_y, 1.0 + pull, 0.0), 0.0)
        gs = tl.load(g_ptr + rows, mask=rmask, other=0.0) * inv_temp / norm
        if DV_SPLIT == 1:
            xv = x
        else:
            xv = tl.load(x_tile + dv_cols[None, :], mask=rmask[:, None] & dvmask[None, :], other=0.0).to(tl.float32)
        xv = tl.where(live[:, None], xv * gs[:, None], 0.0).to(DOT)
        coef = coef.to(DOT)
        if UPCAST:
            xv = xv.to(tl.float32)
            coef = coef.to(tl.float32)
        acc += tl.dot(tl.trans(coef), xv, input_precision=PREC)
        x_tile += BLOCK_B * D
    offs = cols.to(tl.int64)[:, None] * D + dv_cols[None, :]
    tl.store(out_ptr + offs, acc, mask=cmask[:, None] & dvmask[None, :])


# ----------------------------------------------------------------------------------------------------------------
# Momentum update (in place, fixed config: never autotuned)
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _ccl_update_kernel(w_ptr, x_ptr, sorted_ptr, perm_ptr, B, C, D, momentum,
                       BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """Grid (B,). Program p acts iff sorted label k = sorted[p] starts a segment and lies in [0, C)."""
    p = tl.program_id(0)
    k = tl.load(sorted_ptr + p).to(tl.int64)
    prev = tl.load(sorted_ptr + tl.maximum(p - 1, 0)).to(tl.int64)
    if ((p == 0) | (prev != k)) & (k >= 0) & (k < C):
        dk = tl.arange(0, BLOCK_D)
        dmask = dk < D
        total = tl.zeros([BLOCK_D], tl.float32)
        count = tl.zeros([BLOCK_R], tl.float32)
        q = p
        more = q < B
        while more:
            idx = q + tl.arange(0, BLOCK_R)
            inside = idx < B
            member = inside & (tl.load(sorted_ptr + idx, mask=inside, other=0).to(tl.int64) == k)
            src = tl.load(perm_ptr + idx, mask=member, other=0)
            x = tl.load(x_ptr + src.to(tl.int64)[:, None] * D + dk[None, :], mask=member[:, None] & dmask[None, :],
                        other=0.0).to(tl.float32)
            total += tl.sum(x / tl.maximum(tl.sqrt(tl.sum(x * x, axis=1)), 1e-12)[:, None], axis=0)
            count += member.to(tl.float32)
            q += BLOCK_R
            more = (q < B) & (tl.load(sorted_ptr + tl.minimum(q, B - 1)).to(tl.int64) == k)
        wk = tl.load(w_ptr + k * D + dk, mask=dmask, other=0.0).to(tl.float32)
        new = momentum * wk + (1.0 - momentum) * (total / tl.sum(count, axis=0))
        new = new / tl.maximum(tl.sqrt(tl.sum(new * new, axis=0)), 1e-12)
        bad = tl.sum(tl.where(dmask & ~(tl.abs(new) < float("inf")), 1, 0), axis=0)
        tl.store(w_ptr + k * D + dk, new.to(w_ptr.dtype.element_ty), mask=dmask & ((tl.zeros_like(dk) + bad) == 0))


def _autotuned(kernel, key):
    def prune(configs, named_args, **kwargs):
        keep = [c for c in configs if kwargs["BLOCK_D"] // c.kwargs["DV_SPLIT"] >= 16]
        return keep or configs[:1]

    names = ("BLOCK_B", "BLOCK_C") if kernel is _ccl_fwd_kernel else ("BLOCK_C", "BLOCK_B")
    configs = [triton.Config({names[0]: r, names[1]: c, "DV_SPLIT": v}, num_warps=nw, num_stages=ns)
               for r, c, v, nw, ns in _TUNE_SPACE]
    return triton.autotune(configs=configs, key=key, prune_configs_by={"early_config_prune": prune})(kernel)


if AUTOTUNE:
    _FWD = _autotuned(_ccl_fwd_kernel, ["B", "C", "D", "COMPUTE_GRAD", "EPILOGUE", "DOT"])
    _BWD = _autotuned(_ccl_bwd_centers_kernel, ["B", "C", "D", "DOT"])
else:
    _FWD, _BWD = _ccl_fwd_kernel, _ccl_bwd_centers_kernel


def _meta(cfg: Config, rows_name: str, cols_name: str) -> dict:
    """Launch keywords for ``cfg`` (none when autotuning chooses them)."""
    if AUTOTUNE:
        return {}
    return {rows_name: cfg.rows, cols_name: cfg.cols, "DV_SPLIT": cfg.dv_split,
            "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}


# ----------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------
def ccl_fwd(x, labels, centers, temperature, margin, center_weight, compute_grad, *,
            config: Config | None = None, split: int | None = None):
    """``(loss_rows (B,), grad_x (B, D) or (0, D), lse (B,))``, all fp32 (see the module docstring).

    ``config`` / ``split`` override the heuristics (``split=1``: no partials, fused epilogue).
    """
    b, d = x.shape
    c = centers.shape[0]
    dev = x.device
    f32 = torch.float32
    loss = new_output((b,), f32, dev)
    grad = new_output((b if compute_grad else 0, d), f32, dev)
    lse = new_output((b,), f32, dev)
    if b == 0:
        return loss, grad, lse
    heuristic, kind = _choose(d, x.dtype, centers.dtype, _smem(dev), FWD_CONFIGS)
    cfg = config or heuristic
    bd = block_d(d)
    dot, upcast, prec = _dot_types(x.dtype, centers.dtype, kind)
    hyper = dict(inv_temp=1.0 / temperature, margin=margin, two_lambda=2.0 * center_weight)
    key = (d, x.dtype, centers.dtype, compute_grad, kind)
    parts = {}

    def run(cfg, split, warmup=False):
        """Launch (or, with ``warmup``, only compile) the forward kernel with ``split`` programs per row block."""
        if split > 1 and not warmup:
            pm, pl, pps = (new_output((split, b), f32, dev) for _ in range(3))
            pacc = new_output((split, b, d) if compute_grad else (0,), f32, dev)
        else:
            pm = pl = pps = pacc = loss  # unused (or, compiling only, stand-ins of the same type)
        parts.update(pm=pm, pl=pl, pps=pps, pacc=pacc, split=split)
        grid = lambda meta: (triton.cdiv(b, meta["BLOCK_B"]) * meta["DV_SPLIT"], split)  # noqa: E731
        kernel = functools.partial(_FWD.warmup, grid=grid) if warmup else _FWD[grid]
        return kernel(x, labels, centers, loss, grad, lse, pm, pl, pps, pacc, b, c, d, split,
                      LOG2E / temperature, **hyper, BLOCK_D=bd, COMPUTE_GRAD=compute_grad, EPILOGUE=split == 1,
                      DOT=dot, UPCAST=upcast, PREC=prec, **_meta(cfg, "BLOCK_B", "BLOCK_C"))

    def launch(cfg):
        run(cfg, split or default_split(b, c, cfg, *_machine(dev, key, cfg, lambda: run(cfg, 2, warmup=True))))

    _launch("fwd", key, cfg, launch)
    if parts["split"] > 1:
        rows = max(1, min(16, 2048 // bd))  # ≤ 2048 fp32 accumulator elements: no spills at D = 128 or 512
        _ccl_combine_kernel[(triton.cdiv(b, rows),)](
            x, labels, centers, loss, grad, lse, parts["pm"], parts["pl"], parts["pps"], parts["pacc"], b, c, d,
            parts["split"], **hyper, BLOCK_B=rows, BLOCK_D=bd, COMPUTE_GRAD=compute_grad, DOT=dot)
    return loss, grad, lse


def _smem(dev: torch.device) -> int:
    return SMEM_CLASSES[0] if INTERPRET else _device.limits(dev).smem_per_block


_OCCUPANCY: dict = {}  # (device, key, config) -> programs of the split-C forward kernel per SM


def _machine(dev: torch.device, key: tuple, cfg: Config, compile_split_kernel) -> tuple[int, int]:
    """(SMs, occupancy) for the split heuristic: the occupancy of the split-C forward kernel as compiled
    (registers, shared memory, warps; ``compile_split_kernel()`` returns it), remembered per config. Under the
    interpreter INTERPRETER_SMS and 1; when autotuning (the config is not known before the launch) 1."""
    if INTERPRET:
        return INTERPRETER_SMS, 1
    lim = _device.limits(dev)
    if AUTOTUNE:
        return lim.sms, 1
    at = (dev, key, cfg)
    if at not in _OCCUPANCY:
        _OCCUPANCY[at] = _device.occupancy(compile_split_kernel(), lim)
    return lim.sms, _OCCUPANCY[at]


def ccl_bwd_centers(x, labels, centers, lse, grad_rows, temperature, margin, center_weight, *,
                    config: Config | None = None):
    """∂(Σ_i g_i L_i)/∂W (C, D) fp32, reusing the forward's lse; ``config`` overrides the heuristic."""
    b, d = x.shape
    c = centers.shape[0]
    out = new_output((c, d), torch.float32, x.device)
    if c == 0:
        return out
    if b == 0:
        return out.zero_()
    heuristic, kind = _choose(d, x.dtype, centers.dtype, _smem(x.device), BWD_CONFIGS)
    cfg = config or heuristic
    dot, upcast, prec = _dot_types(x.dtype, centers.dtype, kind)
    grad_rows = grad_rows.to(torch.float32).contiguous()

    def launch(cfg):
        grid = lambda meta: (triton.cdiv(c, meta["BLOCK_C"]) * meta["DV_SPLIT"],)  # noqa: E731
        _BWD[grid](x, labels, centers, lse, grad_rows, out, b, c, d, LOG2E / temperature, 1.0 / temperature,
                   margin, 2.0 * center_weight * temperature, BLOCK_D=block_d(d), DOT=dot, UPCAST=upcast,
                   PREC=prec, **_meta(cfg, "BLOCK_C", "BLOCK_B"))

    _launch("bwd_centers", (d, x.dtype, centers.dtype, kind), cfg, launch)
    return out


def ccl_update_(centers, x, labels, momentum):
    """In place: ``W_k ← normalize(μ W_k + (1 − μ) mean_{y_i = k} x̂_i)`` for every class in the batch."""
    b, d = x.shape
    if b == 0 or centers.shape[0] == 0:
        return
    sorted_labels, perm = torch.sort(labels, stable=True)
    _ccl_update_kernel[(b,)](centers, x, sorted_labels, perm, b, centers.shape[0], d, momentum,
                             BLOCK_R=UPDATE_ROWS, BLOCK_D=block_d(d), num_warps=4 if d >= 256 else 2)

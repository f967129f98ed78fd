"""Center Contrastive Loss and its margin-softmax family in Triton: fused forward + query gradient, proxy gradient,
in-place momentum update.

Launchers (the Triton implementations of the ``fastcdml::ccl_*`` ops; schemas and semantics in
``fastcdml/ops/ccl.py``, math in ``fastcdml/reference/ccl.py`` and ``docs/spec.md``)::

    ccl_fwd(x, labels, centers, τ, m, λ, compute_grad, margin_type=0, K=1, γ=0)
        -> (loss_rows (B,) fp32, grad_x (B,D)|(0,D) fp32, lse (B,) fp32, label_q (B,) fp32)
    ccl_bwd_centers(x, labels, centers, lse, grad_rows, τ, m, λ, margin_type=0, K=1, label_q=None, foreign=False, γ=0)
        -> grad_centers (C·K, D) fp32
    ccl_momentum_update_(centers, x, labels, μ, K=1) -> None  (in place)

x (B, D) fp32/bf16/fp16, labels (B,) int32/int64, centers (C·K, D) fp32/bf16 (K sub-center rows per class,
class j owning rows j·K … j·K+K−1), all contiguous.

**The family.** NormalizedSoftmax, CosFace, ArcFace, SubCenterArcFace and CCL differ only in the label column:
its class cosine ``c_y`` becomes ``t(c_y)`` (``_target_logit``: additive cosine ``c − m`` or additive angular
``cos(θ + m)`` with PML's fallback past π − m; ``margin_type`` selects it as a constexpr), and the class cosine is
the max over K sub-center rows. Every other column keeps ``c_j/τ``. One kernel per stage serves all of them.

**Forward** (``_ccl_fwd_kernel``). A program owns ``BLOCK_B`` queries, normalises them once
(x̂ = x / max(‖x‖, 1e-12), fp32) and streams its share of the bank in ``BLOCK_C``-row tiles. With K > 1 a tile
holds ``BLOCK_C / KP`` whole classes, ``KP`` = K rounded up to a power of two, padding slots masked to −inf;
``s = x̂ Wᵀ`` is reshaped to (rows, classes, KP) and max-reduced (``_subcenter_max``) before the exponential.
Per tile: class cosines ``c``, the label's element replaced by ``t(c)`` (the transform is applied in the tile,
not subtracted out of the sum in the epilogue: with scale 64 the label term can exceed the rest of the sum by
e^40, and removing it from an fp32 sum afterwards would cancel every digit of what remains),
``z = c/τ`` in base-2 units, online max ``m_i`` and sum-exp ``l_i``, and — when the gradient is wanted — the
rescaled softmax-weighted center sum ``acc_i = Σ_j p_ij W_{j,k*_ij}`` (second ``tl.dot`` on the same W tile, the
probabilities placed at each class's argmax slot by ``_subcenter_scatter``; as in flash attention with K = V = W)
and ``ps_i = Σ_j p_ij c_ij`` (= x̂_i · Σ_j p_ij W_{j,k*}), plus ``lo_i``, the sum-exp without the label's column,
and the label's class cosine ``c_y`` and sub-center ``k*`` as its tile saw them (the very values inside ``l`` and
``acc``: a recomputed c_y differs by rounding, which the scale and ArcFace's slope amplify). The epilogue computes
in fp32, with ``(t, t') = _target_logit(c_y)`` and ``q = 1 − p_y = lo_i / l_i``::

    lse_i = m_i + log l_i,   L_i = lse_i − t/τ − 2λ c_y
    g_i   = acc_i/(l_i τ) + a W_{y,k*},   x̂_i·g_i = ps_i/(l_i τ) + a c_y,   a = (−1 − (t' − 1) q)/τ − 2λ
    ∂L_i/∂x_i = (g_i − x̂_i (x̂_i·g_i)) / max(‖x_i‖, eps)

The term in ``t' − 1`` is the label column's chain rule through ``t``, applied once per row; it vanishes for an
additive cosine margin. ``q = 1 − p_y`` is the sum off the label column over ``l``, accumulated on its own and
returned as ``label_q``: recomputed as 1 − exp(t/τ − lse) it would be the fp32 rounding of lse (~1e-5 at scale
64) times t' (tens near c = 1 for ArcFace), where the true value for a trained query is ~0. Each D-slice of the
gradient is computable on its own (``DV_SPLIT`` programs may share a row block, each owning ``D/DV_SPLIT``
columns of ``acc`` and recomputing ``s``). One read of W, two
B×(C·KP)×D products, no B×C matrix. With ``compute_grad=False`` only the first product runs.

**Split C** (flash-decoding). When ``cdiv(B, BLOCK_B)·DV_SPLIT`` programs do not fill the GPU, the C tiles are
divided among ``split`` programs per row block; each writes ``(m, l, ps, acc)`` partials (``split·B·(D+3)``
fp32) and ``_ccl_combine_kernel`` merges them and runs the same epilogue. ``split`` =
``⌊SMs·occupancy / row programs⌋`` (one full wave, no ragged tail wave), capped so every split streams at
least ``MIN_TILES_PER_SPLIT`` tiles; occupancy = programs of the compiled split kernel that fit on one SM by
its registers, shared memory and warps (``_device.occupancy``; the kernel is compiled before its first launch,
once per config). Row blocks vary fastest in the grid, so the programs that read the same
bank slice run together and share it through L2.

**Proxy gradient** (``_ccl_bwd_centers_kernel``). A program owns the K sub-center rows of ``BLOCK_C / KP``
classes and loops over the batch, recomputing ``s``, the class max and ``p = exp(z − lse)`` from the saved lse,
and accumulates ``Σ_i (p_ij t'^[j=y_i] − (t' + 2λτ)[j=y_i]) · (g_i/τ · x̂_i)`` into the argmax sub-center row with
one ``tl.dot`` (the grad_output scale is folded into the x̂ operand; coefficients are bounded by 1 + 2λτ for an
additive cosine margin). No atomics; rows with an out-of-range label contribute 0 (as the reference's autograd
does).

**Momentum update** (``_ccl_update_kernel``). With K > 1 each query first picks the bank row it moves: the
sub-center of its own class it is most similar to (``_ccl_assign_kernel``, from the bank before the step, first k
on a tie); the update below then runs over bank rows instead of classes. Labels (rows) are sorted on the device
(stable ``torch.sort``); B programs are launched and the one at each segment start sums x̂ over its segment in fixed order
(``UPDATE_ROWS`` rows per step, fp32), then writes ``normalize(μ W_k + (1−μ) mean)`` into the bank (cast to the
bank's dtype) unless the label is out of range or the new row is not finite. No atomics, no host sync,
bit-identical across runs; a permutation of the batch changes the sums only by rounding.

**SoftTriple** (``gamma`` γ > 0 with K > 1: the ``SOFT`` constexpr). The class cosine is the softmax-weighted
mean ``c = Σ_k q_k s_k``, ``q = softmax_k(s_k/γ)``, over the class's live slots (``_subcenter_soft``), and a
class's weight reaches all its rows through the slopes ``∂c/∂s_k = q_k (1 + (s_k − c)/γ)`` (``_subcenter_spread``:
the tile that the second ``tl.dot`` multiplies with W, in the forward and in the proxy gradient). The pass keeps
the label's slopes ``w_y`` (KP floats per row) and ``d_y = Σ_k w_yk s_yk`` (= x̂·Σ_k w_yk W_yk, what c_y is for the
max), and ``ps`` sums ``p·Σ_k slope_k s_k``; the epilogue adds ``a·Σ_k w_yk W_yk`` (the label's K rows, loaded
one at a time) and ``a·d_y``. Split C: ``plab`` grows to 3 + KP rows (row 1 holds d_y instead of k*).

**Precision.** ``tl.dot`` operands follow the policy of :mod:`fastcdml.kernels._tuning` (``operand_dtype``):
16-bit when either side is 16-bit (an fp32 bank tile is cast in registers — no 16-bit copy of the bank is made),
fp32 × fp32 as ``torch.get_float32_matmul_precision()`` asks (tf32x3 by default). Under the interpreter bf16
operands are rounded to bf16 (truncated: the interpreter's cast, where a GPU rounds to nearest even) and then
computed in fp32 (its bf16 ``tl.dot`` is wrong) and fp32 products are exact; the GPU path is not affected.
Everything else (norms, exp, log, sums, epilogue, update) is fp32. Offsets are int64 where B·D, C·D or split·B·D
can pass 2³¹.

**Configs and tuning knobs** live in :mod:`fastcdml.kernels._tuning` (``CCL_FWD_CONFIGS`` for the forward,
``CCL_BWD_CONFIGS`` for the proxy gradient, rows and columns swapped; the precision policy; ``FASTCDML_AUTOTUNE``).
SoftTriple's ``SOFT`` forward streams a quarter of the entry's columns (at least KP): its centre mean keeps the
slopes and the padded (rows, classes, KP) tiles live, and with the full width the fused-epilogue variant spilled
on sm_80 and sm_86 (``bench/NOTES.md``).
The config a launch uses is a function of the problem and the GPU only, never of what the process launched
before: on a GPU whose shared memory is below the smallest class (``OutOfResources``) each launch retries along
``_tuning.shrink``, and nothing is remembered between calls. The compile gates fail on any table entry that needs
that retry on their targets, so there it never runs. ``config=`` and ``split=`` (keyword-only) on the launchers
override the heuristics.
"""
from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from .._runtime import interpreter_active, new_output
from ..reference.ccl import merge_partials
from . import _device
from ._tuning import (CCL_BWD_CONFIGS, CCL_FWD_CONFIGS, INTERPRETER_SMS, SMEM_CLASSES, Config, autotune,
                      ccl_config, ccl_tune_space, operand_dtype, shrink)

INTERPRET = interpreter_active()
LOG2E = 1.4426950408889634
MIN_TILES_PER_SPLIT = 4
UPDATE_ROWS = 8  # rows of a class segment summed per step of the update kernel


def block_d(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def default_config(d: int, x_dtype: torch.dtype, bank_dtype: torch.dtype, smem: int = SMEM_CLASSES[0]) -> Config:
    """The forward's heuristic config for embedding size ``d``, the query and bank dtypes, the precision set by
    ``torch.set_float32_matmul_precision`` (fp32 products) and ``smem`` bytes of shared memory per block."""
    return ccl_config(d, x_dtype, bank_dtype, smem, CCL_FWD_CONFIGS)[0]


def default_split(b: int, c: int, cfg: Config, sms: int, occupancy: int) -> int:
    """Programs per row block along C: fill one wave of ``sms × occupancy`` programs (occupancy: how many
    programs of the compiled kernel fit on one SM), each split streaming ≥ MIN_TILES_PER_SPLIT tiles."""
    row_programs = triton.cdiv(b, cfg.rows) * cfg.dv_split
    cap = max(1, triton.cdiv(c, cfg.cols) // MIN_TILES_PER_SPLIT)
    return max(1, min(sms * occupancy // row_programs, cap))


def _dot_types(x_dtype: torch.dtype, bank_dtype: torch.dtype, kind: str):
    """(operand dtype, upcast bf16 to fp32 for the interpreter, input_precision) of every ``tl.dot``."""
    dot = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}[
        operand_dtype(x_dtype, bank_dtype, kind)]
    prec = kind if kind != "16" else "tf32"  # tf32, tf32x3 or ieee; unused with 16-bit operands
    return dot, INTERPRET and dot == tl.bfloat16, "ieee" if INTERPRET else prec


def _launch(requested: Config, launch, shrink=shrink) -> None:
    """``launch(cfg)`` with ``requested`` or, after ``OutOfResources``, the first config along ``shrink`` (default
    ``_tuning.shrink``) that fits.
    Stateless: a shrunk config is not remembered (it would make the next launch's config depend on what ran
    first, e.g. a split-C launch and a fused-epilogue launch of the same shapes); retrying costs one failed
    kernel load per step, on GPUs outside ``SMEM_CLASSES`` only."""
    cfg = requested
    while True:
        try:
            return launch(cfg)
        except OutOfResources:
            cfg = shrink(cfg)
            if cfg is None:
                raise


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
def _d_slice(pid, D, BLOCK_D: tl.constexpr, DV_SPLIT: tl.constexpr):
    """Program ``pid`` of a grid that splits D into DV_SPLIT slices: ``(block, dv, dk, dmask, dv_cols, dvmask)``,
    its block (pid // DV_SPLIT) and slice (pid % DV_SPLIT) indices, all of D's columns and its slice's, with
    their masks."""
    BLOCK_DV: tl.constexpr = BLOCK_D // DV_SPLIT
    dv = pid % DV_SPLIT
    dk = tl.arange(0, BLOCK_D)
    dv_cols = dv * BLOCK_DV + tl.arange(0, BLOCK_DV)
    return pid // DV_SPLIT, dv, dk, dk < D, dv_cols, dv_cols < D


@triton.jit
def _unit_rows(ptrs, mask, DOT: tl.constexpr, UPCAST: tl.constexpr):
    """``(x, ‖x‖, x̂)`` of the (rows, BLOCK_D) tile at ``ptrs`` (fp32, zero outside ``mask``; norms clamped at
    1e-12): x̂ is the tl.dot operand, rounded to DOT, then widened to fp32 when UPCAST (the interpreter's bf16 dot
    is wrong)."""
    x = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    norm = _row_norm(x)
    xq = (x / norm[:, None]).to(DOT)
    if UPCAST:
        xq = xq.to(tl.float32)
    return x, norm, xq


@triton.jit
def _target_logit(c, margin, cos_m, sin_m, ANGULAR: tl.constexpr):
    """``(t(c), ∂t/∂c)`` elementwise: the label column's cosine after the margin (cosine units).

    Additive cosine: ``t = c − m``. Additive angular (ArcFace, PML's fallback past θ = π − m): with
    ``ĉ = clamp(c, −1, 1)`` and ``sin θ = sqrt(max((1 − ĉ)(1 + ĉ), 1e-30))``, ``t = ĉ cos m − sin θ sin m`` if
    ``ĉ ≥ −cos m`` else ``ĉ − m sin m``; the derivative is the one autograd gives the reference's formula.
    """
    if ANGULAR:
        cc = tl.minimum(tl.maximum(c, -1.0), 1.0)
        sin2 = (1.0 - cc) * (1.0 + cc)
        sin_t = tl.sqrt(tl.maximum(sin2, 1e-30))
        main = cc >= -cos_m
        t = tl.where(main, cc * cos_m - sin_t * sin_m, cc - margin * sin_m)
        dt = tl.where(main, cos_m + tl.where(sin2 > 1e-30, cc * sin_m / sin_t, 0.0), 1.0)
        dt = tl.where((c >= -1.0) & (c <= 1.0), dt, 0.0)
    else:
        t = c - margin
        dt = tl.full(c.shape, 1.0, tl.float32)
    return t, dt


@triton.jit
def _subcenter_max(s, K, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, KP: tl.constexpr):
    """(class cosines (BLOCK_R, BLOCK_C // KP), argmax sub-center) of a tile ``s`` whose columns are bank rows
    laid out as KP slots per class (slots ≥ K are padding). Ties: the lowest sub-center."""
    s3 = tl.reshape(s, (BLOCK_R, BLOCK_C // KP, KP))
    slot = tl.arange(0, KP)[None, None, :]
    s3 = tl.where(slot < K, s3, float("-inf"))
    return tl.max(s3, axis=2), tl.argmax(s3, axis=2)


@triton.jit
def _subcenter_soft(s, K, inv_gamma, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, KP: tl.constexpr):
    """SoftTriple's class cosines ``c = Σ_k q_k s_k``, ``q = softmax_k(s_k/γ)`` over each class's K live slots of a
    tile ``s`` laid out as in :func:`_subcenter_max`, and the slopes ``∂c/∂s_k = q_k (1 + (s_k − c)/γ)``
    (BLOCK_R, BLOCK_C // KP, KP), 0 on padding slots, and ``Σ_k (∂c/∂s_k)·s_k`` (= x̂ · the class's routed rows:
    the class's share of x̂·g, which for the max is c itself)."""
    s3 = tl.reshape(s, (BLOCK_R, BLOCK_C // KP, KP))
    live = tl.arange(0, KP)[None, None, :] < K
    top = tl.max(tl.where(live, s3, float("-inf")), axis=2)
    e = tl.where(live, tl.exp((s3 - top[:, :, None]) * inv_gamma), 0.0)
    q = e / tl.sum(e, axis=2)[:, :, None]
    c = tl.sum(q * s3, axis=2)
    slopes = q * (1.0 + (s3 - c[:, :, None]) * inv_gamma)
    return c, slopes, tl.sum(slopes * s3, axis=2)


@triton.jit
def _subcenter_spread(v, slopes, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Per-class values ``v`` spread over their slots by ``slopes`` (:func:`_subcenter_soft`): the (BLOCK_R,
    BLOCK_C) tile that routes each class to all its rows in one ``tl.dot`` with the W tile."""
    return tl.reshape(v[:, :, None] * slopes, (BLOCK_R, BLOCK_C))


@triton.jit
def _subcenter_scatter(v, kstar, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, KP: tl.constexpr):
    """Per-class values ``v`` (BLOCK_R, BLOCK_C // KP) placed at their argmax slot of a (BLOCK_R, BLOCK_C) tile, 0
    elsewhere: the layout of the bank rows, so one ``tl.dot`` with the W tile routes each class to its sub-center."""
    slot = tl.arange(0, KP)[None, None, :]
    v3 = tl.where(slot == kstar[:, :, None], v[:, :, None], 0.0)
    return tl.reshape(v3, (BLOCK_R, BLOCK_C))


@triton.jit
def _ccl_epilogue(x_ptr, w_ptr, loss_ptr, grad_ptr, lse_ptr, q_ptr, rows, rmask, norm, lab, m2, l, lo, ps, acc,
                  c_y, k_y, w_y, d_y, dv_cols, write_rows, C, D, K, inv_temp, margin, cos_m, sin_m, two_lambda,
                  COMPUTE_GRAD: tl.constexpr, ANGULAR: tl.constexpr, DOT: tl.constexpr, SOFT: tl.constexpr,
                  KP: tl.constexpr):
    """Loss, lse and the D-slice ``dv_cols`` of ∂L/∂x for ``rows`` from the merged online-softmax state.

    ``c_y`` and ``k_y`` are the label's class cosine and argmax sub-center as the pass saw them (the very values
    inside ``lse`` and ``acc``, so the label terms cancel exactly: a recomputed c_y differs by rounding, which the
    angular margin's derivative and 1/τ amplify, and bf16 operands by far more). With
    ``(t, t') = _target_logit(c_y)`` and ``q = 1 − p_y = lo/l`` (the mass off the label, summed on its own so that
    it stays accurate when p_y → 1, where ``1 − exp(t/τ − lse)`` would be fp32 rounding noise times t')::

        L   = lse − t/τ − 2λ c_y
        g   = acc/(l τ) + a·W_{yK+k*},   x̂·g = ps/(l τ) + a·c_y,   a = (−1 − (t' − 1) q)/τ − 2λ

    (``acc`` holds ``p_y W_{yK+k*}`` from the pass; ``a`` adds the chain rule through ``t``: for an additive cosine
    margin t' = 1 and a = −1/τ − 2λ.) ``W_y`` is rounded to the ``tl.dot`` operand dtype like its copy in ``acc``.
    ``q`` is stored for the proxy gradient. With ``SOFT`` (SoftTriple's centre mean) ``W_{yK+k*}`` becomes
    ``Σ_k w_y[:, k]·W_{yK+k}``, ``w_y`` (rows, KP) the label's slopes ∂c_y/∂s_k as the pass saw them, and its
    product with x̂ is ``d_y`` (``ps`` sums p·d likewise), no longer c_y.

    ``norm``: max(‖x‖, 1e-12) of the rows, from the caller (the forward kernel has it from normalising x̂; the
    epilogue loads only the ``dv_cols`` slice of x). ``m2``: running max of z in base-2 units; ``l``:
    Σ 2^(z2 − m2); ``lo``: the same sum without the label's column; ``ps``: Σ p·c; ``acc``: Σ p·W[:, dv_cols]
    (all unnormalised, relative to ``m2``). ``write_rows``:
    per-row mask of the loss/lse stores (vectors only: the interpreter cannot broadcast a scalar boolean into a
    store mask).
    """
    valid = (lab >= 0) & (lab < C)
    t_y, dt_y = _target_logit(c_y, margin, cos_m, sin_m, ANGULAR)
    lse = (m2 + tl.log2(l)) * 0.6931471805599453
    loss = lse - t_y * inv_temp - two_lambda * c_y
    loss = tl.where(valid, loss, float("nan"))
    q = lo / l
    tl.store(loss_ptr + rows, loss, mask=write_rows)
    tl.store(lse_ptr + rows, lse, mask=write_rows)
    tl.store(q_ptr + rows, q, mask=write_rows)
    if COMPUTE_GRAD:
        dvmask = dv_cols < D
        xh = _load_rows(x_ptr, rows, rmask, dv_cols, dvmask, D) / norm[:, None]
        if SOFT:
            wyv = tl.zeros(acc.shape, tl.float32)
            for k in range(K):  # not unrolled: one (rows, D) row tile live at a time
                w_k = tl.sum(tl.where(tl.arange(0, KP)[None, :] == k, w_y, 0.0), axis=1)
                row_k = _load_rows(w_ptr, tl.where(valid, lab, 0) * K + k, rmask, dv_cols, dvmask, D)
                wyv += w_k[:, None] * row_k.to(DOT).to(tl.float32)
        else:
            wyv = _load_rows(w_ptr, tl.where(valid, lab, 0) * K + k_y, rmask, dv_cols, dvmask, D).to(DOT).to(
                tl.float32)
        a = (-1.0 - (dt_y - 1.0) * q) * inv_temp - two_lambda
        g = acc * (inv_temp / l)[:, None] + a[:, None] * wyv
        xg = ps * inv_temp / l + a * (d_y if SOFT else c_y)
        grad = (g - xh * xg[:, None]) / norm[:, None]
        grad = tl.where(valid[:, None], grad, float("nan"))
        offs = rows.to(tl.int64)[:, None] * D + dv_cols[None, :]
        tl.store(grad_ptr + offs, grad, mask=rmask[:, None] & dvmask[None, :])


# ----------------------------------------------------------------------------------------------------------------
# Forward + query gradient
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _ccl_fwd_kernel(x_ptr, labels_ptr, w_ptr, loss_ptr, grad_ptr, lse_ptr, q_ptr, pm_ptr, pl_ptr, pps_ptr,
                    pacc_ptr, plab_ptr, B, C, D, K, SPLIT, qk_scale, inv_temp, margin, cos_m, sin_m, two_lambda,
                    inv_gamma, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
                    DV_SPLIT: tl.constexpr, KP: tl.constexpr, COMPUTE_GRAD: tl.constexpr, EPILOGUE: tl.constexpr,
                    ANGULAR: tl.constexpr, SOFT: tl.constexpr, DOT: tl.constexpr, UPCAST: tl.constexpr,
                    PREC: tl.constexpr):
    """Grid (cdiv(B, BLOCK_B)·DV_SPLIT, SPLIT). Online softmax over this split's classes; epilogue or partials.

    A tile holds ``BLOCK_C`` bank rows: ``BLOCK_C // KP`` classes of ``KP`` slots (K sub-centers padded to a power
    of two; KP = 1 without sub-centers), C counts classes and K the bank rows per class. ``SOFT``: a class's
    cosine is SoftTriple's softmax-weighted mean of its K rows (temperature 1/``inv_gamma``) instead of their max,
    its probability is spread over all K rows in ``acc``, and the label's K slopes are kept for the epilogue
    (partials: rows 3 … 3 + KP − 1 of ``plab``).
    """
    BLOCK_DV: tl.constexpr = BLOCK_D // DV_SPLIT
    NC: tl.constexpr = BLOCK_C // KP
    pid_s = tl.program_id(1)
    block, dv, dk, dmask, dv_cols, dvmask = _d_slice(tl.program_id(0), D, BLOCK_D, DV_SPLIT)
    rows = block * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask = rows < B
    first = rmask & ((tl.zeros_like(rows) + dv) == 0)  # loss, lse and scalar partials: written by D-slice 0

    # norm: kept for the epilogue. The bank tiles' loads and casts in the loop are inlined: each nested jit call
    # costs the interpreter ~10 ms per iteration.
    # (``x_rows``, not ``_``: a ``_`` assigned in the loop below would be a loop-carried variable of another shape.)
    x_rows, norm, xq = _unit_rows(x_ptr + rows.to(tl.int64)[:, None] * D + dk[None, :],
                                  rmask[:, None] & dmask[None, :], DOT, UPCAST)
    lab = tl.load(labels_ptr + rows, mask=rmask, other=-1).to(tl.int64)
    lab32 = tl.where((lab >= 0) & (lab < C), lab, -1).to(tl.int32)  # int32 compares in the loop (registers)

    tiles_per_split = tl.cdiv(tl.cdiv(C, NC), SPLIT)
    c_begin = pid_s * tiles_per_split * NC
    c_end = tl.minimum(C, c_begin + tiles_per_split * NC)
    m_i = tl.full([BLOCK_B], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_B], tl.float32)
    lo_i = tl.zeros([BLOCK_B], tl.float32)  # l_i without the label's column
    ps_i = tl.zeros([BLOCK_B], tl.float32)
    acc = tl.zeros([BLOCK_B, BLOCK_DV], tl.float32)
    c_y = tl.zeros([BLOCK_B], tl.float32)  # the label's class cosine and sub-center, from the tile holding it
    k_y = tl.zeros([BLOCK_B], tl.int32)
    w_y = tl.zeros([BLOCK_B, KP], tl.float32)  # SOFT: the label's slopes ∂c_y/∂s_k and x̂·Σ_k (∂c_y/∂s_k) W_yk
    d_y = tl.zeros([BLOCK_B], tl.float32)
    slot = tl.arange(0, BLOCK_C)
    slot_class = slot // KP
    slot_live = (slot % KP) < K
    # row of tile slot q: (first class of the tile + q // KP)·K + q % KP; the base advances per tile (int32 offsets)
    w_tile = w_ptr + c_begin.to(tl.int64) * K * D + (slot_class * K + slot % KP)[:, None] * D
    for c0 in range(c_begin, c_end, NC):
        wmask = ((c0 + slot_class) < c_end) & slot_live
        w = tl.load(w_tile + dk[None, :], mask=wmask[:, None] & dmask[None, :], other=0.0).to(DOT)
        if UPCAST:
            w = w.to(tl.float32)
        s = tl.dot(xq, tl.trans(w), input_precision=PREC)
        cols = c0 + tl.arange(0, NC)
        is_y = lab32[:, None] == cols[None, :]
        if KP == 1:
            c = s
        elif SOFT:
            c, slopes, cv = _subcenter_soft(s, K, inv_gamma, BLOCK_B, BLOCK_C, KP)
            w_y += tl.sum(tl.where(is_y[:, :, None], slopes, 0.0), axis=1)
            d_y += tl.sum(tl.where(is_y, cv, 0.0), axis=1)
        else:
            c, kstar = _subcenter_max(s, K, BLOCK_B, BLOCK_C, KP)
            k_y += tl.sum(tl.where(is_y, kstar, 0), axis=1).to(tl.int32)
        c_y += tl.sum(tl.where(is_y, c, 0.0), axis=1)
        t, _ = _target_logit(c, margin, cos_m, sin_m, ANGULAR)
        z = tl.where((cols < c_end)[None, :], tl.where(is_y, t, c) * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(z, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(z - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        lo_i = lo_i * alpha + tl.sum(tl.where(is_y, 0.0, p), axis=1)
        if COMPUTE_GRAD:
            ps_i = ps_i * alpha + tl.sum(p * (cv if SOFT else c), axis=1)
            if DV_SPLIT == 1:
                wv = w
            else:
                wv = tl.load(w_tile + dv_cols[None, :], mask=wmask[:, None] & dvmask[None, :], other=0.0).to(DOT)
                if UPCAST:
                    wv = wv.to(tl.float32)
            if SOFT:
                p = _subcenter_spread(p, slopes, BLOCK_B, BLOCK_C)
            elif KP > 1:
                p = _subcenter_scatter(p, kstar, BLOCK_B, BLOCK_C, KP)
            pq = p.to(DOT)
            if UPCAST:
                pq = pq.to(tl.float32)
            acc = acc * alpha[:, None] + tl.dot(pq, wv, input_precision=PREC)
        m_i = m_new
        w_tile += NC * K * D

    if EPILOGUE:
        _ccl_epilogue(x_ptr, w_ptr, loss_ptr, grad_ptr, lse_ptr, q_ptr, rows, rmask, norm, lab, m_i, l_i, lo_i, ps_i,
                      acc, c_y, k_y, w_y, d_y, dv_cols, first, C, D, K, inv_temp, margin, cos_m, sin_m,
                      two_lambda, COMPUTE_GRAD, ANGULAR, DOT, SOFT, KP)
    else:
        prow = pid_s.to(tl.int64) * B + rows
        tl.store(pm_ptr + prow, m_i, mask=first)
        tl.store(pl_ptr + prow, l_i, mask=first)
        tl.store(plab_ptr + prow, c_y, mask=first)  # (3, SPLIT, B): c_y, k_y (exact in fp32; SOFT: d_y), lo
        tl.store(plab_ptr + SPLIT * B + prow, d_y if SOFT else k_y.to(tl.float32), mask=first)
        tl.store(plab_ptr + 2 * SPLIT * B + prow, lo_i, mask=first)
        if SOFT:  # (3 + KP, SPLIT, B)
            for k in tl.static_range(KP):
                w_k = tl.sum(tl.where(tl.arange(0, KP)[None, :] == k, w_y, 0.0), axis=1)
                tl.store(plab_ptr + (3 + k) * SPLIT * B + prow, w_k, mask=first)
        if COMPUTE_GRAD:
            tl.store(pps_ptr + prow, ps_i, mask=first)
            tl.store(pacc_ptr + prow[:, None] * D + dv_cols[None, :], acc, mask=rmask[:, None] & dvmask[None, :])


@triton.jit
def _ccl_combine_kernel(x_ptr, labels_ptr, w_ptr, loss_ptr, grad_ptr, lse_ptr, q_ptr, pm_ptr, pl_ptr, pps_ptr,
                        pacc_ptr, plab_ptr, B, C, D, K, SPLIT, inv_temp, margin, cos_m, sin_m, two_lambda,
                        BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, KP: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
                        ANGULAR: tl.constexpr, SOFT: tl.constexpr, DOT: tl.constexpr):
    """Grid (cdiv(B, BLOCK_B),). Merge the SPLIT partial online-softmax states of each row, then the epilogue (the
    label's c_y and k_y, or with SOFT its slopes and d_y, come from the one split whose range holds it; the others wrote
    zeros)."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask = rows < B
    dk = tl.arange(0, BLOCK_D)
    dmask = dk < D
    m = tl.full([BLOCK_B], float("-inf"), tl.float32)
    for sp in range(SPLIT):
        m = tl.maximum(m, tl.load(pm_ptr + sp * B + rows, mask=rmask, other=0.0))
    l = tl.zeros([BLOCK_B], tl.float32)
    lo = tl.zeros([BLOCK_B], tl.float32)
    ps = tl.zeros([BLOCK_B], tl.float32)
    acc = tl.zeros([BLOCK_B, BLOCK_D], tl.float32)
    c_y = tl.zeros([BLOCK_B], tl.float32)
    k_y = tl.zeros([BLOCK_B], tl.float32)
    w_y = tl.zeros([BLOCK_B, KP], tl.float32)
    for sp in range(SPLIT):
        prow = sp * B + rows
        a = tl.exp2(tl.load(pm_ptr + prow, mask=rmask, other=0.0) - m)
        l += a * tl.load(pl_ptr + prow, mask=rmask, other=1.0)
        lo += a * tl.load(plab_ptr + 2 * SPLIT * B + prow, mask=rmask, other=0.0)
        c_y += tl.load(plab_ptr + prow, mask=rmask, other=0.0)
        k_y += tl.load(plab_ptr + SPLIT * B + prow, mask=rmask, other=0.0)
        if SOFT:
            for k in tl.static_range(KP):
                w_k = tl.load(plab_ptr + (3 + k) * SPLIT * B + prow, mask=rmask, other=0.0)
                w_y += tl.where(tl.arange(0, KP)[None, :] == k, w_k[:, None], 0.0)
        if COMPUTE_GRAD:
            ps += a * tl.load(pps_ptr + prow, mask=rmask, other=0.0)
            acc += a[:, None] * _load_rows(pacc_ptr, prow, rmask, dk, dmask, D)
    lab = tl.load(labels_ptr + rows, mask=rmask, other=-1).to(tl.int64)
    norm = _row_norm(_load_rows(x_ptr, rows, rmask, dk, dmask, D))
    _ccl_epilogue(x_ptr, w_ptr, loss_ptr, grad_ptr, lse_ptr, q_ptr, rows, rmask, norm, lab, m, l, lo, ps, acc, c_y,
                  k_y.to(tl.int32), w_y, k_y, dk, rmask, C, D, K, inv_temp, margin, cos_m, sin_m, two_lambda,
                  COMPUTE_GRAD, ANGULAR, DOT, SOFT, KP)


# ----------------------------------------------------------------------------------------------------------------
# Proxy gradient
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _ccl_bwd_centers_kernel(x_ptr, labels_ptr, w_ptr, lse_ptr, q_ptr, g_ptr, out_ptr, B, C, D, K,
                            qk_scale, inv_temp, margin, cos_m, sin_m, pull, inv_gamma,
                            BLOCK_C: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
                            DV_SPLIT: tl.constexpr, KP: tl.constexpr, ANGULAR: tl.constexpr, SOFT: tl.constexpr,
                            HAS_Q: tl.constexpr, FOREIGN: tl.constexpr, DOT: tl.constexpr, UPCAST: tl.constexpr,
                            PREC: tl.constexpr):
    """Grid (cdiv(C, BLOCK_C // KP)·DV_SPLIT,). A program owns the K sub-center rows of BLOCK_C // KP classes;
    out[row of (j, k*_ij)] += Σ_i coef_ij · (g_i/τ) x̂_i with coef = p_ij off the label and −t'·q_i − pull at it
    (pull = 2λτ, t' = ∂t/∂c, q_i = 1 − p_iy: the forward's when HAS_Q, else recomputed from lse). A row whose
    label lies outside [0, C) contributes nothing (its loss is NaN), or with FOREIGN (the bank is one slice of a
    class-sharded bank, lse global) its negatives. ``SOFT``: SoftTriple's centre mean, each class's coefficient
    spread over its K rows by the slopes ∂c/∂s_k instead of placed at the argmax."""
    BLOCK_DV: tl.constexpr = BLOCK_D // DV_SPLIT
    NC: tl.constexpr = BLOCK_C // KP
    block, dv, dk, dmask, dv_cols, dvmask = _d_slice(tl.program_id(0), D, BLOCK_D, DV_SPLIT)
    slot = tl.arange(0, BLOCK_C)
    bank_rows = (block * NC + slot // KP) * K + slot % KP
    wmask = (block * NC + slot // KP < C) & (slot % KP < K)
    cols = block * NC + tl.arange(0, NC)
    cmask = cols < C
    w = _load_rows(w_ptr, bank_rows, wmask, dk, dmask, D).to(DOT)  # operand casts as in the forward kernel
    if UPCAST:
        w = w.to(tl.float32)
    acc = tl.zeros([BLOCK_C, BLOCK_DV], tl.float32)
    x_tile = x_ptr + tl.arange(0, BLOCK_B)[:, None] * D  # advanced per step: int32 offsets
    for b0 in range(0, B, BLOCK_B):
        rows = b0 + tl.arange(0, BLOCK_B)
        rmask = rows < B
        x, norm, xq = _unit_rows(x_tile + dk[None, :], rmask[:, None] & dmask[None, :], DOT, UPCAST)
        s = tl.dot(xq, tl.trans(w), input_precision=PREC)
        if KP == 1:
            c = s
        elif SOFT:
            c, slopes, _ = _subcenter_soft(s, K, inv_gamma, BLOCK_B, BLOCK_C, KP)
        else:
            c, kstar = _subcenter_max(s, K, BLOCK_B, BLOCK_C, KP)
        lab = tl.load(labels_ptr + rows, mask=rmask, other=-1).to(tl.int64)
        own = rmask & (lab >= 0) & (lab < C)
        live = rmask if FOREIGN else own  # FOREIGN: a label of another slice leaves the row's negatives here
        is_y = tl.where(own, lab, -1).to(tl.int32)[:, None] == cols[None, :]
        t, dt = _target_logit(c, margin, cos_m, sin_m, ANGULAR)
        lse2 = tl.load(lse_ptr + rows, mask=rmask, other=0.0) * 1.4426950408889634
        p = tl.exp2(tl.where(is_y, t, c) * qk_scale - lse2[:, None])
        if HAS_Q:
            q = tl.load(q_ptr + rows, mask=rmask, other=0.0)[:, None]
        else:
            q = 1.0 - p
        coef = tl.where(is_y, -dt * q - pull, p)
        coef = tl.where(live[:, None] & cmask[None, :], coef, 0.0)
        if SOFT:
            coef = _subcenter_spread(coef, slopes, BLOCK_B, BLOCK_C)
        elif KP > 1:
            coef = _subcenter_scatter(coef, kstar, BLOCK_B, BLOCK_C, KP)
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
    offs = bank_rows.to(tl.int64)[:, None] * D + dv_cols[None, :]
    tl.store(out_ptr + offs, acc, mask=wmask[:, None] & dvmask[None, :])


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


@triton.jit
def _ccl_assign_kernel(x_ptr, labels_ptr, w_ptr, out_ptr, B, C, D, K, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    """Grid (cdiv(B, BLOCK_B),). out_i = y_i·K + argmax_k x̂_i·W_{y_i K + k} (fp32, first k on a tie), −1 for a label
    outside [0, C): the bank row each query moves in a momentum step with K sub-centers per class."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask = rows < B
    dk = tl.arange(0, BLOCK_D)
    dmask = dk < D
    x = _load_rows(x_ptr, rows, rmask, dk, dmask, D)
    xh = x / _row_norm(x)[:, None]
    lab = tl.load(labels_ptr + rows, mask=rmask, other=-1).to(tl.int64)
    valid = (lab >= 0) & (lab < C)
    y_row = tl.where(valid, lab, 0) * K
    best = tl.full([BLOCK_B], float("-inf"), tl.float32)
    row = y_row
    for k in range(K):
        s_k = tl.sum(xh * _load_rows(w_ptr, y_row + k, rmask, dk, dmask, D), axis=1)
        row = tl.where(s_k > best, y_row + k, row)
        best = tl.maximum(best, s_k)
    tl.store(out_ptr + rows, tl.where(valid, row, -1), mask=rmask)


def _autotuned(kernel, key):
    names = ("BLOCK_B", "BLOCK_C") if kernel is _ccl_fwd_kernel else ("BLOCK_C", "BLOCK_B")

    def prune(configs, named_args, **kwargs):
        keep = [c for c in configs if kwargs["BLOCK_D"] // c.kwargs["DV_SPLIT"] >= 16
                and c.kwargs["BLOCK_C"] >= kwargs["KP"]]
        return keep or configs[:1]

    configs = [triton.Config({names[0]: r, names[1]: c, "DV_SPLIT": v}, num_warps=nw, num_stages=ns)
               for r, c, v, nw, ns in ccl_tune_space()]
    return triton.autotune(configs=configs, key=key, prune_configs_by={"early_config_prune": prune})(kernel)


_FWD_TUNED = _autotuned(_ccl_fwd_kernel, ["B", "C", "D", "K", "COMPUTE_GRAD", "EPILOGUE", "ANGULAR", "SOFT", "DOT"])
_BWD_TUNED = _autotuned(_ccl_bwd_centers_kernel, ["B", "C", "D", "K", "ANGULAR", "SOFT", "HAS_Q", "FOREIGN", "DOT"])


def _meta(cfg: Config, rows_name: str, cols_name: str) -> dict:
    """Launch keywords for ``cfg`` (none when autotuning chooses them)."""
    if autotune():
        return {}
    return {rows_name: cfg.rows, cols_name: cfg.cols, "DV_SPLIT": cfg.dv_split,
            "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}


# ----------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------
def _family(temperature, margin, margin_type, sub_centers, bank_rows, gamma=0.0):
    """Scalar and constexpr launch arguments shared by the forward, combine and proxy-gradient kernels (``SOFT``:
    SoftTriple's centre mean, γ > 0 with K > 1; with K = 1 it is the plain cosine)."""
    if margin_type not in (0, 1):
        raise ValueError(f"margin_type must be 0 (additive cosine) or 1 (additive angular), got {margin_type}")
    if sub_centers < 1 or bank_rows % sub_centers:
        raise ValueError(f"centers has {bank_rows} rows, not a multiple of sub_centers={sub_centers}")
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    soft = gamma > 0 and sub_centers > 1
    hyper = dict(inv_temp=1.0 / temperature, margin=margin, cos_m=math.cos(margin), sin_m=math.sin(margin))
    return hyper, dict(ANGULAR=margin_type == 1, SOFT=soft), triton.next_power_of_2(sub_centers), (
        1.0 / gamma if soft else 0.0)


def ccl_fwd(x, labels, centers, temperature, margin, center_weight, compute_grad, margin_type=0, sub_centers=1,
            gamma=0.0, *, config: Config | None = None, split: int | None = None):
    """``(loss_rows (B,), grad_x (B, D) or (0, D), lse (B,), label_q (B,))``, all fp32 (see the module docstring;
    ``label_q`` = 1 − p_{i,y_i}, for the proxy gradient).

    ``centers`` (C·K, D) with K = ``sub_centers``. ``config`` / ``split`` override the heuristics (``split=1``: no
    partials, fused epilogue); a config streaming fewer bank rows than the padded K is widened to K.
    """
    b, d = x.shape
    f32 = torch.float32
    loss = new_output((b,), f32, x.device)
    grad = new_output((b if compute_grad else 0, d), f32, x.device)
    lse = new_output((b,), f32, x.device)
    q = new_output((b,), f32, x.device)
    if b == 0:
        return loss, grad, lse, q
    parts, hyper, flags, dot = _stream(x, labels, centers, temperature, margin, center_weight, compute_grad,
                                       margin_type, sub_centers, (loss, grad, lse, q), config, split, gamma)
    if parts is not None:
        rows = max(1, min(16, 2048 // block_d(d)))  # ≤ 2048 fp32 accumulator elements: no spills at D = 128 or 512
        _ccl_combine_kernel[(triton.cdiv(b, rows),)](
            x, labels, centers, loss, grad, lse, q, *parts, b, centers.shape[0] // sub_centers, d, sub_centers,
            parts[0].shape[0], **hyper, BLOCK_B=rows, BLOCK_D=block_d(d), KP=triton.next_power_of_2(sub_centers),
            COMPUTE_GRAD=compute_grad, **flags, DOT=dot)
    return loss, grad, lse, q


def ccl_fwd_partials(x, labels, centers, temperature, margin, compute_grad, margin_type=0, sub_centers=1, *,
                     config: Config | None = None, split: int | None = None):
    """``(m, l, lo, ps, acc, c_y, row_y)`` of ``x`` over the bank slice ``centers`` (``fastcdml.reference.ccl.
    ccl_partials``): the forward kernel without its epilogue, its ``split`` partial states per row (the split-C
    heuristic as in :func:`ccl_fwd`) merged here by the reference's ``merge_partials``. A label outside [0, C)
    belongs to another slice (the kernel masks it like a padding column). m is returned in natural units."""
    b, d = x.shape
    k = sub_centers
    c = centers.shape[0] // k
    f32, dev = torch.float32, x.device
    n = b if compute_grad else 0
    if b == 0 or c == 0:
        return (torch.full((b,), -math.inf, dtype=f32, device=dev), *(torch.zeros(b, dtype=f32, device=dev)
                for _ in range(2)), torch.zeros(n, dtype=f32, device=dev), torch.zeros(n, d, dtype=f32, device=dev),
                torch.zeros(b, dtype=f32, device=dev), torch.full((b,), -1, dtype=torch.int64, device=dev))
    pm, pl, pps, pacc, plab = _stream(x, labels, centers, temperature, margin, 0.0, compute_grad, margin_type, k,
                                      None, config, split)[0]
    owned = (labels >= 0) & (labels < c)
    row_y = torch.where(owned, labels.long() * k + plab[1].sum(dim=0).long(), -1)
    m, l, lo, ps, acc = merge_partials(pm * (1.0 / LOG2E), pl, plab[2], pps if compute_grad else pps[:, :0], pacc)
    return m, l, lo, ps, acc, plab[0].sum(dim=0), row_y


def _stream(x, labels, centers, temperature, margin, center_weight, compute_grad, margin_type, sub_centers, outputs,
            config, split, gamma=0.0):
    """Launch ``_ccl_fwd_kernel`` over the whole bank. With ``outputs`` (loss, grad, lse, q) and one split the
    kernel runs its epilogue into them and the partials are None; otherwise (more splits, or ``outputs`` None:
    the partials op) it writes the partial states ``(pm, pl, pps, pacc, plab)``, one per split. Also returns the
    scalar and constexpr arguments of the epilogue and the ``tl.dot`` operand type the pass used."""
    b, d = x.shape
    k = sub_centers
    hyper, flags, kp, inv_gamma = _family(temperature, margin, margin_type, k, centers.shape[0], gamma)
    c = centers.shape[0] // k
    dev = x.device
    f32 = torch.float32
    heuristic, kind = ccl_config(d, x.dtype, centers.dtype, _smem(dev), CCL_FWD_CONFIGS)
    cfg = config or heuristic
    if flags["SOFT"] and config is None:  # the centre mean keeps three (rows, cols) fp32 tiles more live
        cfg = cfg._replace(cols=cfg.cols // 4)
    cfg = cfg._replace(cols=max(cfg.cols, kp))
    bd = block_d(d)
    dot, upcast, prec = _dot_types(x.dtype, centers.dtype, kind)
    hyper["two_lambda"] = 2.0 * center_weight
    key = (d, x.dtype, centers.dtype, compute_grad, kind, kp, margin_type, flags["SOFT"])  # the split kernel's
    launched = {}

    def run(cfg, split, warmup=False):
        """Launch (or, with ``warmup``, only compile) the forward kernel with ``split`` programs per row block."""
        epilogue = split == 1 and outputs is not None
        if not (epilogue or warmup):
            parts = (*(new_output((split, b), f32, dev) for _ in range(3)),
                     new_output((split, b, d) if compute_grad else (split, 0, d), f32, dev),
                     new_output((3 + (kp if flags["SOFT"] else 0), split, b), f32, dev))
        else:
            parts = None
        launched.update(parts=parts)
        # unused fp32 pointers (or, compiling only, pointers of the launch's types)
        stand_in = outputs[0] if outputs is not None else x.new_empty(1, dtype=f32)
        loss, grad, lse, q = outputs if outputs is not None else (stand_in,) * 4
        pm, pl, pps, pacc, plab = parts or (stand_in,) * 5
        grid = lambda meta: (triton.cdiv(b, meta["BLOCK_B"]) * meta["DV_SPLIT"], split)  # noqa: E731
        fwd = _FWD_TUNED if autotune() else _ccl_fwd_kernel
        kernel = functools.partial(fwd.warmup, grid=grid) if warmup else fwd[grid]
        return kernel(x, labels, centers, loss, grad, lse, q, pm, pl, pps, pacc, plab, b, c, d, k, split,
                      LOG2E / temperature, **hyper, inv_gamma=inv_gamma, BLOCK_D=bd, KP=kp, COMPUTE_GRAD=compute_grad,
                      EPILOGUE=epilogue, **flags, DOT=dot, UPCAST=upcast, PREC=prec,
                      **_meta(cfg, "BLOCK_B", "BLOCK_C"))

    def launch(cfg):  # the split heuristic counts bank-row tiles (classes × KP slots)
        run(cfg, split or default_split(b, c * kp, cfg,
                                        *_machine(dev, key, cfg, lambda: run(cfg, 2, warmup=True))))

    _launch(cfg, launch)
    return launched["parts"], hyper, flags, dot


def _smem(dev: torch.device) -> int:
    return SMEM_CLASSES[0] if INTERPRET else _device.limits(dev).smem_per_block


_OCCUPANCY: dict = {}  # (device, split kernel's dtypes and constexprs, config) -> its programs per SM


def _machine(dev: torch.device, key: tuple, cfg: Config, compile_split_kernel) -> tuple[int, int]:
    """(SMs, occupancy) for the split heuristic: the occupancy of the split-C forward kernel as compiled
    (registers, shared memory, warps; ``compile_split_kernel()`` returns it), remembered per config. Under the
    interpreter INTERPRETER_SMS and 1; when autotuning (the config is not known before the launch) 1."""
    if INTERPRET:
        return INTERPRETER_SMS, 1
    lim = _device.limits(dev)
    if autotune():
        return lim.sms, 1
    at = (dev, key, cfg)
    if at not in _OCCUPANCY:
        _OCCUPANCY[at] = _device.occupancy(compile_split_kernel(), lim)
    return lim.sms, _OCCUPANCY[at]


def ccl_bwd_centers(x, labels, centers, lse, grad_rows, temperature, margin, center_weight, margin_type=0,
                    sub_centers=1, label_q=None, foreign_labels=False, gamma=0.0, *, config: Config | None = None):
    """∂(Σ_i g_i L_i)/∂W (C·K, D) fp32, reusing the forward's lse and label_q (without it, 1 − p_{i,y_i} is
    recomputed from lse: inaccurate when p_{i,y_i} → 1); ``foreign_labels``: ``centers`` is a slice of a sharded
    bank and a label outside it leaves the row's negatives; ``config`` overrides the heuristic."""
    b, d = x.shape
    k = sub_centers
    hyper, flags, kp, inv_gamma = _family(temperature, margin, margin_type, k, centers.shape[0], gamma)
    c = centers.shape[0] // k
    out = new_output(tuple(centers.shape), torch.float32, x.device)
    if c == 0:
        return out
    if b == 0:
        return out.zero_()
    heuristic, kind = ccl_config(d, x.dtype, centers.dtype, _smem(x.device), CCL_BWD_CONFIGS)
    cfg = config or heuristic
    cfg = cfg._replace(rows=max(cfg.rows, kp))
    dot, upcast, prec = _dot_types(x.dtype, centers.dtype, kind)
    grad_rows = grad_rows.to(torch.float32).contiguous()

    def launch(cfg):
        grid = lambda meta: (triton.cdiv(c, meta["BLOCK_C"] // kp) * meta["DV_SPLIT"],)  # noqa: E731
        kernel = _BWD_TUNED if autotune() else _ccl_bwd_centers_kernel
        kernel[grid](x, labels, centers, lse, lse if label_q is None else label_q, grad_rows, out, b, c, d, k,
                     LOG2E / temperature, **hyper, pull=2.0 * center_weight * temperature, inv_gamma=inv_gamma,
                     BLOCK_D=block_d(d), KP=kp, **flags, HAS_Q=label_q is not None, FOREIGN=foreign_labels,
                     DOT=dot, UPCAST=upcast, PREC=prec, **_meta(cfg, "BLOCK_C", "BLOCK_B"))

    _launch(cfg, launch)
    return out


def ccl_momentum_update_(centers, x, labels, momentum, sub_centers=1):
    """In place: ``W_r ← normalize(μ W_r + (1 − μ) mean_{r_i = r} x̂_i)`` for every bank row r some query moves,
    where r_i = y_i (K = 1) or the sub-center of class y_i that x̂_i is most similar to (``_ccl_assign_kernel``,
    computed from the bank before the step)."""
    b, d = x.shape
    rows = centers.shape[0]
    if b == 0 or rows == 0:
        return
    if sub_centers < 1 or rows % sub_centers:
        raise ValueError(f"centers has {rows} rows, not a multiple of sub_centers={sub_centers}")
    if sub_centers > 1:
        assigned = new_output((b,), torch.int64, x.device)
        block = 16
        _ccl_assign_kernel[(triton.cdiv(b, block),)](x, labels, centers, assigned, b, rows // sub_centers, d,
                                                     sub_centers, BLOCK_B=block, BLOCK_D=block_d(d))
        labels = assigned
    sorted_labels, perm = torch.sort(labels, stable=True)
    _ccl_update_kernel[(b,)](centers, x, sorted_labels, perm, b, rows, d, momentum,
                             BLOCK_R=UPDATE_ROWS, BLOCK_D=block_d(d), num_warps=4 if d >= 256 else 2)

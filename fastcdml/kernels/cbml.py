"""Fused Triton kernels for the Contrastive Bayesian loss (math: ``docs/spec.md`` and
:mod:`fastcdml.reference.cbml`). No B×M matrix is ever stored; every stage recomputes ``S`` tile by tile.

Reference set R = [x (B rows, if include_self)] ++ [ref (M rows)], n = |R|; column j of the self part is x_j,
column n_self + j is ref_j. ``S_ij = (x_i · R_j) · inv‖x_i‖ · inv‖R_j‖`` with fp32 accumulation. Stages:

1. ``_inv_norm_kernel``: ``1 / max(‖row‖, eps)`` for x and ref (fp32).
2. Row statistics. Programs own a block of BLOCK_B query rows × one of SPLIT contiguous ranges of R's tiles
   (split-N, so that B/BLOCK_B × SPLIT fills the GPU even for B = 1024 against M = 65,536); partials are
   combined in column order by one program per row block (no atomics, deterministic, ties → lowest index):
   ``_cbml_stats_kernel`` (sweep 1): row sum, Σ_P S, Σ_N S, |P|, |N|, minP / maxN with their lowest indices and, in top-K
   mode, the row's KP ≥ K largest negative keys of its split (``key = (monotone int32 of S) << 32 |
   (2³¹−1 − j)``: larger value first, lower index first on ties, exactly the reference's stable descending
   sort) in a global scratch buffer ``pbuf[split, row, KP]`` kept sorted descending. Per tile, a row whose best
   key beats its buffer's last one gets the tile's keys merged in: the tile row sorted ascending (bitonic), the
   elementwise max with the buffer (the top KP of the union, bitonic) and one bitonic merge stage (log₂ KP
   layers). Rows are merged one at a time, so registers hold one row's KP keys, never BLOCK_B × KP (which at
   K = 1000 spilled 214 KB per thread and took minutes to compile); ``_cbml_combine_kernel``: minP, maxN,
   the variance centre ``mean`` (class means or boundary form) and the K-th key (the selection threshold ``key ≥ kth``) from the split buffers, merged the same way;
   ``_cbml_sums_kernel`` (sweep 2): ``σ = Σ_N (S − mean)²`` and
   ``Σ_N (S − mean)`` accumulated directly (no cancellation), the selected positive / negative exp-sums with
   an online max, and the selected-set sizes; ``_cbml_finalize_kernel``: L_i and the gradient's row scalars.
3. ``_cbml_grad_query_kernel``: ``∂L/∂x̂ = G R̂`` per (row block, split, D chunk) into partial slices
   (G = B·∂L/∂S, elementwise given the row scalars, including the paths through the centre μ: the class sums,
   or the row mean and the minP / maxN elements).
4. ``_cbml_grad_ref_kernel``: ``∂L/∂R̂ = Gᵀ x̂`` per tile of reference rows looping over the queries (no
   atomics); the self part goes to one more partial slice of x's gradient.
5. ``_norm_bwd_kernel``: sums the slices and applies the row-normalisation backward times 1/B;
   ``_sum_kernel``: Σ_i L_i / B.

Every stage computes S with the same block shapes, so S is bitwise the same in every stage and the set
selections (ties, top-K threshold, minP/maxN indices) agree. With 16-bit inputs of one dtype ``tl.dot`` runs in
that dtype (G is split into hi + lo 16-bit parts for the backward products); fp32 or mixed inputs use fp32
operands with the precision ``torch.get_float32_matmul_precision()`` asks for: ``tf32x3`` (≈ fp32) for
"highest", one tf32 product for "high" and "medium". Offsets that can pass 2³¹ (partial gradient slices
``split·B·D``, top-K buffers ``split·B·KP``) are int64. Under the interpreter S is a broadcast sum (numpy's
matmul gives unequal results for equal columns, which would break exact ties) and bf16 backward operands are
upcast.
Tuning (:mod:`fastcdml.kernels._tuning`): fixed heuristic blocks (``cbml_config``); ``FASTCDML_AUTOTUNE=1`` times
whole-pipeline candidates once per shape bucket (the blocks of all stages must agree, so per-kernel
``triton.autotune`` cannot be used).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._runtime import interpreter_active, new_output
from . import _device
from ._tuning import CBML_CANDIDATES, CbmlConfig, autotune, cbml_config, cbml_products, fit_cbml, pow2

EPS = tl.constexpr(1e-12)
INT64_MIN = tl.constexpr(-(2**63))  # the empty top-K slot: below every key
# fp32 row scalars: minP, maxN, mean, u_pos, u_neg, c_pos, c_neg, w_valid, c_mean, then the two coefficients of
# ∂μ/∂S (k1, k2; see _grad_tile)
_N_ROWF = 11


# --------------------------------------------------------------------------------------------------- helpers
@triton.jit
def _load_chunk(ptr, rows, rmask, d0, D, BLOCK_D: tl.constexpr, DOT_F32: tl.constexpr):
    """(len(rows), BLOCK_D) slice ``ptr[rows, d0:d0+BLOCK_D]`` (zeros outside), fp32 when DOT_F32."""
    offs = d0 + tl.arange(0, BLOCK_D)
    t = tl.load(ptr + rows[:, None] * D + offs[None, :], mask=rmask[:, None] & (offs < D)[None, :], other=0.0)
    if DOT_F32:
        t = t.to(tl.float32)
    return t


@triton.jit
def _dot_chunks(x_ptr, rows, rmask, c_ptr, cols, cmask, D, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_D: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr, INTERPRET: tl.constexpr):
    """(BLOCK_B, BLOCK_N) fp32 products ``x[rows] · c[cols]ᵀ`` accumulated over D in BLOCK_D chunks. Under the
    interpreter the product is a broadcast sum: numpy's matmul does not give equal columns for equal inputs, which
    would break exact ties (tensor-core dots do)."""
    acc = tl.zeros((BLOCK_B, BLOCK_N), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        q = _load_chunk(x_ptr, rows, rmask, d0, D, BLOCK_D, DOT_F32)
        c = _load_chunk(c_ptr, cols, cmask, d0, D, BLOCK_D, DOT_F32)
        if INTERPRET:
            acc += tl.sum(q.to(tl.float32)[:, None, :] * c.to(tl.float32)[None, :, :], 2)
        else:
            acc = tl.dot(q, tl.trans(c), acc, input_precision=PRECISION)
    return acc


@triton.jit
def _tile(x_ptr, xinv, rows, rmask, yq, c_ptr, cinv_ptr, yc_ptr, c0, n_c, base, m_ptr, m_w, D,
          IS_SELF: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
          DOT_F32: tl.constexpr, PRECISION: tl.constexpr, INTERPRET: tl.constexpr, HAS_MASK: tl.constexpr):
    """S tile (BLOCK_B, BLOCK_N) of the query rows against columns c0.. of one part of R (global columns
    base + c0..), with the positive / negative masks. A column whose label is negative (an empty memory slot) is
    absent: its inverse norm is taken as 0, so S = 0 there (out of the row sum), it is in no set and its row of
    R̂ gets no gradient. With HAS_MASK, only the pairs whose bit is set in the (B, m_w)-byte pair mask ``m_ptr``
    can be positives or negatives."""
    cols = c0 + tl.arange(0, BLOCK_N).to(tl.int64)
    cmask = cols < n_c
    yc = tl.load(yc_ptr + cols, mask=cmask, other=-1).to(tl.int64)
    cinv = tl.load(cinv_ptr + cols, mask=cmask & (yc >= 0), other=0.0)
    acc = _dot_chunks(x_ptr, rows, rmask, c_ptr, cols, cmask, D, BLOCK_B, BLOCK_N, BLOCK_D, DOT_F32, PRECISION,
                      INTERPRET)
    s = acc * xinv[:, None] * cinv[None, :]
    s = tl.where(s == 0.0, 0.0, s)  # −0 → +0 so that the sort keys order equal values by index only
    valid = rmask[:, None] & (yc >= 0)[None, :]
    if HAS_MASK:
        gcols = base + cols
        byte = tl.load(m_ptr + rows[:, None] * m_w + (gcols >> 3)[None, :], mask=valid, other=0).to(tl.int32)
        valid = valid & (((byte >> (gcols & 7).to(tl.int32)[None, :]) & 1) != 0)
    same = yq[:, None] == yc[None, :]
    pos = valid & same
    if IS_SELF:
        pos = pos & (cols[None, :] != rows[:, None])
    neg = valid & (yq[:, None] != yc[None, :])
    return s, pos, neg, cinv, cols


@triton.jit
def _key(s, gcols):
    """int64 sort key: larger S first, then lower global column index (the reference's stable sort)."""
    bits = s.to(tl.int32, bitcast=True)
    mono = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return (mono.to(tl.int64) << 32) | (0x7FFFFFFF - gcols[None, :])


@triton.jit
def _sel_neg(s, neg, gcols, min_p, kth, margin, TOPK: tl.constexpr):
    """Selected (hard) negatives: adaptive (TOPK=0), key >= K-th key (TOPK=1) or all negatives (TOPK=2)."""
    if TOPK == 0:
        sel = neg & (s + margin > min_p[:, None])
    elif TOPK == 1:
        sel = neg & (_key(s, gcols) >= kth[:, None])
    else:
        sel = neg
    return sel


@triton.jit
def _axis_bit(n_dims: tl.constexpr, j: tl.constexpr):
    """Coordinate (0/1) along the hypercube axis of index bit j, broadcastable to [2] * n_dims."""
    return tl.reshape(tl.arange(0, 2), [1] * (n_dims - j - 1) + [2] + [1] * j)


@triton.jit
def _bitonic_stage(h, n_dims: tl.constexpr, s: tl.constexpr, flip):
    """Stage ``s`` of a bitonic network on the hypercube view ``h`` ([2] * n_dims, int64) of a vector: every
    block of 2^s elements, bitonic on entry, comes out sorted (ascending where ``flip`` is 0, else descending).
    An element's partner along an axis is (pair sum) − element, exact in wrapping int64 arithmetic (and a plain
    sum keeps the interpreter fast, unlike ``tl.sort``'s custom reduction)."""
    for t in tl.static_range(s):
        y = tl.sum(h, n_dims - s + t, keep_dims=True) - h  # axis of index bit s − 1 − t
        right = _axis_bit(n_dims, s - 1 - t)
        h = tl.where((right ^ flip) != 0, tl.maximum(h, y), tl.minimum(h, y))
    return h


@triton.jit
def _sort(x, LOG_N: tl.constexpr, DESCENDING: tl.constexpr):
    """The int64 vector x (2^LOG_N,) sorted by a bitonic network (LOG_N·(LOG_N+1)/2 compare-exchange layers)."""
    h = tl.reshape(x, [2] * LOG_N)
    for s in tl.static_range(1, LOG_N + 1):
        if s < LOG_N:
            flip = _axis_bit(LOG_N, s) ^ DESCENDING  # blocks of 2^(s+1) alternate direction
        else:
            flip = tl.zeros([1] * LOG_N, tl.int32) + DESCENDING
        h = _bitonic_stage(h, LOG_N, s, flip)
    return tl.reshape(h, x.shape)


@triton.jit
def _top_of_union(buf, cand_asc, LOG_KP: tl.constexpr):
    """The 2^LOG_KP largest of buf (sorted descending) ∪ cand_asc (same length, sorted ascending), sorted
    descending: max(buf, cand_asc) elementwise is the top half of the union and bitonic, so one merge stage
    (LOG_KP layers) sorts it."""
    h = tl.reshape(tl.maximum(buf, cand_asc), [2] * LOG_KP)
    h = _bitonic_stage(h, LOG_KP, LOG_KP, tl.zeros([1] * LOG_KP, tl.int32) + 1)
    return tl.reshape(h, buf.shape)


@triton.jit
def _merge_tile_topk(buf, cand, LOG_T: tl.constexpr, LOG_KP: tl.constexpr):
    """The 2^LOG_KP largest keys of buf (2^LOG_KP, sorted descending) ∪ cand (2^LOG_T ≤ 2^LOG_KP, any order),
    sorted descending: cand is sorted ascending and compared with buf's last 2^LOG_T slots (the empty slots
    INT64_MIN stand for the rest of an ascending sequence of buf's length)."""
    T: tl.constexpr = 1 << LOG_T
    CH: tl.constexpr = 1 << (LOG_KP - LOG_T)
    cand = _sort(cand, LOG_T, False)
    last = (tl.arange(0, CH) == CH - 1)[:, None]
    pad = tl.where(last, cand[None, :], INT64_MIN)
    return _top_of_union(buf, tl.reshape(pad, (CH * T,)), LOG_KP)


@triton.jit
def _pass1(s, pos, neg, g0, row_sum, pos_sum, neg_sum, n_pos, n_neg, min_p, arg_p, max_n, arg_n):
    row_sum += tl.sum(s, 1)
    pos_sum += tl.sum(tl.where(pos, s, 0.0), 1)
    neg_sum += tl.sum(tl.where(neg, s, 0.0), 1)
    n_pos += tl.sum(pos.to(tl.int32), 1)
    n_neg += tl.sum(neg.to(tl.int32), 1)
    t_min, t_arg = tl.min(tl.where(pos, s, float("inf")), 1, return_indices=True,
                          return_indices_tie_break_left=True)
    upd = t_min < min_p  # strict: an earlier tile keeps a tie
    min_p = tl.where(upd, t_min, min_p)
    arg_p = tl.where(upd, g0 + t_arg, arg_p)
    t_max, t_arg = tl.max(tl.where(neg, s, -float("inf")), 1, return_indices=True,
                          return_indices_tie_break_left=True)
    upd = t_max > max_n
    max_n = tl.where(upd, t_max, max_n)
    arg_n = tl.where(upd, g0 + t_arg, arg_n)
    return row_sum, pos_sum, neg_sum, n_pos, n_neg, min_p, arg_p, max_n, arg_n


@triton.jit
def _topk_tile(s, neg, gcols, n_rows, buf_ptr, BLOCK_B: tl.constexpr, LOG_N: tl.constexpr, LOG_KP: tl.constexpr):
    """Merge a tile's negative keys into the top-KP key buffers of its rows (row r: ``buf_ptr + r·KP``, global
    scratch, sorted descending), one row at a time, so that only one row's buffer is ever in registers. A row
    whose best key in the tile does not beat its buffer's last key is skipped (after the first K columns that
    is most rows of most tiles). Barriers order a row's store before any later read of it by another thread."""
    KP: tl.constexpr = 1 << LOG_KP
    tk = tl.where(neg, _key(s, gcols), INT64_MIN)
    best = tl.max(tk, 1)
    lr = tl.arange(0, BLOCK_B)
    offs = tl.arange(0, KP)
    for r in range(0, n_rows):
        row_ptr = buf_ptr + r * KP
        if tl.max(tl.where(lr == r, best, INT64_MIN), 0) > tl.load(row_ptr + KP - 1):
            cand = tl.max(tl.where(lr[:, None] == r, tk, INT64_MIN), 0)
            merged = _merge_tile_topk(tl.load(row_ptr + offs), cand, LOG_N, LOG_KP)
            tl.debug_barrier()
            tl.store(row_ptr + offs, merged)
            tl.debug_barrier()


@triton.jit
def _pass2(s, pos, neg, gcols, min_p, max_n, mean, kth, sig, dsum, m_p, l_p, c_p, m_n, l_n, c_n,
           pos_a, pos_b, neg_a, neg_b, margin, TOPK: tl.constexpr):
    d = tl.where(neg, s - mean[:, None], 0.0)
    sig += tl.sum(d * d, 1)
    dsum += tl.sum(d, 1)
    sel = pos & (s - margin < max_n[:, None])
    t = tl.where(sel, (pos_a - s) / pos_b, -float("inf"))
    m = tl.maximum(m_p, tl.max(t, 1))
    l_p = l_p * tl.exp(m_p - m) + tl.sum(tl.exp(t - m[:, None]), 1)
    m_p = m
    c_p += tl.sum(sel.to(tl.int32), 1)
    sel = _sel_neg(s, neg, gcols, min_p, kth, margin, TOPK)
    t = tl.where(sel, (s - neg_a) / neg_b, -float("inf"))
    m = tl.maximum(m_n, tl.max(t, 1))
    l_n = l_n * tl.exp(m_n - m) + tl.sum(tl.exp(t - m[:, None]), 1)
    m_n = m
    c_n += tl.sum(sel.to(tl.int32), 1)
    return sig, dsum, m_p, l_p, c_p, m_n, l_n, c_n


@triton.jit
def _row_scalars(rowf_ptr, rowi_ptr, kth_ptr, rows, rmask, B, TOPK: tl.constexpr):
    min_p = tl.load(rowf_ptr + 0 * B + rows, mask=rmask, other=0.0)
    max_n = tl.load(rowf_ptr + 1 * B + rows, mask=rmask, other=0.0)
    mean = tl.load(rowf_ptr + 2 * B + rows, mask=rmask, other=0.0)
    u_p = tl.load(rowf_ptr + 3 * B + rows, mask=rmask, other=0.0)
    u_n = tl.load(rowf_ptr + 4 * B + rows, mask=rmask, other=0.0)
    c_p = tl.load(rowf_ptr + 5 * B + rows, mask=rmask, other=0.0)
    c_n = tl.load(rowf_ptr + 6 * B + rows, mask=rmask, other=0.0)
    w_v = tl.load(rowf_ptr + 7 * B + rows, mask=rmask, other=0.0)
    c_mu = tl.load(rowf_ptr + 8 * B + rows, mask=rmask, other=0.0)
    k1 = tl.load(rowf_ptr + 9 * B + rows, mask=rmask, other=0.0)
    k2 = tl.load(rowf_ptr + 10 * B + rows, mask=rmask, other=0.0)
    arg_p = tl.load(rowi_ptr + rows, mask=rmask, other=-1)
    arg_n = tl.load(rowi_ptr + B + rows, mask=rmask, other=-1)
    if TOPK == 1:
        kth = tl.load(kth_ptr + rows, mask=rmask, other=0)
    else:
        kth = arg_p  # unused
    return min_p, max_n, mean, u_p, u_n, c_p, c_n, w_v, c_mu, k1, k2, arg_p, arg_n, kth


@triton.jit
def _grad_tile(s, pos, neg, gcols, cinv, min_p, max_n, mean, u_p, u_n, c_p, c_n, w_v, c_mu, k1, k2, arg_p, arg_n,
               kth, pos_a, pos_b, neg_a, neg_b, margin, TOPK: tl.constexpr, CLASS_MEANS: tl.constexpr):
    """G = B · ∂L/∂S on a tile (zero for skipped rows and for absent or masked-out columns). The centre μ's share,
    ``c_mu · ∂μ/∂S``: with CLASS_MEANS ``∂μ/∂S_ij = k1 = h/|P|`` on P and ``k2 = (1−h)/|N|`` on N; else
    ``k1 = (1−h)/n`` on every present column plus ``k2 = h/2`` on the minP and maxN elements."""
    sel = pos & (s - margin < max_n[:, None])
    g = tl.where(sel, c_p[:, None] * tl.exp((pos_a - s) / pos_b - u_p[:, None]), 0.0)
    sel = _sel_neg(s, neg, gcols, min_p, kth, margin, TOPK)
    g += tl.where(sel, c_n[:, None] * tl.exp((s - neg_a) / neg_b - u_n[:, None]), 0.0)
    g += tl.where(neg, 2.0 * w_v[:, None] * (s - mean[:, None]), 0.0)
    if CLASS_MEANS:
        dmu = tl.where(pos, k1[:, None], tl.where(neg, k2[:, None], 0.0))
    else:
        dmu = k1[:, None] + k2[:, None] * ((gcols[None, :] == arg_p[:, None]).to(tl.float32)
                                           + (gcols[None, :] == arg_n[:, None]).to(tl.float32))
    return g + tl.where(cinv[None, :] > 0.0, c_mu[:, None] * dmu, 0.0)  # present columns only


@triton.jit
def _acc_dot(acc, a, b, DOT_F32: tl.constexpr, PRECISION: tl.constexpr):
    """acc + a @ b with fp32 ``a``: fp32 operands, or a split into hi + lo parts of b's 16-bit dtype."""
    if DOT_F32:
        acc = tl.dot(a, b.to(tl.float32), acc, input_precision=PRECISION)
    else:
        hi = a.to(b.dtype)
        acc = tl.dot(hi, b, acc)
        acc = tl.dot((a - hi.to(tl.float32)).to(b.dtype), b, acc)
    return acc


# --------------------------------------------------------------------------------------------------- kernels
@triton.jit
def _inv_norm_kernel(x_ptr, out_ptr, R, D, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    rmask = rows < R
    acc = tl.zeros((BLOCK_R,), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        t = _load_chunk(x_ptr, rows, rmask, d0, D, BLOCK_D, True)
        acc += tl.sum(t * t, 1)
    tl.store(out_ptr + rows, 1.0 / tl.maximum(tl.sqrt(acc), EPS), mask=rmask)


@triton.jit
def _split_bounds(t_self, t_all, tps):
    """This program's tile range [t0, t1) of the concatenated tile list (self tiles, then ref tiles)."""
    t0 = tl.program_id(1) * tps
    t1 = tl.minimum(t0 + tps, t_all)
    return t0, t1, tl.minimum(t1, t_self), tl.maximum(t0, t_self)


@triton.jit
def _cbml_stats_kernel(
    x_ptr, xinv_ptr, y_ptr, r_ptr, rinv_ptr, yr_ptr, m_ptr, m_w, pf_ptr, pi_ptr, pbuf_ptr,
    B, M, D, n_self, t_self, t_all, tps, SPLIT,
    TOPK: tl.constexpr, LOG_N: tl.constexpr, LOG_KP: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_F32: tl.constexpr, PRECISION: tl.constexpr, INTERPRET: tl.constexpr, HAS_MASK: tl.constexpr,
):
    """Sweep 1 over one split of R: partial row sum, Σ_P S, Σ_N S, |P|, |N|, minP/maxN with indices; in top-K
    mode the rows'
    KP largest negative keys of this split, sorted descending, in ``pbuf[split, row, :]``."""
    row0 = tl.program_id(0) * BLOCK_B
    rows = row0 + tl.arange(0, BLOCK_B).to(tl.int64)
    rmask = rows < B
    xinv = tl.load(xinv_ptr + rows, mask=rmask, other=0.0)
    yq = tl.load(y_ptr + rows, mask=rmask, other=0).to(tl.int64)
    zf = tl.zeros((BLOCK_B,), tl.float32)
    zi = tl.zeros((BLOCK_B,), tl.int64)
    row_sum, pos_sum, neg_sum, n_pos, n_neg, arg_p, arg_n = zf, zf, zf, zi, zi, zi, zi
    min_p, max_n = zf + float("inf"), zf - float("inf")
    KP: tl.constexpr = 1 << LOG_KP
    n_rows = tl.minimum(B - row0, BLOCK_B)
    buf_ptr = pbuf_ptr + (tl.program_id(1).to(tl.int64) * B + row0) * KP
    if TOPK == 1:
        for r in range(0, n_rows):
            tl.store(buf_ptr + r * KP + tl.arange(0, KP), tl.full((KP,), INT64_MIN, tl.int64))
        tl.debug_barrier()
    t0, t1, self_end, ref_start = _split_bounds(t_self, t_all, tps)
    for t in range(t0, self_end):
        s, pos, neg, _, gcols = _tile(x_ptr, xinv, rows, rmask, yq, x_ptr, xinv_ptr, y_ptr, t * BLOCK_N, n_self,
                                      0, m_ptr, m_w, D, True, BLOCK_B, BLOCK_N, BLOCK_D, DOT_F32, PRECISION,
                                      INTERPRET, HAS_MASK)
        row_sum, pos_sum, neg_sum, n_pos, n_neg, min_p, arg_p, max_n, arg_n = _pass1(
            s, pos, neg, t * BLOCK_N, row_sum, pos_sum, neg_sum, n_pos, n_neg, min_p, arg_p, max_n, arg_n)
        if TOPK == 1:
            _topk_tile(s, neg, gcols, n_rows, buf_ptr, BLOCK_B, LOG_N, LOG_KP)
    for t in range(ref_start, t1):
        c0 = (t - t_self) * BLOCK_N
        s, pos, neg, _, cols = _tile(x_ptr, xinv, rows, rmask, yq, r_ptr, rinv_ptr, yr_ptr, c0, M, n_self, m_ptr,
                                     m_w, D, False, BLOCK_B, BLOCK_N, BLOCK_D, DOT_F32, PRECISION, INTERPRET,
                                     HAS_MASK)
        row_sum, pos_sum, neg_sum, n_pos, n_neg, min_p, arg_p, max_n, arg_n = _pass1(
            s, pos, neg, c0 + n_self, row_sum, pos_sum, neg_sum, n_pos, n_neg, min_p, arg_p, max_n, arg_n)
        if TOPK == 1:
            _topk_tile(s, neg, cols + n_self, n_rows, buf_ptr, BLOCK_B, LOG_N, LOG_KP)
    at = tl.program_id(1) * B + rows  # partials: (k, SPLIT, B)
    tl.store(pf_ptr + at, row_sum, mask=rmask)
    tl.store(pf_ptr + SPLIT * B + at, min_p, mask=rmask)
    tl.store(pf_ptr + 2 * SPLIT * B + at, max_n, mask=rmask)
    tl.store(pf_ptr + 3 * SPLIT * B + at, pos_sum, mask=rmask)
    tl.store(pf_ptr + 4 * SPLIT * B + at, neg_sum, mask=rmask)
    tl.store(pi_ptr + at, n_pos, mask=rmask)
    tl.store(pi_ptr + SPLIT * B + at, n_neg, mask=rmask)
    tl.store(pi_ptr + 2 * SPLIT * B + at, arg_p, mask=rmask)
    tl.store(pi_ptr + 3 * SPLIT * B + at, arg_n, mask=rmask)


@triton.jit
def _cbml_combine_kernel(
    pf_ptr, pi_ptr, pbuf_ptr, rowf_ptr, rowi_ptr, kth_ptr, B, SPLIT, inv_n_ptr, K, mean_w,
    TOPK: tl.constexpr, LOG_KP: tl.constexpr, BLOCK_B: tl.constexpr, CLASS_MEANS: tl.constexpr,
):
    """Sweep-1 partials → minP, maxN (+ indices), the centre μ with its gradient coefficients k1, k2 and the K-th
    key; splits in column order (ties: lowest).
    The K-th key of a row: its split buffers merged pairwise (each sorted descending; the next one read
    backwards is ascending), one row at a time."""
    row0 = tl.program_id(0) * BLOCK_B
    rows = row0 + tl.arange(0, BLOCK_B).to(tl.int64)
    rmask = rows < B
    zf = tl.zeros((BLOCK_B,), tl.float32)
    zi = tl.zeros((BLOCK_B,), tl.int64)
    row_sum, pos_sum, neg_sum, n_pos, n_neg, arg_p, arg_n = zf, zf, zf, zi, zi, zi, zi
    min_p, max_n = zf + float("inf"), zf - float("inf")
    for sp in range(0, SPLIT):
        at = sp * B + rows
        row_sum += tl.load(pf_ptr + at, mask=rmask, other=0.0)
        pos_sum += tl.load(pf_ptr + 3 * SPLIT * B + at, mask=rmask, other=0.0)
        neg_sum += tl.load(pf_ptr + 4 * SPLIT * B + at, mask=rmask, other=0.0)
        n_pos += tl.load(pi_ptr + at, mask=rmask, other=0)
        n_neg += tl.load(pi_ptr + SPLIT * B + at, mask=rmask, other=0)
        v = tl.load(pf_ptr + SPLIT * B + at, mask=rmask, other=float("inf"))
        upd = v < min_p
        min_p = tl.where(upd, v, min_p)
        arg_p = tl.where(upd, tl.load(pi_ptr + 2 * SPLIT * B + at, mask=rmask, other=0), arg_p)
        v = tl.load(pf_ptr + 2 * SPLIT * B + at, mask=rmask, other=-float("inf"))
        upd = v > max_n
        max_n = tl.where(upd, v, max_n)
        arg_n = tl.where(upd, tl.load(pi_ptr + 3 * SPLIT * B + at, mask=rmask, other=0), arg_n)
    has_both = (n_pos > 0) & (n_neg > 0)
    min_p = tl.where(has_both, min_p, float("inf"))  # a skipped row selects nothing
    max_n = tl.where(has_both, max_n, -float("inf"))
    if CLASS_MEANS:  # μ = h·mean(P) + (1−h)·mean(N)
        k1 = tl.where(has_both, mean_w / tl.maximum(n_pos, 1).to(tl.float32), 0.0)
        k2 = tl.where(has_both, (1.0 - mean_w) / tl.maximum(n_neg, 1).to(tl.float32), 0.0)
        mean = k1 * pos_sum + k2 * neg_sum
    else:  # μ = (1−h)·mean(row) + h·(minP + maxN)/2
        k1 = zf + (1.0 - mean_w) * tl.load(inv_n_ptr)  # 1 / the number of present references (no host sync)
        k2 = zf + 0.5 * mean_w
        mean = k1 * row_sum + k2 * (tl.where(has_both, min_p, 0.0) + tl.where(has_both, max_n, 0.0))
    tl.store(rowf_ptr + 9 * B + rows, k1, mask=rmask)
    tl.store(rowf_ptr + 10 * B + rows, k2, mask=rmask)
    tl.store(rowf_ptr + rows, min_p, mask=rmask)
    tl.store(rowf_ptr + B + rows, max_n, mask=rmask)
    tl.store(rowf_ptr + 2 * B + rows, mean, mask=rmask)
    tl.store(rowi_ptr + rows, arg_p, mask=rmask)
    tl.store(rowi_ptr + B + rows, arg_n, mask=rmask)
    if TOPK == 1:
        KP: tl.constexpr = 1 << LOG_KP
        offs = tl.arange(0, KP)
        for r in range(0, tl.minimum(B - row0, BLOCK_B)):
            row = row0 + r
            buf = tl.load(pbuf_ptr + tl.cast(row, tl.int64) * KP + offs)
            for sp in range(1, SPLIT):
                cand = tl.load(pbuf_ptr + tl.cast(sp * B + row, tl.int64) * KP + (KP - 1 - offs))
                buf = _top_of_union(buf, cand, LOG_KP)
            tl.store(kth_ptr + row, tl.sum(tl.where(offs == K - 1, buf, 0), 0))


@triton.jit
def _cbml_sums_kernel(
    x_ptr, xinv_ptr, y_ptr, r_ptr, rinv_ptr, yr_ptr, m_ptr, m_w, rowf_ptr, kth_ptr, pf_ptr,
    B, M, D, n_self, t_self, t_all, tps, SPLIT,
    pos_a, pos_b, neg_a, neg_b, margin,
    TOPK: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_F32: tl.constexpr, PRECISION: tl.constexpr, INTERPRET: tl.constexpr, HAS_MASK: tl.constexpr,
):
    """Sweep 2 over one split: partial Σ_N (S−mean)², Σ_N (S−mean), selected exp-sums (max ≥ 0) and counts."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
    rmask = rows < B
    xinv = tl.load(xinv_ptr + rows, mask=rmask, other=0.0)
    yq = tl.load(y_ptr + rows, mask=rmask, other=0).to(tl.int64)
    min_p = tl.load(rowf_ptr + rows, mask=rmask, other=0.0)
    max_n = tl.load(rowf_ptr + B + rows, mask=rmask, other=0.0)
    mean = tl.load(rowf_ptr + 2 * B + rows, mask=rmask, other=0.0)
    if TOPK == 1:
        kth = tl.load(kth_ptr + rows, mask=rmask, other=0)
    else:
        kth = rows  # unused
    zf = tl.zeros((BLOCK_B,), tl.float32)
    zi = tl.zeros((BLOCK_B,), tl.int32)
    sig, dsum, m_p, l_p, m_n, l_n, c_p, c_n = zf, zf, zf, zf, zf, zf, zi, zi
    t0, t1, self_end, ref_start = _split_bounds(t_self, t_all, tps)
    for t in range(t0, self_end):
        s, pos, neg, _, gcols = _tile(x_ptr, xinv, rows, rmask, yq, x_ptr, xinv_ptr, y_ptr, t * BLOCK_N, n_self,
                                      0, m_ptr, m_w, D, True, BLOCK_B, BLOCK_N, BLOCK_D, DOT_F32, PRECISION,
                                      INTERPRET, HAS_MASK)
        sig, dsum, m_p, l_p, c_p, m_n, l_n, c_n = _pass2(
            s, pos, neg, gcols, min_p, max_n, mean, kth, sig, dsum, m_p, l_p, c_p, m_n, l_n, c_n,
            pos_a, pos_b, neg_a, neg_b, margin, TOPK)
    for t in range(ref_start, t1):
        s, pos, neg, _, cols = _tile(x_ptr, xinv, rows, rmask, yq, r_ptr, rinv_ptr, yr_ptr, (t - t_self) * BLOCK_N,
                                     M, n_self, m_ptr, m_w, D, False, BLOCK_B, BLOCK_N, BLOCK_D, DOT_F32, PRECISION,
                                     INTERPRET, HAS_MASK)
        sig, dsum, m_p, l_p, c_p, m_n, l_n, c_n = _pass2(
            s, pos, neg, cols + n_self, min_p, max_n, mean, kth, sig, dsum, m_p, l_p, c_p, m_n, l_n, c_n,
            pos_a, pos_b, neg_a, neg_b, margin, TOPK)
    at = tl.program_id(1) * B + rows
    tl.store(pf_ptr + at, sig, mask=rmask)
    tl.store(pf_ptr + SPLIT * B + at, dsum, mask=rmask)
    tl.store(pf_ptr + 2 * SPLIT * B + at, m_p, mask=rmask)
    tl.store(pf_ptr + 3 * SPLIT * B + at, l_p, mask=rmask)
    tl.store(pf_ptr + 4 * SPLIT * B + at, c_p.to(tl.float32), mask=rmask)
    tl.store(pf_ptr + 5 * SPLIT * B + at, m_n, mask=rmask)
    tl.store(pf_ptr + 6 * SPLIT * B + at, l_n, mask=rmask)
    tl.store(pf_ptr + 7 * SPLIT * B + at, c_n.to(tl.float32), mask=rmask)


@triton.jit
def _cbml_finalize_kernel(
    pf_ptr, rowf_ptr, lrow_ptr, B, SPLIT, pos_b, neg_b, var_w, pos_w, neg_w,
    PHI: tl.constexpr, BLOCK_B: tl.constexpr,
):
    """Sweep-2 partials → L_i and the row scalars of the gradient (u = log(1 + Σ exp), its φ-derivative;
    PHI 0 = log, 1 = sqrt, 2 = constant: 1 + w·Σ = 1 + w·(e^u − 1))."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
    rmask = rows < B
    zf = tl.zeros((BLOCK_B,), tl.float32)
    sig, dsum, m_p, m_n, c_p, c_n = zf, zf, zf, zf, zf, zf
    l_p, l_n = zf + 1.0, zf + 1.0  # the "1 +" as exp(0 − 0)
    for sp in range(0, SPLIT):
        at = sp * B + rows
        sig += tl.load(pf_ptr + at, mask=rmask, other=0.0)
        dsum += tl.load(pf_ptr + SPLIT * B + at, mask=rmask, other=0.0)
        c_p += tl.load(pf_ptr + 4 * SPLIT * B + at, mask=rmask, other=0.0)
        c_n += tl.load(pf_ptr + 7 * SPLIT * B + at, mask=rmask, other=0.0)
        m = tl.load(pf_ptr + 2 * SPLIT * B + at, mask=rmask, other=0.0)
        m_new = tl.maximum(m_p, m)
        l_p = l_p * tl.exp(m_p - m_new) + tl.load(pf_ptr + 3 * SPLIT * B + at, mask=rmask, other=0.0) * tl.exp(
            m - m_new)
        m_p = m_new
        m = tl.load(pf_ptr + 5 * SPLIT * B + at, mask=rmask, other=0.0)
        m_new = tl.maximum(m_n, m)
        l_n = l_n * tl.exp(m_n - m_new) + tl.load(pf_ptr + 6 * SPLIT * B + at, mask=rmask, other=0.0) * tl.exp(
            m - m_new)
        m_n = m_new
    min_p = tl.load(rowf_ptr + rows, mask=rmask, other=float("inf"))
    max_n = tl.load(rowf_ptr + B + rows, mask=rmask, other=-float("inf"))
    valid = (min_p < float("inf")) & (max_n > -float("inf")) & (c_p > 0) & (c_n > 0)
    u_p = m_p + tl.log(l_p)
    u_n = m_n + tl.log(l_n)
    if PHI == 1:
        f_p, f_n = tl.exp(0.5 * u_p), tl.exp(0.5 * u_n)
        d_p, d_n = 0.5 * f_p, 0.5 * f_n
    elif PHI == 2:
        e_p, e_n = l_p * tl.exp(m_p), l_n * tl.exp(m_n)  # 1 + Σ exp
        f_p, f_n = 1.0 + pos_w * (e_p - 1.0), 1.0 + neg_w * (e_n - 1.0)
        d_p, d_n = pos_w * e_p, neg_w * e_n
    else:
        f_p, f_n = u_p, u_n
        d_p, d_n = zf + 1.0, zf + 1.0
    w_v = tl.where(valid, var_w, 0.0)
    tl.store(lrow_ptr + rows, tl.where(valid, f_p + f_n + var_w * sig, 0.0), mask=rmask)
    tl.store(rowf_ptr + 3 * B + rows, u_p, mask=rmask)
    tl.store(rowf_ptr + 4 * B + rows, u_n, mask=rmask)
    tl.store(rowf_ptr + 5 * B + rows, tl.where(valid, -d_p / pos_b, 0.0), mask=rmask)
    tl.store(rowf_ptr + 6 * B + rows, tl.where(valid, d_n / neg_b, 0.0), mask=rmask)
    tl.store(rowf_ptr + 7 * B + rows, w_v, mask=rmask)
    tl.store(rowf_ptr + 8 * B + rows, -2.0 * w_v * dsum, mask=rmask)


@triton.jit
def _cbml_grad_query_kernel(
    x_ptr, xinv_ptr, y_ptr, r_ptr, rinv_ptr, yr_ptr, m_ptr, m_w, rowf_ptr, rowi_ptr, kth_ptr, gpart_ptr,
    B, M, D, n_self, t_self, t_all, tps,
    pos_a, pos_b, neg_a, neg_b, margin,
    TOPK: tl.constexpr, CLASS_MEANS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DO: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr, INTERPRET: tl.constexpr, HAS_MASK: tl.constexpr,
):
    """gpart[split, rows, d-chunk] = Σ_{j in split} G_ij R̂_j (query role, B·∂L/∂x̂ before normalisation)."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
    d0 = tl.program_id(2) * BLOCK_DO
    rmask = rows < B
    xinv = tl.load(xinv_ptr + rows, mask=rmask, other=0.0)
    yq = tl.load(y_ptr + rows, mask=rmask, other=0).to(tl.int64)
    min_p, max_n, mean, u_p, u_n, c_p, c_n, w_v, c_mu, k1, k2, arg_p, arg_n, kth = _row_scalars(
        rowf_ptr, rowi_ptr, kth_ptr, rows, rmask, B, TOPK)
    acc = tl.zeros((BLOCK_B, BLOCK_DO), tl.float32)
    t0, t1, self_end, ref_start = _split_bounds(t_self, t_all, tps)
    for t in range(t0, self_end):
        s, pos, neg, cinv, cols = _tile(x_ptr, xinv, rows, rmask, yq, x_ptr, xinv_ptr, y_ptr, t * BLOCK_N, n_self,
                                        0, m_ptr, m_w, D, True, BLOCK_B, BLOCK_N, BLOCK_D, DOT_F32, PRECISION,
                                        INTERPRET, HAS_MASK)
        g = _grad_tile(s, pos, neg, cols, cinv, min_p, max_n, mean, u_p, u_n, c_p, c_n, w_v, c_mu, k1, k2, arg_p,
                       arg_n, kth, pos_a, pos_b, neg_a, neg_b, margin, TOPK, CLASS_MEANS)
        c = _load_chunk(x_ptr, cols, cols < n_self, d0, D, BLOCK_DO, False)
        acc = _acc_dot(acc, g * cinv[None, :], c, DOT_F32, PRECISION)
    for t in range(ref_start, t1):
        s, pos, neg, cinv, cols = _tile(x_ptr, xinv, rows, rmask, yq, r_ptr, rinv_ptr, yr_ptr, (t - t_self) * BLOCK_N,
                                        M, n_self, m_ptr, m_w, D, False, BLOCK_B, BLOCK_N, BLOCK_D, DOT_F32,
                                        PRECISION, INTERPRET, HAS_MASK)
        g = _grad_tile(s, pos, neg, cols + n_self, cinv, min_p, max_n, mean, u_p, u_n, c_p, c_n, w_v, c_mu, k1, k2,
                       arg_p, arg_n, kth, pos_a, pos_b, neg_a, neg_b, margin, TOPK, CLASS_MEANS)
        c = _load_chunk(r_ptr, cols, cols < M, d0, D, BLOCK_DO, False)
        acc = _acc_dot(acc, g * cinv[None, :], c, DOT_F32, PRECISION)
    offs = d0 + tl.arange(0, BLOCK_DO)
    out = gpart_ptr + tl.program_id(1).to(tl.int64) * B * D + rows[:, None] * D + offs[None, :]
    tl.store(out, acc, mask=rmask[:, None] & (offs < D)[None, :])


@triton.jit
def _grad_ref_part(
    x_ptr, xinv_ptr, y_ptr, c_ptr, cinv_ptr, yc_ptr, m_ptr, m_w, rowf_ptr, rowi_ptr, kth_ptr, out_ptr,
    c0, n_c, col_base, d0, B, D, pos_a, pos_b, neg_a, neg_b, margin,
    IS_SELF: tl.constexpr, TOPK: tl.constexpr, CLASS_MEANS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr, HAS_MASK: tl.constexpr,
):
    acc = tl.zeros((BLOCK_N, BLOCK_DO), tl.float32)
    for q0 in range(0, B, BLOCK_B):
        rows = q0 + tl.arange(0, BLOCK_B).to(tl.int64)
        rmask = rows < B
        xinv = tl.load(xinv_ptr + rows, mask=rmask, other=0.0)
        yq = tl.load(y_ptr + rows, mask=rmask, other=0).to(tl.int64)
        min_p, max_n, mean, u_p, u_n, c_p, c_n, w_v, c_mu, k1, k2, arg_p, arg_n, kth = _row_scalars(
            rowf_ptr, rowi_ptr, kth_ptr, rows, rmask, B, TOPK)
        s, pos, neg, cinv, cols = _tile(x_ptr, xinv, rows, rmask, yq, c_ptr, cinv_ptr, yc_ptr, c0, n_c, col_base,
                                        m_ptr, m_w, D, IS_SELF, BLOCK_B, BLOCK_N, BLOCK_D, DOT_F32, PRECISION,
                                        INTERPRET, HAS_MASK)
        g = _grad_tile(s, pos, neg, cols + col_base, cinv, min_p, max_n, mean, u_p, u_n, c_p, c_n, w_v, c_mu, k1,
                       k2, arg_p, arg_n, kth, pos_a, pos_b, neg_a, neg_b, margin, TOPK, CLASS_MEANS)
        q = _load_chunk(x_ptr, rows, rmask, d0, D, BLOCK_DO, False)
        acc = _acc_dot(acc, tl.trans(g * xinv[:, None]), q, DOT_F32, PRECISION)
    cols = c0 + tl.arange(0, BLOCK_N).to(tl.int64)
    offs = d0 + tl.arange(0, BLOCK_DO)
    ptrs = out_ptr + cols[:, None] * D + offs[None, :]
    omask = (cols < n_c)[:, None] & (offs < D)[None, :]
    tl.store(ptrs, acc, mask=omask)


@triton.jit
def _cbml_grad_ref_kernel(
    x_ptr, xinv_ptr, y_ptr, r_ptr, rinv_ptr, yr_ptr, m_ptr, m_w, rowf_ptr, rowi_ptr, kth_ptr, gx_ptr, gr_ptr,
    B, M, D, n_self, self_tiles,
    pos_a, pos_b, neg_a, neg_b, margin,
    TOPK: tl.constexpr, CLASS_MEANS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr, HAS_MASK: tl.constexpr,
):
    """Reference role: programs [0, self_tiles) write Gᵀx̂ for the self part into gx_ptr (the last slice of
    x's partial gradients), the others write gr."""
    pid = tl.program_id(0)
    d0 = tl.program_id(1) * BLOCK_DO
    if pid < self_tiles:
        _grad_ref_part(x_ptr, xinv_ptr, y_ptr, x_ptr, xinv_ptr, y_ptr, m_ptr, m_w, rowf_ptr, rowi_ptr, kth_ptr, gx_ptr,
                       pid * BLOCK_N, n_self, 0, d0, B, D, pos_a, pos_b, neg_a, neg_b, margin,
                       True, TOPK, CLASS_MEANS, BLOCK_B, BLOCK_N, BLOCK_D, BLOCK_DO, DOT_F32, PRECISION, INTERPRET, HAS_MASK)
    else:
        _grad_ref_part(x_ptr, xinv_ptr, y_ptr, r_ptr, rinv_ptr, yr_ptr, m_ptr, m_w, rowf_ptr, rowi_ptr, kth_ptr, gr_ptr,
                       (pid - self_tiles) * BLOCK_N, M, n_self, d0, B, D, pos_a, pos_b, neg_a, neg_b,
                       margin, False, TOPK, CLASS_MEANS, BLOCK_B, BLOCK_N, BLOCK_D, BLOCK_DO, DOT_F32, PRECISION,
                       INTERPRET, HAS_MASK)


@triton.jit
def _load_sum(g_ptr, P, RD, rows, rmask, d0, D, BLOCK_D: tl.constexpr):
    """Σ_p g[p, rows, d0:d0+BLOCK_D] over the P partial slices, in order."""
    g = _load_chunk(g_ptr, rows, rmask, d0, D, BLOCK_D, True)
    for p in range(1, P):
        g += _load_chunk(g_ptr + tl.cast(p, tl.int64) * RD, rows, rmask, d0, D, BLOCK_D, True)
    return g


@triton.jit
def _norm_bwd_kernel(g_ptr, P, out_ptr, x_ptr, R, D, scale, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """out = scale · (g − x̂ (x̂·g)) / ‖x‖ (g · scale / eps where ‖x‖ ≤ eps), g = Σ of P slices (R, D)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    rmask = rows < R
    ss = tl.zeros((BLOCK_R,), tl.float32)
    gx = tl.zeros((BLOCK_R,), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        x = _load_chunk(x_ptr, rows, rmask, d0, D, BLOCK_D, True)
        g = _load_sum(g_ptr, P, tl.cast(R, tl.int64) * D, rows, rmask, d0, D, BLOCK_D)
        ss += tl.sum(x * x, 1)
        gx += tl.sum(g * x, 1)
    norm = tl.sqrt(ss)
    inv = 1.0 / tl.maximum(norm, EPS)
    proj = tl.where(norm > EPS, gx * inv * inv, 0.0)
    for d0 in range(0, D, BLOCK_D):
        offs = d0 + tl.arange(0, BLOCK_D)
        x = _load_chunk(x_ptr, rows, rmask, d0, D, BLOCK_D, True)
        g = _load_sum(g_ptr, P, tl.cast(R, tl.int64) * D, rows, rmask, d0, D, BLOCK_D)
        tl.store(out_ptr + rows[:, None] * D + offs[None, :], (g - x * proj[:, None]) * (inv * scale)[:, None],
                 mask=rmask[:, None] & (offs < D)[None, :])


@triton.jit
def _sum_kernel(v_ptr, out_ptr, n, scale, BLOCK: tl.constexpr):
    """out[()] = scale · Σ v (one program, fixed order)."""
    acc = tl.zeros((BLOCK,), tl.float32)
    for i0 in range(0, n, BLOCK):
        offs = i0 + tl.arange(0, BLOCK)
        acc += tl.load(v_ptr + offs, mask=offs < n, other=0.0)
    tl.store(out_ptr, tl.sum(acc, 0) * scale)


# --------------------------------------------------------------------------------------------------- launcher
def _log2(n: int) -> int:
    return n.bit_length() - 1


_TUNED: dict = {}


def _tuned_config(args: tuple, key: tuple) -> CbmlConfig:
    """Time the whole pipeline once per key with the heuristic and each candidate (the blocks of all stages must
    agree). Runs on the first call of a shape bucket: make that call outside CUDA-graph capture."""
    from triton.runtime.errors import OutOfResources
    from triton.testing import do_bench

    if key not in _TUNED:
        x, ref = args[0], args[2]
        best = None
        for cand in (cbml_config(x.shape[1], x.dtype, ref.dtype, _device.limits(x.device).capability),
                     *CBML_CANDIDATES):
            cand = fit_cbml(cand, x.shape[1])
            try:
                ms = do_bench(lambda: _run(*args, cfg=cand), warmup=5, rep=20)
            except OutOfResources:
                continue
            if best is None or ms < best[0]:
                best = (ms, cand)
        _TUNED[key] = best[1]
    return _TUNED[key]


def cbml_fwd(x, labels, ref, ref_labels, pair_mask, include_self, pos_a, pos_b, neg_a, neg_b, margin,
             variance_weight, mean_weight, phi, pos_weight, neg_weight, class_means, top_k, grad_x, grad_ref):
    """Launcher of ``fastcdml::cbml_fwd`` (schema and shapes: :mod:`fastcdml.ops.cbml`)."""
    args = (x, labels, ref, ref_labels, pair_mask, include_self, pos_a, pos_b, neg_a, neg_b, margin,
            variance_weight, mean_weight, phi, pos_weight, neg_weight, class_means, top_k, grad_x, grad_ref)
    if autotune() and not interpreter_active() and x.shape[0]:
        key = (x.device, pow2(x.shape[0]), pow2(ref.shape[0]), x.shape[1], x.dtype, ref.dtype, include_self,
               pow2(top_k) if top_k else 0, grad_x, grad_ref, pair_mask is not None)
        return _run(*args, cfg=_tuned_config(args, key))
    capability = 0 if interpreter_active() else _device.limits(x.device).capability
    return _run(*args, cfg=cbml_config(x.shape[1], x.dtype, ref.dtype, capability))


def _num_splits(dev: torch.device, row_blocks: int, tiles: int) -> int:
    """Splits of the reference set so that row blocks × splits fills the machine (≥ 2 tiles per split; at most
    16, which bounds the partial buffers: (SPLIT + 1)·B·D fp32 gradient slices, SPLIT·B·KP int64 top-K keys)."""
    if interpreter_active():
        return min(2, max(tiles, 1))  # exercises the split combine in CI
    return max(1, min(triton.cdiv(4 * _device.limits(dev).sms, row_blocks), tiles // 2, 16))


def _run(x, labels, ref, ref_labels, pair_mask, include_self, pos_a, pos_b, neg_a, neg_b, margin, variance_weight,
         mean_weight, phi, pos_weight, neg_weight, class_means, top_k, grad_x, grad_ref, *, cfg):
    B, D = x.shape
    M = ref.shape[0]
    dev, f32, i64 = x.device, torch.float32, torch.int64
    loss = new_output((), f32, dev)
    gx = new_output((B if grad_x else 0, D), f32, dev)
    gr = new_output((M if grad_ref else 0, D), f32, dev)
    if B == 0:
        return loss.zero_(), gx, gr.zero_()
    bb, bn = cfg.block_b, cfg.block_n
    n_self = B if include_self else 0
    n = n_self + M
    # 1 / the number of present references (a negative label marks an absent one), counted on the device
    present = (ref_labels >= 0).sum() + ((labels >= 0).sum() if include_self else 0)
    inv_n = (1.0 / present.clamp_min(1).to(f32)).reshape(1)
    t_self, t_ref = triton.cdiv(n_self, bn), triton.cdiv(M, bn)
    t_all = t_self + t_ref
    grid_b = triton.cdiv(B, bb)
    split = _num_splits(dev, grid_b, t_all)
    tps = triton.cdiv(max(t_all, 1), split)
    split = triton.cdiv(max(t_all, 1), tps)
    interp = interpreter_active()
    has_mask = pair_mask is not None
    dot_f32 = x.dtype == f32 or ref.dtype != x.dtype or (interp and x.dtype == torch.bfloat16)
    kind = cbml_products(x.dtype, ref.dtype)
    blocks = dict(BLOCK_B=bb, BLOCK_N=bn, BLOCK_D=cfg.block_d, DOT_F32=dot_f32, HAS_MASK=has_mask,
                  PRECISION=kind if dot_f32 and kind and not interp else "tf32", INTERPRET=interp)
    launch = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    mode = 0 if top_k == 0 else (2 if top_k >= n else 1)
    kp = max(pow2(top_k), bn) if mode == 1 else 1

    xinv = new_output((B,), f32, dev)
    rinv = new_output((M,), f32, dev)
    _inv_norm_kernel[(triton.cdiv(B, 64),)](x, xinv, B, D, BLOCK_R=64, BLOCK_D=64)
    if M:
        _inv_norm_kernel[(triton.cdiv(M, 64),)](ref, rinv, M, D, BLOCK_R=64, BLOCK_D=64)
    rowf = new_output((_N_ROWF, B), f32, dev)
    rowi = new_output((2, B), i64, dev)
    kth = new_output((B if mode == 1 else 1,), i64, dev)
    lrow = new_output((B,), f32, dev)
    pf = new_output((8, split, B), f32, dev)
    pi = new_output((4, split, B), i64, dev)
    pbuf = new_output((split, B, kp) if mode == 1 else (1,), i64, dev)
    mask = pair_mask if has_mask else xinv  # a placeholder pointer, never read without HAS_MASK
    inputs = (x, xinv, labels, ref, rinv, ref_labels, mask, pair_mask.shape[1] if has_mask else 0)
    hyper = (pos_a, pos_b, neg_a, neg_b, margin)
    tiling = (B, M, D, n_self, t_self, t_all, tps)
    _cbml_stats_kernel[(grid_b, split)](*inputs, pf, pi, pbuf, *tiling, split, TOPK=mode, LOG_N=_log2(bn),
                                        LOG_KP=_log2(kp), **blocks, **launch)
    _cbml_combine_kernel[(grid_b,)](pf, pi, pbuf, rowf, rowi, kth, B, split, inv_n, max(top_k, 1), mean_weight,
                                    TOPK=mode, LOG_KP=_log2(kp), BLOCK_B=bb, CLASS_MEANS=class_means)
    _cbml_sums_kernel[(grid_b, split)](*inputs, rowf, kth, pf, *tiling, split, *hyper, TOPK=mode, **blocks,
                                       **launch)
    _cbml_finalize_kernel[(grid_b,)](pf, rowf, lrow, B, split, pos_b, neg_b, variance_weight, pos_weight, neg_weight,
                                     PHI=phi, BLOCK_B=bb)
    _sum_kernel[(1,)](lrow, loss, B, 1.0 / B, BLOCK=1024)
    if not (grad_x or grad_ref):
        return loss, gx, gr
    grid_d = triton.cdiv(D, cfg.block_do)
    common = (rowf, rowi, kth)
    self_tiles = t_self if grad_x else 0
    ref_tiles = t_ref if grad_ref else 0
    gpart = new_output((split + (self_tiles > 0), B, D) if grad_x else (1, 1), f32, dev)
    if grad_x:
        _cbml_grad_query_kernel[(grid_b, split, grid_d)](
            *inputs, *common, gpart, *tiling, *hyper, TOPK=mode, CLASS_MEANS=class_means, BLOCK_DO=cfg.block_do,
            **blocks, **launch)
    if self_tiles + ref_tiles:
        _cbml_grad_ref_kernel[(self_tiles + ref_tiles, grid_d)](
            *inputs, *common, gpart[-1], gr, B, M, D, n_self, self_tiles, *hyper, TOPK=mode, CLASS_MEANS=class_means,
            BLOCK_DO=cfg.block_do, **blocks, **launch)
    for g, parts, src in ((gx, gpart, x), (gr, gr, ref)):
        if g.shape[0]:
            _norm_bwd_kernel[(triton.cdiv(g.shape[0], 32),)](parts, parts.shape[0] if parts is gpart else 1, g, src,
                                                            g.shape[0], D, 1.0 / B, BLOCK_R=32, BLOCK_D=64)
    return loss, gx, gr

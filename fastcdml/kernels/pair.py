"""Fused Triton kernels for the pair losses NTXent, SupCon, MultiSimilarity and Contrastive (math: ``docs/spec.md``
and :mod:`fastcdml.reference.pair`). No B×R matrix is ever stored; every stage recomputes ``S`` tile by tile.

``S_ij = (x_i · r_j) · inv‖x_i‖ · inv‖r_j‖`` with fp32 accumulation; the pair weights w⁺ / w⁻ of a tile come from
the labels, the row's excluded column and, for mined pairs, the (B, R) uint8 multiplicities. Stages:

1. ``_inv_norm_kernel`` (shared with CBML): ``1 / max(‖row‖, eps)`` for x and ref.
2. ``_pair_stats_kernel``: one program per block of BLOCK_B rows sweeps all reference tiles and reduces the row's
   statistics (``_N_ROWF`` fp32 values per row): n⁺, n⁻, two online log-sum-exps (NTXent: negatives of S/τ;
   SupCon: P ∪ N of S/τ; MultiSimilarity: ``1 + Σ_P e^{α(base − S)}`` and ``1 + Σ_N e^{β(S − base)}``),
   Σ_P S/τ and |P| (SupCon), the hinge sums and non-zero counts (Contrastive); NTXent sweeps a second time, with
   the row's NLSE known, for Σ_P w softplus(NLSE − u) and Σ_P w σ(NLSE − u).
3. The loss and the per-row gradient coefficients from the row statistics: a few (B,) tensor operations in the
   launcher (no host synchronisation).
4. ``_pair_grad_kernel``: ``∂L/∂x̂ = G R̂`` per (row block, D chunk), G = ∂L/∂S recomputed per tile; with
   ``TO_REF``, ``∂L/∂R̂ = Gᵀ x̂`` per (reference block, D chunk), looping over the row blocks in order (no
   atomics).
5. ``_norm_bwd_kernel`` (shared with CBML): the row-normalisation backward.

With 16-bit inputs of one dtype ``tl.dot`` runs in that dtype (G is split into hi + lo 16-bit parts for the
backward products); fp32 or mixed inputs use fp32 operands at ``torch.get_float32_matmul_precision()``'s
precision (``_tuning.cbml_products``); the blocks are CBML's (``_tuning.cbml_config``). Row offsets into the (B, R) multiplicities are int64. Under the interpreter S is a broadcast sum and
bf16 operands are upcast (the interpreter's bf16 ``tl.dot`` is wrong).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._runtime import interpreter_active, new_output
from . import _device
from ._tuning import CbmlConfig, cbml_config, cbml_products
from .cbml import _acc_dot, _dot_chunks, _inv_norm_kernel, _load_chunk, _norm_bwd_kernel

# ----------------------------------------------------------------------------------------------- tuning
# The blocks and products of the CBML kernels (``_tuning.cbml_config``): the same tile code, the same register
# budget (64 query rows, 32 for tf32x3 products before Hopper).


def _config(D: int, x_dtype: torch.dtype, ref_dtype: torch.dtype, device: torch.device) -> CbmlConfig:
    capability = 90 if interpreter_active() else _device.limits(device).capability
    return cbml_config(D, x_dtype, ref_dtype, capability)


NTXENT, SUPCON, MULTI_SIMILARITY, CONTRASTIVE = 0, 1, 2, 3
# row statistics: n⁺, n⁻, lse_a, lse_b, Σ_P u, |P|, hinge⁺, count⁺, hinge⁻, count⁻, Σ softplus, Σ σ
_N_ROWF = 12
NEG_INF = tl.constexpr(float("-inf"))


# ----------------------------------------------------------------------------------------------- helpers
@triton.jit
def _tile(x_ptr, xinv, rows, rmask, yq, ex, r_ptr, rinv_ptr, yr_ptr, cnt_ptr, c0, R, D, SETS: tl.constexpr,
          HAS_COUNTS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_F32: tl.constexpr,
          PRECISION: tl.constexpr, INTERPRET: tl.constexpr):
    """S tile (BLOCK_B, BLOCK_N) of the rows against references c0.., the raw weights (w⁺, w⁻), the weights the
    kind uses (sets: at most 1), the references' inverse norms and their indices."""
    cols = c0 + tl.arange(0, BLOCK_N).to(tl.int64)
    cmask = cols < R
    yc = tl.load(yr_ptr + cols, mask=cmask, other=0).to(tl.int64)
    cinv = tl.load(rinv_ptr + cols, mask=cmask, other=0.0)
    acc = _dot_chunks(x_ptr, rows, rmask, r_ptr, cols, cmask, D, BLOCK_B, BLOCK_N, BLOCK_D, DOT_F32, PRECISION,
                      INTERPRET)
    s = acc * xinv[:, None] * cinv[None, :]
    valid = rmask[:, None] & cmask[None, :]
    if HAS_COUNTS:
        w = tl.load(cnt_ptr + rows[:, None] * R + cols[None, :], mask=valid, other=0).to(tl.float32)
    else:
        w = tl.where(valid, 1.0, 0.0)
    same = yq[:, None] == yc[None, :]
    wp = tl.where(same & (cols[None, :] != ex[:, None]), w, 0.0)
    wn = tl.where(same, 0.0, w)
    if SETS:
        up, un = tl.minimum(wp, 1.0), tl.minimum(wn, 1.0)
    else:
        up, un = wp, wn
    return s, wp, wn, up, un, cinv, cols


@triton.jit
def _lse_add(m, l, t, w):
    """Online log-sum-exp (m, l) of the elements t with weight w > 0 (each counted w times), per row."""
    t = tl.where(w > 0, t, NEG_INF)
    m_new = tl.maximum(m, tl.max(t, 1))
    m_safe = tl.where(m_new == NEG_INF, 0.0, m_new)
    l = l * tl.exp(m - m_safe) + tl.sum(w * tl.exp(t - m_safe[:, None]), 1)
    return m_new, l


@triton.jit
def _lse(m, l):
    return tl.where(l > 0, m + tl.log(tl.where(l > 0, l, 1.0)), NEG_INF)


@triton.jit
def _distance(s):
    return tl.sqrt(tl.maximum(2.0 - 2.0 * s, 0.0))


@triton.jit
def _grad_tile(s, up, un, KIND: tl.constexpr, p0, p1, p2, lse_a, lse_b, sig, c_a, c_b, inv_npos):
    """G = ∂L/∂S on a tile from the rows' statistics (lse_a, lse_b, sig) and coefficients (c_a, c_b, inv_npos)."""
    if KIND == 0:
        u = s / p0
        g = tl.where(up > 0, -up / (1.0 + tl.exp(u - lse_a[:, None])),
                     tl.where(un > 0, un * sig[:, None] * tl.exp(u - lse_a[:, None]), 0.0))
        g = g * (c_a / p0)[:, None]
    elif KIND == 1:
        u = s / p0
        g = tl.where(up + un > 0, tl.exp(u - lse_a[:, None]), 0.0) - up * inv_npos[:, None]
        g = g * (c_a / p0)[:, None]
    elif KIND == 2:
        g = tl.where(up > 0, -tl.exp(p0 * (p2 - s) - lse_a[:, None]),
                     tl.where(un > 0, tl.exp(p1 * (s - p2) - lse_b[:, None]), 0.0))
        g = g * c_a[:, None]
    else:
        d = _distance(s)
        inv = tl.where(d > 0, 1.0 / tl.where(d > 0, d, 1.0), 0.0)
        g = (tl.where(d < p1, un * c_b[:, None], 0.0) - tl.where(d > p0, up * c_a[:, None], 0.0)) * inv
    return g


@triton.jit
def _row_inputs(xinv_ptr, y_ptr, ex_ptr, rows, rmask, HAS_EXCLUDE: tl.constexpr):
    xinv = tl.load(xinv_ptr + rows, mask=rmask, other=0.0)
    yq = tl.load(y_ptr + rows, mask=rmask, other=0).to(tl.int64)
    if HAS_EXCLUDE:
        ex = tl.load(ex_ptr + rows, mask=rmask, other=-1).to(tl.int64)
    else:
        ex = tl.full(rows.shape, -1, tl.int64)
    return xinv, yq, ex


@triton.jit
def _row_coefs(rowf_ptr, rowc_ptr, rows, rmask, B):
    lse_a = tl.load(rowf_ptr + 2 * B + rows, mask=rmask, other=0.0)
    lse_b = tl.load(rowf_ptr + 3 * B + rows, mask=rmask, other=0.0)
    sig = tl.load(rowf_ptr + 11 * B + rows, mask=rmask, other=0.0)
    c_a = tl.load(rowc_ptr + rows, mask=rmask, other=0.0)
    c_b = tl.load(rowc_ptr + B + rows, mask=rmask, other=0.0)
    inv_npos = tl.load(rowc_ptr + 2 * B + rows, mask=rmask, other=0.0)
    return lse_a, lse_b, sig, c_a, c_b, inv_npos


# ----------------------------------------------------------------------------------------------- kernels
@triton.jit
def _pair_stats_kernel(
    x_ptr, xinv_ptr, y_ptr, ex_ptr, r_ptr, rinv_ptr, yr_ptr, cnt_ptr, rowf_ptr, B, R, D, p0, p1, p2,
    KIND: tl.constexpr, HAS_EXCLUDE: tl.constexpr, HAS_COUNTS: tl.constexpr, BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """The ``_N_ROWF`` statistics of BLOCK_B rows over every reference (layout: ``rowf[k, row]``)."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
    rmask = rows < B
    xinv, yq, ex = _row_inputs(xinv_ptr, y_ptr, ex_ptr, rows, rmask, HAS_EXCLUDE)
    SETS: tl.constexpr = KIND == 1 or KIND == 2
    zero = tl.zeros((BLOCK_B,), tl.float32)
    n_pos, n_neg, pos_u, n_set, h_pos, c_pos, h_neg, c_neg = zero, zero, zero, zero, zero, zero, zero, zero
    if KIND == 2:  # the "1 +" terms
        m_a, l_a, m_b, l_b = zero, zero + 1.0, zero, zero + 1.0
    else:
        m_a, l_a, m_b, l_b = zero + NEG_INF, zero, zero + NEG_INF, zero
    for c0 in range(0, R, BLOCK_N):
        s, wp, wn, up, un, cinv, cols = _tile(x_ptr, xinv, rows, rmask, yq, ex, r_ptr, rinv_ptr, yr_ptr, cnt_ptr,
                                              c0, R, D, SETS, HAS_COUNTS, BLOCK_B, BLOCK_N, BLOCK_D, DOT_F32, PRECISION,
                                              INTERPRET)
        n_pos += tl.sum(wp, 1)
        n_neg += tl.sum(wn, 1)
        if KIND == 0:
            m_a, l_a = _lse_add(m_a, l_a, s / p0, un)
        elif KIND == 1:
            m_a, l_a = _lse_add(m_a, l_a, s / p0, up + un)
            pos_u += tl.sum(up * (s / p0), 1)
            n_set += tl.sum(up, 1)
        elif KIND == 2:
            m_a, l_a = _lse_add(m_a, l_a, p0 * (p2 - s), up)
            m_b, l_b = _lse_add(m_b, l_b, p1 * (s - p2), un)
        else:
            d = _distance(s)
            hp = tl.maximum(d - p0, 0.0)
            hn = tl.maximum(p1 - d, 0.0)
            h_pos += tl.sum(up * hp, 1)
            c_pos += tl.sum(tl.where(hp > 0, up, 0.0), 1)
            h_neg += tl.sum(un * hn, 1)
            c_neg += tl.sum(tl.where(hn > 0, un, 0.0), 1)
    lse_a = _lse(m_a, l_a)
    sp, sig = zero, zero
    if KIND == 0:  # second sweep, with the row's NLSE
        for c0 in range(0, R, BLOCK_N):
            s, wp, wn, up, un, cinv, cols = _tile(x_ptr, xinv, rows, rmask, yq, ex, r_ptr, rinv_ptr, yr_ptr,
                                                  cnt_ptr, c0, R, D, SETS, HAS_COUNTS, BLOCK_B, BLOCK_N, BLOCK_D, DOT_F32,
                                                  PRECISION, INTERPRET)
            z = lse_a[:, None] - s / p0  # −inf without negatives
            softplus = tl.maximum(z, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(z)))
            sp += tl.sum(tl.where(up > 0, up * softplus, 0.0), 1)
            sig += tl.sum(tl.where(up > 0, up / (1.0 + tl.exp(-z)), 0.0), 1)
    out = rowf_ptr + rows
    tl.store(out + 0 * B, n_pos, mask=rmask)
    tl.store(out + 1 * B, n_neg, mask=rmask)
    tl.store(out + 2 * B, lse_a, mask=rmask)
    tl.store(out + 3 * B, _lse(m_b, l_b), mask=rmask)
    tl.store(out + 4 * B, pos_u, mask=rmask)
    tl.store(out + 5 * B, n_set, mask=rmask)
    tl.store(out + 6 * B, h_pos, mask=rmask)
    tl.store(out + 7 * B, c_pos, mask=rmask)
    tl.store(out + 8 * B, h_neg, mask=rmask)
    tl.store(out + 9 * B, c_neg, mask=rmask)
    tl.store(out + 10 * B, sp, mask=rmask)
    tl.store(out + 11 * B, sig, mask=rmask)


@triton.jit
def _grad_tile_at(x_ptr, xinv_ptr, y_ptr, ex_ptr, r_ptr, rinv_ptr, yr_ptr, cnt_ptr, rowf_ptr, rowc_ptr, rows, c0, B,
                  R, D, p0, p1, p2, KIND: tl.constexpr, HAS_EXCLUDE: tl.constexpr, HAS_COUNTS: tl.constexpr,
                  BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_F32: tl.constexpr,
                  PRECISION: tl.constexpr, INTERPRET: tl.constexpr):
    """``(G, inv‖x‖, inv‖r‖, cols)`` of the tile (rows, references c0..): G = ∂L/∂S from the rows' statistics."""
    rmask = rows < B
    xinv, yq, ex = _row_inputs(xinv_ptr, y_ptr, ex_ptr, rows, rmask, HAS_EXCLUDE)
    lse_a, lse_b, sig, c_a, c_b, inv_npos = _row_coefs(rowf_ptr, rowc_ptr, rows, rmask, B)
    SETS: tl.constexpr = KIND == 1 or KIND == 2
    s, wp, wn, up, un, cinv, cols = _tile(x_ptr, xinv, rows, rmask, yq, ex, r_ptr, rinv_ptr, yr_ptr, cnt_ptr, c0, R,
                                          D, SETS, HAS_COUNTS, BLOCK_B, BLOCK_N, BLOCK_D, DOT_F32, PRECISION,
                                          INTERPRET)
    return _grad_tile(s, up, un, KIND, p0, p1, p2, lse_a, lse_b, sig, c_a, c_b, inv_npos), xinv, cinv, cols


@triton.jit
def _pair_grad_kernel(
    x_ptr, xinv_ptr, y_ptr, ex_ptr, r_ptr, rinv_ptr, yr_ptr, cnt_ptr, rowf_ptr, rowc_ptr, g_ptr, B, R, D,
    p0, p1, p2, KIND: tl.constexpr, HAS_EXCLUDE: tl.constexpr, HAS_COUNTS: tl.constexpr, BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr, DOT_F32: tl.constexpr,
    PRECISION: tl.constexpr, INTERPRET: tl.constexpr, TO_REF: tl.constexpr,
):
    """Grid (row or reference blocks, D chunks). ``TO_REF`` False: g[rows, d-chunk] = Σ_j G_ij R̂_j (∂L/∂x̂ before
    the normalisation backward), sweeping the reference blocks; True: g[cols, d-chunk] = Σ_i G_ij x̂_i (∂L/∂r̂),
    sweeping the row blocks in order (no atomics)."""
    d0 = tl.program_id(1) * BLOCK_DO
    if TO_REF:
        c0 = tl.program_id(0) * BLOCK_N
        acc = tl.zeros((BLOCK_N, BLOCK_DO), tl.float32)
        for q0 in range(0, B, BLOCK_B):
            rows = q0 + tl.arange(0, BLOCK_B).to(tl.int64)
            g, xinv, cinv, cols = _grad_tile_at(x_ptr, xinv_ptr, y_ptr, ex_ptr, r_ptr, rinv_ptr, yr_ptr, cnt_ptr,
                                                rowf_ptr, rowc_ptr, rows, c0, B, R, D, p0, p1, p2, KIND, HAS_EXCLUDE,
                                                HAS_COUNTS, BLOCK_B, BLOCK_N, BLOCK_D, DOT_F32, PRECISION, INTERPRET)
            q = _load_chunk(x_ptr, rows, rows < B, d0, D, BLOCK_DO, False)
            acc = _acc_dot(acc, tl.trans(g * xinv[:, None]), q, DOT_F32, PRECISION)
        out, n_out = c0 + tl.arange(0, BLOCK_N).to(tl.int64), R
    else:
        rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
        acc = tl.zeros((BLOCK_B, BLOCK_DO), tl.float32)
        for c0 in range(0, R, BLOCK_N):
            g, xinv, cinv, cols = _grad_tile_at(x_ptr, xinv_ptr, y_ptr, ex_ptr, r_ptr, rinv_ptr, yr_ptr, cnt_ptr,
                                                rowf_ptr, rowc_ptr, rows, c0, B, R, D, p0, p1, p2, KIND, HAS_EXCLUDE,
                                                HAS_COUNTS, BLOCK_B, BLOCK_N, BLOCK_D, DOT_F32, PRECISION, INTERPRET)
            c = _load_chunk(r_ptr, cols, cols < R, d0, D, BLOCK_DO, False)
            acc = _acc_dot(acc, g * cinv[None, :], c, DOT_F32, PRECISION)
        out, n_out = rows, B
    offs = d0 + tl.arange(0, BLOCK_DO)
    tl.store(g_ptr + out[:, None] * D + offs[None, :], acc, mask=(out < n_out)[:, None] & (offs < D)[None, :])


# ----------------------------------------------------------------------------------------------- launcher
def combine(rowf: torch.Tensor, kind: int, p0: float, p1: float):
    """(loss () fp32, rowc (3, B) fp32): the loss and the rows' gradient coefficients (c_a, c_b, 1/|P|) from the
    row statistics ``rowf`` (``_N_ROWF``, B), with PML's reductions and zero cases, as tensor operations."""
    n_pos, n_neg, lse_a, lse_b, pos_u, n_set, h_pos, c_pos, h_neg, c_neg, sp, _ = rowf
    tot_pos, tot_neg = n_pos.sum(), n_neg.sum()
    live = (tot_pos > 1) | (tot_neg > 1)
    zeros = torch.zeros_like(n_pos)
    inv_npos = torch.where(n_set > 0, 1.0 / n_set.clamp_min(1.0), 0.0)
    if kind == NTXENT:
        live = live & (tot_pos > 0) & (tot_neg > 0)
        scale = torch.where(live, 1.0 / tot_pos.clamp_min(1.0), 0.0)
        loss, c_a, c_b = sp.sum() * scale, zeros + scale, zeros
    elif kind == SUPCON:
        live = live & (tot_pos > 0) & (tot_neg > 0)
        rows = torch.where(n_set > 0, lse_a - pos_u * inv_npos, 0.0)
        active = live & (rows > 0)
        count = active.sum()
        scale = torch.where(count > 0, 1.0 / count.clamp_min(1).float(), 0.0)
        loss, c_a, c_b = (rows * active).sum() * scale, active.float() * scale, zeros
    elif kind == MULTI_SIMILARITY:
        scale = torch.where(live, 1.0 / n_pos.shape[0], 0.0)
        loss, c_a, c_b = (lse_a / p0 + lse_b / p1).sum() * scale, zeros + scale, zeros
    else:
        cp, cn = c_pos.sum(), c_neg.sum()
        sp_ = torch.where(live & (cp > 0), 1.0 / cp.clamp_min(1.0), 0.0)
        sn_ = torch.where(live & (cn > 0), 1.0 / cn.clamp_min(1.0), 0.0)
        loss, c_a, c_b = h_pos.sum() * sp_ + h_neg.sum() * sn_, zeros + sp_, zeros + sn_
    return loss.to(torch.float32), torch.stack([c_a, c_b, inv_npos])


def pair_fwd(x, labels, ref, ref_labels, exclude, counts, kind, p0, p1, p2, grad_x, grad_ref):
    """Launcher of ``fastcdml::pair_fwd`` (schema and shapes: :mod:`fastcdml.ops.pair`)."""
    B, D = x.shape
    R = ref.shape[0]
    dev, f32 = x.device, torch.float32
    gx = new_output((B if grad_x else 0, D), f32, dev)
    gr = new_output((R if grad_ref else 0, D), f32, dev)
    if B == 0 or R == 0:
        return torch.zeros((), dtype=f32, device=dev), gx.zero_(), gr.zero_()
    interp = interpreter_active()
    dot_f32 = x.dtype == f32 or ref.dtype != x.dtype or (interp and x.dtype == torch.bfloat16)
    cfg = _config(D, x.dtype, ref.dtype, dev)
    bb, bn = cfg.block_b, cfg.block_n
    products = cbml_products(x.dtype, ref.dtype)
    blocks = dict(KIND=kind, HAS_EXCLUDE=exclude is not None, HAS_COUNTS=counts is not None, BLOCK_B=bb,
                  BLOCK_N=bn, BLOCK_D=cfg.block_d, DOT_F32=dot_f32, INTERPRET=interp,
                  PRECISION=products if dot_f32 and products and not interp else "tf32")
    launch = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    xinv, rinv = new_output((B,), f32, dev), new_output((R,), f32, dev)
    _inv_norm_kernel[(triton.cdiv(B, 64),)](x, xinv, B, D, BLOCK_R=64, BLOCK_D=64)
    _inv_norm_kernel[(triton.cdiv(R, 64),)](ref, rinv, R, D, BLOCK_R=64, BLOCK_D=64)
    rowf = new_output((_N_ROWF, B), f32, dev)
    inputs = (x, xinv, labels, exclude if exclude is not None else xinv, ref, rinv, ref_labels,
              counts if counts is not None else xinv)  # placeholders are never read
    _pair_stats_kernel[(triton.cdiv(B, bb),)](*inputs, rowf, B, R, D, p0, p1, p2, **blocks, **launch)
    loss, rowc = combine(rowf, kind, p0, p1)
    grid_d = triton.cdiv(D, cfg.block_do)
    for want, grid, to_ref, out, src in ((grad_x, triton.cdiv(B, bb), False, gx, x),
                                         (grad_ref, triton.cdiv(R, bn), True, gr, ref)):
        if not want:
            continue
        part = new_output(out.shape, f32, dev)
        _pair_grad_kernel[(grid, grid_d)](*inputs, rowf, rowc, part, B, R, D, p0, p1, p2, BLOCK_DO=cfg.block_do,
                                          TO_REF=to_ref, **blocks, **launch)
        _norm_bwd_kernel[(triton.cdiv(out.shape[0], 32),)](part, 1, out, src, out.shape[0], D, 1.0, BLOCK_R=32,
                                                           BLOCK_D=64)
    return loss, gx, gr

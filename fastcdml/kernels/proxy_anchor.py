"""Proxy Anchor loss in Triton: per-column (per-proxy) reductions over the batch, with both gradients, in the forward.

Launcher (the Triton implementation of ``fastcdml::proxy_anchor_fwd``; schema in ``fastcdml/ops/proxy_anchor.py``,
math in ``fastcdml/reference/proxy_anchor.py`` and ``docs/spec.md``)::

    proxy_anchor_fwd(x, labels, proxies, weights, pos_scale, neg_scale, δ, α, grad_x, grad_proxies)
        -> (loss () fp32, grad_x (B, D)|(0, D) fp32, grad_proxies (C, D)|(0, D) fp32)

**The pattern.** The softmax losses reduce each *row* over the classes (``fastcdml.kernels.ccl``: a program owns
queries and streams the bank). Proxy Anchor reduces each *column* over the batch: ``log(1 + Σ_i e^{z_ij})`` per
proxy j, once over the row's own class (positives) and once over the others (negatives). So the columns kernel
(``_pa_cols_kernel``) transposes the roles: a program owns ``BLOCK_C`` proxies, normalises them once (fp32) and
streams all B rows in ``BLOCK_B``-row tiles, ``s = x̂ p̂ᵀ`` by ``tl.dot``, keeping per column a running max ``m``
and sum ``l = Σ 2^{z − m}`` (base-2 units) for the positive exponents ``α(δ − s) + w − 1`` and for the negative
ones ``α(s + δ) + w − 1``, started at ``m = 0, l = 1``: the "1 +" of the log is the initial state, so
``log(1 + Σ) = (m + log₂ l)·ln 2`` comes out with no special case (a column without positives gives 0, PML's
masked value). Each column is finished inside its program: no partials, no merge across programs. The per-column
terms are written out (C floats each) and summed on the device into the loss (no host synchronisation; the
divisor ``1/|C⁺|`` arrives as a device tensor).

**Gradients.** ``G_ij = ∂L/∂c_ij`` is ``−α e^{z⁺_ij − T⁺_j}/|C⁺|`` at a row's own class and ``α e^{z⁻_ij − T⁻_j}/C``
elsewhere, with ``T_j`` the column terms: it needs the whole column first, so the proxies' gradient is a second
loop of the same program over the rows (recompute ``s``, form ``G``, ``acc += Gᵀ x̂`` by ``tl.dot``, then the
normalisation's backward), and the rows' gradient ``Σ_j G_ij p̂_j`` is a second kernel (``_pa_rows_kernel``) that
owns ``BLOCK_B`` rows and streams the proxies, reading the saved ``T⁺, T⁻``. Every output element is written by
exactly one program: no atomics, deterministic. Cost: 5 B×C×D products with both gradients (1 without), memory
O(C + B·D) beyond the outputs, never B×C.

**Precision.** Exponents reach ``α(1 + δ)`` (≈ 35 at PML's defaults) and their sums ``B·e^{35}``: everything
but the ``tl.dot`` operands is fp32 (norms, exponents, sums, logs), and the running max keeps any α finite.
``tl.dot`` operands follow the precision policy of ``fastcdml.kernels._tuning`` (``operand_dtype``: 16-bit when an input is 16-bit, fp32
products as ``torch.get_float32_matmul_precision()`` asks; exact fp32 and bf16 upcast under the interpreter).

**Configs.** ``_tuning.PROXY_ANCHOR_CONFIGS`` maps (padded D, operand bytes) to one ``Config(rows, cols, 1,
num_warps, num_stages)`` per kernel, ``rows`` the proxies (columns kernel) or batch rows (rows kernel) a program owns and
keeps in registers with its fp32 accumulator of ``rows × D``, ``cols`` the tile streamed per step. A launch
that does not fit the GPU retries with fewer stages, then fewer streamed rows, then fewer owned rows
(``_tuning.shrink`` without the D split), remembering nothing; the compile gates fail on a table entry that needs it.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .._runtime import interpreter_active, new_output
from ._tuning import Config, proxy_anchor_config, shrink
from .ccl import _dot_types, _launch, _load_rows, _smem, _unit_rows, block_d

INTERPRET = interpreter_active()
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


_shrink = functools.partial(shrink, split_d=False)  # the kernels have no accumulator D split


@triton.jit
def _coefficients(s, lab, cols, live, off, tp2, tn2, alpha, margin, g_pos, g_neg):
    """``G = ∂L/∂c`` of a (rows, cols) similarity tile from the column terms ``tp2, tn2`` (base 2); 0 where not
    ``live``. ``g_pos = −α/|C⁺|``, ``g_neg = α/C``."""
    is_pos = lab[:, None] == cols[None, :]
    zp = (alpha * (margin - s) + off[:, None]) * 1.4426950408889634
    zn = (alpha * (s + margin) + off[:, None]) * 1.4426950408889634
    g = tl.where(is_pos, g_pos * tl.exp2(zp - tp2[None, :]), g_neg * tl.exp2(zn - tn2[None, :]))
    return tl.where(live, g, 0.0)


@triton.jit
def _row_tile(x_tile, labels_ptr, w_ptr, rows, rmask, dk, dmask, pq, BLOCK_B: tl.constexpr, HAS_W: tl.constexpr,
              DOT: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr):
    """(x̂ as the dot operand, s = x̂ p̂ᵀ, labels, miner offsets w − 1) of one tile of rows in the columns kernel."""
    _, _, xq = _unit_rows(x_tile + dk[None, :], rmask[:, None] & dmask[None, :], DOT, UPCAST)
    s = tl.dot(xq, tl.trans(pq), input_precision=PREC)
    lab = tl.load(labels_ptr + rows, mask=rmask, other=-1).to(tl.int32)
    if HAS_W:
        off = tl.load(w_ptr + rows, mask=rmask, other=1.0) - 1.0
    else:
        off = tl.zeros([BLOCK_B], tl.float32)
    return xq, s, lab, off


@triton.jit
def _program_rows(ptr, n, D, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, DOT: tl.constexpr, UPCAST: tl.constexpr):
    """This program's block of BLOCK rows of the (n, D) tensor at ``ptr``: ``(indices, mask, dk, dmask, norms, unit
    rows as the dot operand)`` (``_unit_rows``). Only the operand and the norms live through the kernels' loops
    (registers); the rows are reloaded for the normalisation backward."""
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n
    dk = tl.arange(0, BLOCK_D)
    dmask = dk < D
    _, norm, q = _unit_rows(ptr + idx.to(tl.int64)[:, None] * D + dk[None, :], mask[:, None] & dmask[None, :], DOT,
                            UPCAST)
    return idx, mask, dk, dmask, norm, q


@triton.jit
def _pa_cols_kernel(x_ptr, labels_ptr, w_ptr, p_ptr, scale_ptr, tp_ptr, tn_ptr, gp_ptr, B, C, D, neg_scale, alpha,
                    margin, BLOCK_C: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, HAS_W: tl.constexpr,
                    GRAD_P: tl.constexpr, DOT: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr):
    """Grid (cdiv(C, BLOCK_C),). Column terms ``T⁺_j, T⁻_j`` (natural log) of this program's proxies over all rows;
    with GRAD_P a second loop over the rows gives ∂L/∂p_j."""
    cols, cmask, dk, dmask, pnorm, pq = _program_rows(p_ptr, C, D, BLOCK_C, BLOCK_D, DOT, UPCAST)
    mp = tl.zeros([BLOCK_C], tl.float32)  # m = 0, l = 1: the "1 +" inside the log
    lp = tl.full([BLOCK_C], 1.0, tl.float32)
    mn = tl.zeros([BLOCK_C], tl.float32)
    ln = tl.full([BLOCK_C], 1.0, tl.float32)
    x_tile = x_ptr + tl.arange(0, BLOCK_B)[:, None] * D  # advanced per step: int32 offsets
    for b0 in range(0, B, BLOCK_B):
        rows = b0 + tl.arange(0, BLOCK_B)
        rmask = rows < B
        _, s, lab, off = _row_tile(x_tile, labels_ptr, w_ptr, rows, rmask, dk, dmask, pq, BLOCK_B, HAS_W, DOT, UPCAST,
                                   PREC)
        live = rmask[:, None] & cmask[None, :]
        is_pos = lab[:, None] == cols[None, :]
        zp = tl.where(is_pos & live, (alpha * (margin - s) + off[:, None]) * 1.4426950408889634, float("-inf"))
        zn = tl.where(~is_pos & live, (alpha * (s + margin) + off[:, None]) * 1.4426950408889634, float("-inf"))
        mp_new = tl.maximum(mp, tl.max(zp, axis=0))
        lp = lp * tl.exp2(mp - mp_new) + tl.sum(tl.exp2(zp - mp_new[None, :]), axis=0)
        mp = mp_new
        mn_new = tl.maximum(mn, tl.max(zn, axis=0))
        ln = ln * tl.exp2(mn - mn_new) + tl.sum(tl.exp2(zn - mn_new[None, :]), axis=0)
        mn = mn_new
        x_tile += BLOCK_B * D
    tp2 = mp + tl.log2(lp)
    tn2 = mn + tl.log2(ln)
    tl.store(tp_ptr + cols, tp2 * 0.6931471805599453, mask=cmask)
    tl.store(tn_ptr + cols, tn2 * 0.6931471805599453, mask=cmask)
    if GRAD_P:
        g_pos = -alpha * tl.load(scale_ptr)
        g_neg = alpha * neg_scale
        acc = tl.zeros([BLOCK_C, BLOCK_D], tl.float32)
        x_tile = x_ptr + tl.arange(0, BLOCK_B)[:, None] * D
        for b0 in range(0, B, BLOCK_B):
            rows = b0 + tl.arange(0, BLOCK_B)
            rmask = rows < B
            xq, s, lab, off = _row_tile(x_tile, labels_ptr, w_ptr, rows, rmask, dk, dmask, pq, BLOCK_B, HAS_W, DOT,
                                        UPCAST, PREC)
            g = _coefficients(s, lab, cols, rmask[:, None] & cmask[None, :], off, tp2, tn2, alpha, margin, g_pos,
                              g_neg).to(DOT)
            if UPCAST:
                g = g.to(tl.float32)
            acc += tl.dot(tl.trans(g), xq, input_precision=PREC)
            x_tile += BLOCK_B * D
        ph = _load_rows(p_ptr, cols, cmask, dk, dmask, D) / pnorm[:, None]
        grad = (acc - ph * tl.sum(ph * acc, axis=1)[:, None]) / pnorm[:, None]
        offs = cols.to(tl.int64)[:, None] * D + dk[None, :]
        tl.store(gp_ptr + offs, grad, mask=cmask[:, None] & dmask[None, :])


@triton.jit
def _pa_rows_kernel(x_ptr, labels_ptr, w_ptr, p_ptr, scale_ptr, tp_ptr, tn_ptr, gx_ptr, B, C, D, neg_scale, alpha,
                    margin, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, HAS_W: tl.constexpr,
                    DOT: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr):
    """Grid (cdiv(B, BLOCK_B),). ∂L/∂x_i = normalisation backward of Σ_j G_ij p̂_j, streaming all proxies."""
    rows, rmask, dk, dmask, xnorm, xq = _program_rows(x_ptr, B, D, BLOCK_B, BLOCK_D, DOT, UPCAST)
    lab = tl.load(labels_ptr + rows, mask=rmask, other=-1).to(tl.int32)
    if HAS_W:
        off = tl.load(w_ptr + rows, mask=rmask, other=1.0) - 1.0
    else:
        off = tl.zeros([BLOCK_B], tl.float32)
    g_pos = -alpha * tl.load(scale_ptr)
    g_neg = alpha * neg_scale
    acc = tl.zeros([BLOCK_B, BLOCK_D], tl.float32)
    p_tile = p_ptr + tl.arange(0, BLOCK_C)[:, None] * D  # advanced per step: int32 offsets
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        cmask = cols < C
        _, _, pq = _unit_rows(p_tile + dk[None, :], cmask[:, None] & dmask[None, :], DOT, UPCAST)
        s = tl.dot(xq, tl.trans(pq), input_precision=PREC)
        tp2 = tl.load(tp_ptr + cols, mask=cmask, other=0.0) * 1.4426950408889634
        tn2 = tl.load(tn_ptr + cols, mask=cmask, other=0.0) * 1.4426950408889634
        g = _coefficients(s, lab, cols, rmask[:, None] & cmask[None, :], off, tp2, tn2, alpha, margin, g_pos,
                          g_neg).to(DOT)
        if UPCAST:
            g = g.to(tl.float32)
        acc += tl.dot(g, pq, input_precision=PREC)
        p_tile += BLOCK_C * D
    xh = _load_rows(x_ptr, rows, rmask, dk, dmask, D) / xnorm[:, None]
    grad = (acc - xh * tl.sum(xh * acc, axis=1)[:, None]) / xnorm[:, None]
    offs = rows.to(tl.int64)[:, None] * D + dk[None, :]
    tl.store(gx_ptr + offs, grad, mask=rmask[:, None] & dmask[None, :])


def proxy_anchor_fwd(x, labels, proxies, weights, pos_scale, neg_scale, margin, alpha, grad_x, grad_proxies, *,
                     config: Config | None = None):
    """``(loss, grad_x, grad_proxies)`` (see the module docstring); ``config`` overrides the heuristic."""
    b, d = x.shape
    c = proxies.shape[0]
    f32, dev = torch.float32, x.device
    gx = new_output((b if grad_x else 0, d), f32, dev)
    gp = new_output((c if grad_proxies else 0, d), f32, dev)
    tp, tn = new_output((c,), f32, dev), new_output((c,), f32, dev)
    heuristic, kind = proxy_anchor_config(d, x.dtype, proxies.dtype, _smem(dev))
    dot, upcast, prec = _dot_types(x.dtype, proxies.dtype, kind)
    w = x if weights is None else weights  # an unused pointer without weights
    scale = pos_scale.to(device=dev, dtype=f32).reshape(1)
    common = dict(BLOCK_D=block_d(d), HAS_W=weights is not None, DOT=dot, UPCAST=upcast, PREC=prec)
    args = (float(neg_scale), float(alpha), float(margin))
    if c:
        _launch(config or heuristic[0], lambda cfg: _pa_cols_kernel[(triton.cdiv(c, cfg.rows),)](
            x, labels, w, proxies, scale, tp, tn, gp, b, c, d, *args, BLOCK_C=cfg.rows, BLOCK_B=cfg.cols,
            GRAD_P=grad_proxies, **common, num_warps=cfg.num_warps, num_stages=cfg.num_stages), _shrink)
    if grad_x and b:
        if c:
            _launch(config or heuristic[1], lambda cfg: _pa_rows_kernel[(triton.cdiv(b, cfg.rows),)](
                x, labels, w, proxies, scale, tp, tn, gx, b, c, d, *args, BLOCK_B=cfg.rows, BLOCK_C=cfg.cols,
                **common, num_warps=cfg.num_warps, num_stages=cfg.num_stages), _shrink)
        else:
            gx.zero_()
    loss = (tp.sum() * scale[0] + tn.sum() * neg_scale).reshape(())
    return loss, gx, gp

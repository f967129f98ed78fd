"""Center Contrastive Loss ops: ``fastcdml::ccl_fwd``, ``ccl_fwd_partials``, ``ccl_bwd_centers``,
``ccl_momentum_update_``, and the C++-only ``ccl_fwd_dense``, ``ccl_bwd_centers_dense``, ``ccl_normalize_rows``,
``ccl_normalize_rows_backward``.

Schemas (every backend implements exactly these; the math is in ``docs/spec.md``, "Center Contrastive Loss"):

``ccl_fwd(x, labels, centers, temperature, margin, center_weight, compute_grad, margin_type=0, sub_centers=1,
gamma=0.0) -> (loss_rows, grad_x, lse, label_q)``
    x (B, D) fp32/bf16/fp16 contiguous; labels (B,) int32/int64; centers (C·K, D) fp32/bf16 contiguous, K =
    ``sub_centers`` consecutive rows per class (PML's layout). ``margin_type``: 0 = additive cosine margin
    (CCL, CosFace, NormalizedSoftmax), 1 = additive angular margin in radians (ArcFace, PML's fallback past
    π − m); the class logit is the max over its K rows, or with ``gamma`` γ > 0 their softmax-weighted mean
    ``Σ_k softmax_k(s_k/γ)·s_k`` (SoftTriple); the margin acts on the label's (see ``fastcdml.reference.ccl``).
    loss_rows (B,) fp32: L_i (NaN for a label outside [0, C)).
    grad_x (B, D) fp32 when ``compute_grad`` else (0, D): ∂L_i/∂x_i, row normalisation backward included, so
    autograd's backward is one scaling by grad_output (NaN rows for out-of-range labels).  lse (B,) fp32:
    logsumexp_j z_ij, kept for ∂L/∂W.  label_q (B,) fp32: 1 − p_{i,y_i}, summed off the label column so that it
    stays accurate as p_{i,y_i} → 1 (1 − exp(z_y − lse) in fp32 is rounding noise there), kept for ∂L/∂W.
``ccl_fwd_partials(x, labels, centers, temperature, margin, compute_grad, margin_type=0, sub_centers=1)
-> (m, l, lo, ps, acc, c_y, row_y)``
    The forward over one slice of a class-sharded bank, stopped before the epilogue: per query, the online-softmax
    partials that combine across slices (``fastcdml.reference.ccl.ccl_partials`` gives the math and the combine).
    A label in [0, C) is owned by the slice, any other label belongs to another slice (no NaN). m, l, lo, c_y
    (B,) fp32; ps (B,) and acc (B, D) fp32 when ``compute_grad`` else (0,) and (0, D); row_y (B,) int64, the
    owned label's argmax bank row or −1. An empty slice gives m = −inf and zero sums. Not differentiable.
``ccl_bwd_centers(x, labels, centers, lse, grad_rows, temperature, margin, center_weight, margin_type=0,
sub_centers=1, label_q=None, foreign_labels=False, gamma=0.0) -> grad_centers``
    grad_centers (C·K, D) fp32: Σ_i g_i ∂L_i/∂W (learnable-proxy mode); each class's gradient lands on the
    sub-center row that gave its max (γ > 0: on each of its K rows k, times q_k (1 + (s_k − c)/γ)). Without
    ``label_q`` the label column's 1 − p is recomputed from lse.
    ``foreign_labels``: ``centers`` is a slice of a sharded bank and ``lse``, ``label_q`` are the rows' global
    values; a row whose label lies outside [0, C) still contributes its negatives (without it such a row, a NaN
    loss row, contributes nothing); ``fastcdml.reference.ccl.ccl_slice_centers_grad``.
``ccl_fwd_dense(<ccl_fwd's arguments>) -> (loss_rows, grad_x, lse, label_q, coef)`` (C++ only, ``fastcdml``
namespace)
    ``ccl_fwd``'s outputs and coef (B, C·K) fp32 = ∂L_i/∂s_ir, each row's loss differentiated by its similarity to
    each bank row (0 at the rows that gave no class cosine and in the rows of out-of-range labels), kept so that
    the bank's gradient is one product, ``ccl_bwd_centers_dense``, instead of ``ccl_bwd_centers``'s second pass
    over the bank (which recomputes the similarities). Its autograd backward takes that path.
    ``ccl_loss_rows`` chooses it for small problems only (B·C·K ≤ ``DENSE_MAX_ELEMENTS``), where the saved
    product matters more than the (B, C·K) matrix it keeps.
``ccl_bwd_centers_dense(x, coef, grad_rows) -> grad_centers`` (C++ only)
    grad_centers (C·K, D) fp32 = coefᵀ·(grad_rows ⊙ x̂).
``ccl_normalize_rows(rows) -> out`` (C++ only)
    A learnable bank's rows normalised in one pass: rows (n, D) fp32/bf16/fp16 of any strides (e.g. PML's ``W``
    transposed), out (n, D) contiguous fp32 = rows / max(‖row‖, eps). Differentiable in rows through
    ``ccl_normalize_rows_backward(grad, rows) -> grad_rows`` (fp32, laid out as ``rows``), which recomputes the
    norms from rows: autograd keeps no normalised copy of the bank until backward.
``ccl_momentum_update_(centers!, x, labels, momentum, sub_centers=1) -> ()``
    In-place momentum update of the bank (absent classes, out-of-range labels and non-finite results leave
    rows untouched), deterministic. With K > 1 each query moves the sub-center of its class it is most similar
    to (``fastcdml.reference.ccl.subcenter_rows``).

The family's arguments come last with defaults, so calls written for the plain CCL ops keep their meaning.
"""
from __future__ import annotations

import torch

from ..reference.ccl import normalize_rows as _reference_normalize_rows
from ._registry import MAIN, define, namespaces

__all__ = ["ccl_loss_rows", "ccl_momentum_update", "ccl_partials", "ccl_slice_centers_grad", "normalize_rows"]

# ccl_loss_rows takes the dense C++ path when the bank needs a gradient and B·C·K is at most this (a 4 MiB fp32
# matrix): there, a second pass over the bank costs more than keeping the matrix (bench/NOTES.md, campaign 11).
DENSE_MAX_ELEMENTS = 1 << 20

FWD = "(Tensor x, Tensor labels, Tensor centers, float temperature, float margin, float center_weight, " \
      "bool compute_grad, int margin_type=0, int sub_centers=1, float gamma=0.0) -> (Tensor, Tensor, Tensor, Tensor)"
PARTIALS = "(Tensor x, Tensor labels, Tensor centers, float temperature, float margin, bool compute_grad, " \
           "int margin_type=0, int sub_centers=1) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
BWD_CENTERS = "(Tensor x, Tensor labels, Tensor centers, Tensor lse, Tensor grad_rows, float temperature, " \
              "float margin, float center_weight, int margin_type=0, int sub_centers=1, Tensor? label_q=None, " \
              "bool foreign_labels=False, float gamma=0.0) -> Tensor"
FWD_DENSE = FWD.replace("-> (Tensor, Tensor, Tensor, Tensor)", "-> (Tensor, Tensor, Tensor, Tensor, Tensor)")
BWD_CENTERS_DENSE = "(Tensor x, Tensor coef, Tensor grad_rows) -> Tensor"
NORMALIZE = "(Tensor rows) -> Tensor"
NORMALIZE_BACKWARD = "(Tensor grad, Tensor rows) -> Tensor"
UPDATE = "(Tensor(a!) centers, Tensor x, Tensor labels, float momentum, int sub_centers=1) -> ()"


def _fwd_fake(x, labels, centers, temperature, margin, center_weight, compute_grad, margin_type=0, sub_centers=1,
              gamma=0.0):
    b, d = x.shape
    f32 = torch.float32
    return (x.new_empty(b, dtype=f32), x.new_empty((b if compute_grad else 0, d), dtype=f32),
            x.new_empty(b, dtype=f32), x.new_empty(b, dtype=f32))


def _fwd_dense_fake(x, labels, centers, *args):
    return (*_fwd_fake(x, labels, centers, *args), x.new_empty((x.shape[0], centers.shape[0]), dtype=torch.float32))


def _bwd_centers_dense_fake(x, coef, grad_rows):
    return x.new_empty((coef.shape[1], x.shape[1]), dtype=torch.float32)


def _normalize_fake(rows):
    return rows.new_empty(rows.shape, dtype=torch.float32)


def _normalize_backward_fake(grad, rows):
    return torch.empty_like(rows, dtype=torch.float32)


def _partials_fake(x, labels, centers, temperature, margin, compute_grad, margin_type=0, sub_centers=1):
    b, d = x.shape
    n = b if compute_grad else 0
    f32 = torch.float32
    return (*(x.new_empty(b, dtype=f32) for _ in range(3)), x.new_empty(n, dtype=f32),
            x.new_empty((n, d), dtype=f32), x.new_empty(b, dtype=f32), x.new_empty(b, dtype=torch.int64))


def _bwd_centers_fake(x, labels, centers, lse, grad_rows, temperature, margin, center_weight, margin_type=0,
                      sub_centers=1, label_q=None, foreign_labels=False, gamma=0.0):
    return centers.new_empty(centers.shape, dtype=torch.float32)


def _update_fake(centers, x, labels, momentum, sub_centers=1):
    return None


def _setup_context(ctx, inputs, output):
    x, labels, centers, temperature, margin, center_weight, compute_grad, *family = inputs
    _, grad_x, lse, label_q = output
    margin_type, sub_centers, gamma = list(family) + [0, 1, 0.0][len(family):]  # the schema's defaults where omitted
    ctx.hyper = (temperature, margin, center_weight, margin_type, sub_centers)
    ctx.gamma = gamma
    ctx.dtypes = (x.dtype, centers.dtype)
    ctx.compute_grad = compute_grad
    ctx.n_inputs = len(inputs)
    # The bank is saved only when it needs a gradient: in momentum mode it is updated in place after the
    # forward, and the query gradient was computed before that, in the forward itself.
    ctx.save_for_backward(x, labels, centers if centers.requires_grad else None, lse, label_q, grad_x)


def _grad_x(ctx, grad_rows, grad_x):
    if not ctx.needs_input_grad[0]:
        return None
    if not ctx.compute_grad:
        raise RuntimeError("ccl_fwd ran with compute_grad=False but a gradient for x was requested")
    return (grad_rows[:, None] * grad_x).to(ctx.dtypes[0])


def _make_backward(ops):
    def backward(ctx, grad_rows, _grad_grad_x, _grad_lse, _grad_label_q):
        x, labels, centers, lse, label_q, grad_x = ctx.saved_tensors
        gw = None
        if ctx.needs_input_grad[2]:
            gw = ops.ccl_bwd_centers(
                x, labels, centers, lse, grad_rows.float().contiguous(), *ctx.hyper, label_q, gamma=ctx.gamma
            ).to(ctx.dtypes[1])
        return (_grad_x(ctx, grad_rows, grad_x), None, gw) + (None,) * (ctx.n_inputs - 3)

    return backward


def _dense_setup_context(ctx, inputs, output):
    x, _, centers, _, _, _, compute_grad = inputs[:7]
    ctx.dtypes, ctx.compute_grad, ctx.n_inputs = (x.dtype, centers.dtype), compute_grad, len(inputs)
    ctx.save_for_backward(x, output[4], output[1])


def _make_dense_backward(ops):
    def backward(ctx, grad_rows, *_unused):
        x, coef, grad_x = ctx.saved_tensors
        gw = None
        if ctx.needs_input_grad[2]:
            gw = ops.ccl_bwd_centers_dense(x, coef, grad_rows.float().contiguous()).to(ctx.dtypes[1])
        return (_grad_x(ctx, grad_rows, grad_x), None, gw) + (None,) * (ctx.n_inputs - 3)

    return backward


def _normalize_setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _make_normalize_backward(ops):
    def backward(ctx, grad_out):
        (rows,) = ctx.saved_tensors
        return ops.ccl_normalize_rows_backward(grad_out, rows).to(rows.dtype)

    return backward


# The Triton launchers; the kernel module is imported on first call (it needs triton).
def _fwd_triton(*args):
    from ..kernels import ccl as kernels

    return kernels.ccl_fwd(*args)


def _partials_triton(*args):
    from ..kernels import ccl as kernels

    return kernels.ccl_fwd_partials(*args)


def _bwd_centers_triton(*args):
    from ..kernels import ccl as kernels

    return kernels.ccl_bwd_centers(*args)


def _update_triton(*args):
    from ..kernels import ccl as kernels

    return kernels.ccl_momentum_update_(*args)


for _ns in namespaces():
    define(_ns, "ccl_fwd", FWD, _fwd_fake, _fwd_triton, _make_backward(getattr(torch.ops, _ns)), _setup_context)
    define(_ns, "ccl_fwd_partials", PARTIALS, _partials_fake, _partials_triton)
    define(_ns, "ccl_bwd_centers", BWD_CENTERS, _bwd_centers_fake, _bwd_centers_triton)
    define(_ns, "ccl_momentum_update_", UPDATE, _update_fake, _update_triton)
_main = getattr(torch.ops, MAIN)
define(MAIN, "ccl_fwd_dense", FWD_DENSE, _fwd_dense_fake, None, _make_dense_backward(_main), _dense_setup_context)
define(MAIN, "ccl_bwd_centers_dense", BWD_CENTERS_DENSE, _bwd_centers_dense_fake, None)
define(MAIN, "ccl_normalize_rows", NORMALIZE, _normalize_fake, None, _make_normalize_backward(_main),
       _normalize_setup_context)
define(MAIN, "ccl_normalize_rows_backward", NORMALIZE_BACKWARD, _normalize_backward_fake, None)


# The wrappers the fused backend calls: ``ops`` is a bound op namespace (``torch.ops.fastcdml`` or
# ``torch.ops.fastcdml_interpret``); the other arguments are those of the function of the same name in
# ``fastcdml.reference.ccl``.
def ccl_loss_rows(ops, x, labels, centers, temperature, margin, center_weight, margin_type=0, sub_centers=1,
                  gamma=0.0):
    """Per-row losses (B,) fp32; differentiable in ``x`` and ``centers``. On the C++ backend, a bank that needs a
    gradient with B·C·K ≤ ``DENSE_MAX_ELEMENTS`` takes ``ccl_fwd_dense``."""
    compute_grad = torch.is_grad_enabled() and x.requires_grad
    dense = (ops is _main and x.device.type == "cpu" and torch.is_grad_enabled() and centers.requires_grad
             and x.shape[0] * centers.shape[0] <= DENSE_MAX_ELEMENTS)
    return (ops.ccl_fwd_dense if dense else ops.ccl_fwd)(
        x.contiguous(), labels.contiguous(), centers.contiguous(), temperature, margin, center_weight, compute_grad,
        margin_type, sub_centers, gamma)[0]


def ccl_momentum_update(ops, centers, x, labels, momentum, sub_centers=1):
    """The bank after one momentum step: ``centers`` itself, updated in place (it must be contiguous)."""
    ops.ccl_momentum_update_(centers, x.detach().contiguous(), labels.contiguous(), momentum, sub_centers)
    return centers


def ccl_partials(ops, x, labels, centers, temperature, margin, compute_grad, margin_type=0, sub_centers=1):
    """The fields of :class:`fastcdml.reference.ccl.SlicePartials` of ``x`` over the bank slice ``centers`` (no
    autograd)."""
    return ops.ccl_fwd_partials(x.detach().contiguous(), labels.contiguous(), centers.detach().contiguous(),
                                temperature, margin, compute_grad, margin_type, sub_centers)


def ccl_slice_centers_grad(ops, x, labels, centers, lse, label_q, grad_rows, temperature, margin, center_weight,
                           margin_type=0, sub_centers=1):
    """∂(Σ_i g_i L_i)/∂W (C·K, D) fp32 for the bank slice ``centers`` given the rows' global lse and 1 − p_y
    (``ccl_bwd_centers`` with ``foreign_labels``)."""
    return ops.ccl_bwd_centers(x.detach().contiguous(), labels.contiguous(), centers.detach().contiguous(),
                               lse.float().contiguous(), grad_rows.float().contiguous(), temperature, margin,
                               center_weight, margin_type, sub_centers, label_q.float().contiguous(), True)


def normalize_rows(ops, x, dtype=None):
    """``fastcdml.reference.ccl.normalize_rows``; fp32 rows on the C++ backend take ``ccl_normalize_rows`` (one
    pass each way instead of autograd's chain of elementwise ops and reductions)."""
    if ops is _main and x.device.type == "cpu" and x.dtype != torch.float64 and dtype in (None, torch.float32):
        return ops.ccl_normalize_rows(x)
    return _reference_normalize_rows(x, dtype)

"""Center Contrastive Loss ops: ``fastcdml::ccl_fwd``, ``ccl_fwd_partials``, ``ccl_bwd_centers``,
``ccl_momentum_update_``.

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
``ccl_momentum_update_(centers!, x, labels, momentum, sub_centers=1) -> ()``
    In-place momentum update of the bank (absent classes, out-of-range labels and non-finite results leave
    rows untouched), deterministic. With K > 1 each query moves the sub-center of its class it is most similar
    to (``fastcdml.reference.ccl.subcenter_rows``).

The family's arguments come last with defaults, so calls written for the plain CCL ops keep their meaning.
"""
from __future__ import annotations

import torch

from ._registry import define, namespaces

__all__ = ["ccl_loss_rows", "ccl_momentum_update", "ccl_partials", "ccl_slice_centers_grad"]

FWD = "(Tensor x, Tensor labels, Tensor centers, float temperature, float margin, float center_weight, " \
      "bool compute_grad, int margin_type=0, int sub_centers=1, float gamma=0.0) -> (Tensor, Tensor, Tensor, Tensor)"
PARTIALS = "(Tensor x, Tensor labels, Tensor centers, float temperature, float margin, bool compute_grad, " \
           "int margin_type=0, int sub_centers=1) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
BWD_CENTERS = "(Tensor x, Tensor labels, Tensor centers, Tensor lse, Tensor grad_rows, float temperature, " \
              "float margin, float center_weight, int margin_type=0, int sub_centers=1, Tensor? label_q=None, " \
              "bool foreign_labels=False, float gamma=0.0) -> Tensor"
UPDATE = "(Tensor(a!) centers, Tensor x, Tensor labels, float momentum, int sub_centers=1) -> ()"


def _fwd_fake(x, labels, centers, temperature, margin, center_weight, compute_grad, margin_type=0, sub_centers=1,
              gamma=0.0):
    b, d = x.shape
    f32 = torch.float32
    return (x.new_empty(b, dtype=f32), x.new_empty((b if compute_grad else 0, d), dtype=f32),
            x.new_empty(b, dtype=f32), x.new_empty(b, dtype=f32))


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


def _make_backward(ops):
    def backward(ctx, grad_rows, _grad_grad_x, _grad_lse, _grad_label_q):
        x, labels, centers, lse, label_q, grad_x = ctx.saved_tensors
        gx = gw = None
        if ctx.needs_input_grad[0]:
            if not ctx.compute_grad:
                raise RuntimeError("ccl_fwd ran with compute_grad=False but a gradient for x was requested")
            gx = (grad_rows[:, None] * grad_x).to(ctx.dtypes[0])
        if ctx.needs_input_grad[2]:
            gw = ops.ccl_bwd_centers(
                x, labels, centers, lse, grad_rows.float().contiguous(), *ctx.hyper, label_q, gamma=ctx.gamma
            ).to(ctx.dtypes[1])
        return (gx, None, gw) + (None,) * (ctx.n_inputs - 3)

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


# The wrappers the fused backend calls: ``ops`` is a bound op namespace (``torch.ops.fastcdml`` or
# ``torch.ops.fastcdml_interpret``); the other arguments are those of the function of the same name in
# ``fastcdml.reference.ccl``.
def ccl_loss_rows(ops, x, labels, centers, temperature, margin, center_weight, margin_type=0, sub_centers=1,
                  gamma=0.0):
    """Per-row losses (B,) fp32; differentiable in ``x`` and ``centers``."""
    compute_grad = torch.is_grad_enabled() and x.requires_grad
    return ops.ccl_fwd(x.contiguous(), labels.contiguous(), centers.contiguous(), temperature, margin, center_weight,
                       compute_grad, margin_type, sub_centers, gamma)[0]


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

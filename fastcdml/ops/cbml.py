"""Contrastive Bayesian loss op: ``fastcdml::cbml_fwd`` (math: ``docs/spec.md``, "Contrastive Bayesian loss").

``cbml_fwd(x, labels, ref, ref_labels, pair_mask, include_self, pos_a, pos_b, neg_a, neg_b, margin,
variance_weight, mean_weight, phi, pos_weight, neg_weight, class_means, top_k, grad_x, grad_ref)
-> (loss, grad_x, grad_ref)``
    x (B, D) fp32/bf16/fp16 contiguous, labels (B,) int32/int64; ref (M, D) contiguous (M may be 0) with
    ref_labels (M,). Reference set = [x̂ if include_self] ++ [r̂] (R columns); self pairs are excluded by index;
    a reference with a negative label is absent (in no set, not in the row mean). ``pair_mask``: None, or a
    (B, ceil(R/8)) uint8 bit mask of the pairs allowed as positives or negatives (mined pairs; bit j % 8 of byte
    [i, j // 8]; B·R/8 bytes, see ``fastcdml.reference.cbml.pack_pairs``).
    ``top_k = 0``: adaptive hard negatives; ``top_k > 0``: the top_k hardest negatives. ``phi``: 0 = log,
    1 = sqrt, 2 = constant (``1 + pos_weight·Σ`` / ``1 + neg_weight·Σ``; the weights are unused otherwise).
    ``class_means``: the variance term's centre is h·mean(P) + (1−h)·mean(N), else (1−h)·mean(row) +
    h·(minP + maxN)/2 (h = mean_weight).
    loss () fp32 = Σ_i L_i / B (0 for B = 0).
    grad_x (B, D) fp32 when ``grad_x`` else (0, D): ∂loss/∂x through both roles of x (query and, with
    include_self, reference); grad_ref (M, D) fp32 when ``grad_ref`` else (0, D).

The gradients are computed in the forward (the loss is a fixed Σ/B reduction, so backward is one scaling by
grad_output). This lets a cross-batch memory passed as ``ref`` be overwritten in place right after the forward
without keeping a copy for backward.
"""
from __future__ import annotations

import torch

from ..params import PHIS
from ._registry import define_forward_gradient

__all__ = ["cbml_loss"]

FWD = "(Tensor x, Tensor labels, Tensor ref, Tensor ref_labels, Tensor? pair_mask, bool include_self, " \
      "float pos_a, float pos_b, " \
      "float neg_a, float neg_b, float margin, float variance_weight, float mean_weight, int phi, " \
      "float pos_weight, float neg_weight, bool class_means, int top_k, bool grad_x, bool grad_ref) " \
      "-> (Tensor, Tensor, Tensor)"

define_forward_gradient("cbml", FWD)



def cbml_loss(ops, x, labels, ref, ref_labels, *, pair_mask=None, include_self=True, pos_a=0.5, pos_b=0.5,
              neg_a=1.0, neg_b=0.01, margin=0.1, variance_weight=1.0, mean_weight=0.2, phi="log", top_k=0,
              variance_center="class_means", pos_weight=0.25, neg_weight=0.25):
    """Scalar fp32 loss through the bound op namespace ``ops`` (``ref`` (M, D), M may be 0; the other arguments
    are those of ``fastcdml.reference.cbml.cbml_loss``); differentiable in ``x`` and ``ref``."""
    grad_on = torch.is_grad_enabled()
    loss, _, _ = ops.cbml_fwd(
        x.contiguous(), labels.contiguous(), ref.contiguous(), ref_labels.contiguous(),
        None if pair_mask is None else pair_mask.contiguous(), include_self, pos_a, pos_b, neg_a, neg_b, margin,
        variance_weight, mean_weight, PHIS.index(phi), pos_weight, neg_weight, variance_center == "class_means",
        top_k, grad_on and x.requires_grad, grad_on and ref.requires_grad,
    )
    return loss

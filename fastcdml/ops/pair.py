"""Pair losses op: ``fastcdml::pair_fwd`` (math: ``docs/spec.md``, "Pair losses"; ``fastcdml.reference.pair``).

``pair_fwd(x, labels, ref, ref_labels, exclude, counts, kind, p0, p1, p2, grad_x, grad_ref)
-> (loss, grad_x, grad_ref)``
    x (B, D) fp32/bf16/fp16, labels (B,) int32/int64; ref (R, D) with ref_labels (R,), R ≥ 1 (``ref`` may be ``x``
    itself). ``exclude``: None or (B,) int64, the column of each row that is no positive (−1: none). ``counts``:
    None (every pair once, positive or negative by the labels) or a (B, R) uint8 matrix of pair multiplicities
    (mined pairs). ``kind``: the index of the loss in ``fastcdml.reference.pair.KINDS`` (0 NTXent, 1 SupCon,
    2 MultiSimilarity, 3 Contrastive); p0..p2 its hyper-parameters (τ; τ; α, β, base; m⁺, m⁻; unused ones 0).
    loss () fp32. grad_x (B, D) fp32 when ``grad_x`` else (0, D); grad_ref (R, D) fp32 when ``grad_ref`` else
    (0, D): ∂loss/∂x and ∂loss/∂ref.

The gradients are computed in the forward (a second pass over the tiles, after the per-row statistics and their
global reductions are known): the loss is a fixed function of them, so backward is one scaling by grad_output,
and a memory passed as ``ref`` may be overwritten right after the forward.
"""
from __future__ import annotations

import torch

from ..reference.pair import KINDS
from ._registry import define_forward_gradient

__all__ = ["pair_loss"]

FWD = "(Tensor x, Tensor labels, Tensor ref, Tensor ref_labels, Tensor? exclude, Tensor? counts, int kind, " \
      "float p0, float p1, float p2, bool grad_x, bool grad_ref) -> (Tensor, Tensor, Tensor)"

define_forward_gradient("pair", FWD)



def pair_loss(ops, kind: str, x, labels, ref, ref_labels, params: tuple, exclude=None, counts=None):
    """Scalar fp32 loss through the op namespace ``ops`` (e.g. ``torch.ops.fastcdml``); differentiable in ``x``
    and ``ref``."""
    grad_on = torch.is_grad_enabled()
    p = tuple(float(v) for v in params) + (0.0,) * (3 - len(params))
    loss, _, _ = ops.pair_fwd(
        x.contiguous(), labels.contiguous(), ref.contiguous(), ref_labels.contiguous(),
        None if exclude is None else exclude.contiguous(), None if counts is None else counts.contiguous(),
        KINDS.index(kind), *p, grad_on and x.requires_grad, grad_on and ref.requires_grad,
    )
    return loss

"""Proxy Anchor op: ``fastcdml::proxy_anchor_fwd`` (math: ``docs/spec.md``, "Proxy Anchor";
``fastcdml.reference.proxy_anchor``).

``proxy_anchor_fwd(x, labels, proxies, weights, pos_scale, neg_scale, margin, alpha, grad_x, grad_proxies)
-> (loss, grad_x, grad_proxies)``
    x (B, D) fp32/bf16/fp16 contiguous; labels (B,) int32/int64; proxies (C, D) fp32/bf16/fp16 contiguous (not
    necessarily unit rows: they are normalised in the kernels); weights None or (B,) fp32, PML's miner weights w_i
    (the exponents get w_i − 1). A label outside [0, C) is a row whose class lies on another slice of a
    class-sharded set of proxies: no positive here, a negative of every proxy. pos_scale: 0-d fp32 tensor on x's
    device, 1/|C⁺| (a tensor so that no host synchronisation is needed to count the classes of the batch);
    neg_scale: 1/C of the whole set of proxies.
    loss () fp32 = pos_scale·Σ_j log(1 + P_j) + neg_scale·Σ_j log(1 + N_j) over these proxies.
    grad_x (B, D) fp32 when ``grad_x`` else (0, D): ∂loss/∂x; grad_proxies (C, D) fp32 when ``grad_proxies`` else
    (0, D): ∂loss/∂proxies (normalisation backward included in both).

The gradients are computed in the forward (the loss is a scalar, so backward is one scaling by grad_output, done in
place on the saved gradients: backward through the same graph twice is refused by autograd): the
kernels reduce per column (per proxy, over all B rows) in one pass over the proxies, which also gives the proxies'
gradient from a second loop over the rows, and one pass over the proxies per block of rows gives the rows'
gradient from the saved per-column normalisers (``docs/kernels.md``).
"""
from __future__ import annotations

import torch

from ._registry import define_forward_gradient

__all__ = ["proxy_anchor_loss", "proxy_anchor_grads"]

FWD = "(Tensor x, Tensor labels, Tensor proxies, Tensor? weights, Tensor pos_scale, float neg_scale, float margin, " \
      "float alpha, bool grad_x, bool grad_proxies) -> (Tensor, Tensor, Tensor)"

define_forward_gradient("proxy_anchor", FWD)


# The wrappers the fused backends bind: ``ops`` is a bound op namespace; the other arguments are those of the
# functions of the same names in ``fastcdml.reference.proxy_anchor`` (the scales are required here: the module
# passes them).
def _call(ops, x, labels, proxies, margin, alpha, weights, pos_scale, neg_scale, grad_x, grad_proxies):
    return ops.proxy_anchor_fwd(
        x.contiguous(), labels.contiguous(), proxies.contiguous(),
        None if weights is None else weights.float().contiguous(), pos_scale.float().reshape(()), float(neg_scale),
        float(margin), float(alpha), grad_x, grad_proxies)


def proxy_anchor_loss(ops, x, labels, proxies, margin, alpha, weights, pos_scale, neg_scale):
    """The loss (0-d fp32), differentiable in ``x`` and ``proxies``."""
    grad_on = torch.is_grad_enabled()
    return _call(ops, x, labels, proxies, margin, alpha, weights, pos_scale, neg_scale,
                 grad_on and x.requires_grad, grad_on and proxies.requires_grad)[0]


def proxy_anchor_grads(ops, x, labels, proxies, margin, alpha, weights, pos_scale, neg_scale, grad_x, grad_proxies):
    """``(loss, ∂loss/∂x or (0, D), ∂loss/∂proxies or (0, D))`` fp32 without autograd, for a slice of a
    class-sharded set of proxies (global ``pos_scale``, ``neg_scale``)."""
    return _call(ops, x.detach(), labels, proxies.detach(), margin, alpha, weights, pos_scale, neg_scale, grad_x,
                 grad_proxies)

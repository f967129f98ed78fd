"""Class-sharded :class:`fastcdml.ProxyAnchorLoss`: rank r holds the proxies of a contiguous class slice.

Proxy Anchor reduces per column (per proxy, over the batch), so a slice of the proxies needs no softmax statistics
from the other slices: with the global batch, rank r computes the column terms of its own proxies exactly, and
only three things cross ranks besides the batch itself. Per step (B = B_global, the sum of the ranks' batch
sizes, B_max the largest, W ranks, c = 4 bytes, 8 for float64 embeddings):

1. :func:`fastcdml.distributed.gather_batch` checks the inputs on every rank and all-gathers the embeddings and
   labels (and the rows' miner weights, ``all_gather:weights``, W·B_max·c bytes, always, so that ranks with and
   without mined tuples stay in step). ``|C⁺|``, the classes present in the global batch, comes from the
   gathered labels: no bytes.
2. Each rank runs the fused op over its slice for every global row (a label of another slice makes the row a
   negative of every local proxy), with the global divisors 1/|C⁺| and 1/C: its part of the loss, the gradient
   of its proxies (final: nothing to exchange) and its part of every row's gradient (B × D).
3. ``all_reduce:loss`` sums the parts of the scalar loss (c bytes); ``reduce_scatter:grad_rows`` sums the rows'
   gradient parts and hands each rank its own rows (W·B_max·D·c bytes; only when the embeddings need a gradient).

Every rank returns the loss of the global batch (the single-process ``ProxyAnchorLoss`` on the concatenated
batch); the gradient reaching a rank's embeddings is that rank's rows of the single-process gradient, and a
rank's proxies get their rows of the single-process proxy gradient. (Under DDP, which averages the trunk's
gradients over ranks, the trunk therefore receives 1/W of the single-process gradient, as with any loss computed
on an all-gathered batch.) Everything is computed in forward; backward scales by grad_output and communicates
nothing. Memory per rank: the C_r × D slice plus O(B·D + C_r).

Checkpoints: as :class:`fastcdml.losses.sharded_ccl.ShardedBank` (the slice and its class range; a full
``{"proxies": (C, D)}``, e.g. PML's or the single-process loss's state dict, loads and re-shards). The default
initialisation is PML's (Kaiming normal with ``mode="fan_out"``, std sqrt(2/C)), drawn in class blocks so that,
with torch seeded alike on every rank, it does not depend on the world size; ``weight_init_func`` is applied to
the rank's (C_r, D) slice.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.distributed as dist

from .._backend import Backend, resolve
from ..distributed import all_reduce, gather_batch, gather_rows, reduce_scatter_rows, shard_range
from ..ops._registry import scale_saved
from ..params import ProxyAnchorParams
from ..reference.proxy_anchor import positive_scale
from .. import _checks
from . import _pml
from .proxy_anchor import check_args, cosines, proxy_anchor
from .sharded_ccl import ShardedBank, _random_rows


def step_bytes(sizes: Sequence[int], dim: int, itemsize: int, compute_itemsize: int = 4,
               query_grad: bool = True) -> dict[str, int]:
    """The closed form of ``stats.last_step`` for one step with per-rank batch sizes ``sizes`` (the module
    docstring): status, embeddings, labels and weights gathered, the loss all-reduced, the rows' gradient
    reduce-scattered."""
    w, b = len(sizes), sum(sizes)
    out = {"all_gather:status": 32 * w}
    if b == 0:
        return out
    b_max = max(sizes)
    out.update({"all_gather:embeddings": w * b_max * dim * itemsize, "all_gather:labels": w * b_max * 8,
                "all_gather:weights": w * b_max * compute_itemsize, "all_reduce:loss": compute_itemsize})
    if query_grad:
        out["reduce_scatter:grad_rows"] = w * b_max * dim * compute_itemsize
    return out


class _ShardedProxyAnchor(torch.autograd.Function):
    """The global loss from this rank's slice (module docstring, steps 2–3); gradients computed in forward."""

    @staticmethod
    def forward(ctx, x, proxies, xg, local_labels, weights, pos_scale, sizes, params, neg_scale, backend, group,
                stats):
        want_x, want_p = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        loss, gxg, gp = proxy_anchor(backend).proxy_anchor_grads(xg, local_labels, proxies, *params.as_args(), weights,
                                                                 pos_scale, neg_scale, want_x, want_p)
        total = loss.reshape(1).clone()
        all_reduce(total, dist.ReduceOp.SUM, group, stats, "loss")
        gx = reduce_scatter_rows(gxg, sizes, group, stats, "grad_rows") if want_x else None
        ctx.dtypes = (x.dtype, proxies.dtype)
        ctx.save_for_backward(gx, gp if want_p else None)
        return total[0]

    @staticmethod
    def backward(ctx, grad_loss):
        gx, gp = ctx.saved_tensors
        return (scale_saved(gx, grad_loss).to(ctx.dtypes[0]) if gx is not None else None,
                scale_saved(gp, grad_loss).to(ctx.dtypes[1]) if gp is not None else None) + (None,) * 10


class ShardedProxyAnchorLoss(ShardedBank):
    """Class-sharded :class:`fastcdml.ProxyAnchorLoss` (see the module docstring): PML's arguments plus
    ``shard_sizes`` (classes per rank, default even) and ``process_group``. ``proxies``: this rank's
    (C_r, embedding_size) Parameter. ``stats``: the bytes of each collective (:func:`step_bytes`). A collective:
    every rank calls it together (backward moves nothing)."""

    KEY = "proxies"

    def __init__(self, num_classes: int, embedding_size: int, margin: float = 0.1, alpha: float = 32, *,
                 backend: str = "auto", check_inputs: bool = True, weight_init_func=None,
                 shard_sizes: Sequence[int] | None = None, process_group=None, **kwargs):
        check_args(type(self).__name__, num_classes, embedding_size, backend, kwargs)
        params = ProxyAnchorParams(margin, alpha)
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(f"{type(self).__name__} needs torch.distributed.init_process_group() first")
        start, stop = shard_range(num_classes, dist.get_world_size(process_group), dist.get_rank(process_group),
                                  shard_sizes)
        if weight_init_func is None:  # PML's Kaiming normal (fan_out = C), independent of the world size
            rows = _random_rows(start, stop, embedding_size, None) * math.sqrt(2.0 / num_classes)
        else:
            rows = torch.empty(stop - start, embedding_size)
            weight_init_func(rows)
        super().__init__(num_classes, embedding_size, params, "gradient", 0.0, backend, check_inputs, rows,
                         torch.float32, None, shard_sizes, 1.0, process_group, normalize_init=False)
        self.margin, self.alpha = margin, alpha

    def _resolve(self, embeddings) -> Backend:
        return resolve(self.backend, "proxy_anchor", _checks.tensor(embeddings, "embeddings").device)

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        """The loss of the global batch (0-d float32; float64 for float64 inputs on the reference backend)."""
        name = type(self).__name__
        device, labels = _pml.call_contract(name, embeddings, labels, ref_emb, ref_labels)
        checked = {}

        def check():  # every rank's inputs and mined tuple, before anything is gathered
            checked["backend"] = self._resolve(embeddings)
            self._check(embeddings, labels, checked["backend"])
            checked["weights"] = _pml.miner_weights(indices_tuple, embeddings.shape[0], device)

        self.stats.start_step(self.process_group)
        try:
            xg, yg, sizes = gather_batch(embeddings, labels, check, self.process_group, self.stats)
            if sum(sizes) == 0:
                return embeddings.sum() * 0.0 + self.proxies.sum() * 0.0
            weights = checked["weights"]
            compute = torch.float64 if xg.dtype == torch.float64 else torch.float32
            own = torch.ones(embeddings.shape[0], dtype=compute, device=device) if weights is None else \
                weights.to(compute)
            wg = gather_rows(own, sizes, group=self.process_group, stats=self.stats, name="weights")
            yg = yg.to(device)
            local = yg - self.start
            local = torch.where((local >= 0) & (local < self.stop - self.start), local, -1)
            x, proxies = (embeddings, self.proxies) if torch.is_grad_enabled() else (embeddings.detach(),
                                                                                      self.proxies.detach())
            return _ShardedProxyAnchor.apply(x, proxies, xg, local, wg, positive_scale(yg), sizes, self.params,
                                             1.0 / self.num_classes, checked["backend"], self.process_group,
                                             self.stats)
        finally:
            self.stats.log_step(name, self.process_group)

    def get_logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(B, stop − start): cosines of the embeddings and this rank's proxies (not a collective)."""
        return cosines(embeddings, self.proxies)

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, embedding_size={self.embedding_size}, classes=[{self.start}, "
                f"{self.stop}) on rank {self.rank}/{self.world_size}, margin={self.margin}, alpha={self.alpha}, "
                f"backend={self.backend!r}")

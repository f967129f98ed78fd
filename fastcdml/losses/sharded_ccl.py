"""Class-sharded (model-parallel) Center Contrastive Loss: rank r holds the centers of a contiguous class slice.

Per step (B_global = the sum of the ranks' batch sizes, C_r = the classes of rank r):

1. :func:`fastcdml.distributed.gather_batch` checks the inputs on every rank (a bad label anywhere raises the same
   error everywhere) and all-gathers the embeddings and labels (detached).
2. Each rank computes, for every global row i, partials over its own classes with the online softmax of flash
   attention: ``m_i = max_j z_ij``, ``s_i = Σ_j exp(z_ij − m_i)``, ``v_i = Σ_j exp(z_ij − m_i)·W_j``, and, when
   it owns ``y_i``, the target center ``W_{y_i}`` and cosine ``s_{i,y_i}``.
3. An all-reduce MAX of ``m`` (B_global floats) and one all-reduce SUM of the rescaled
   ``[v·e^{m−M}, W_y, s·e^{m−M}, s_y]`` (B_global × (2D + 2)) give the exact global
   ``lse_i = M_i + log S_i`` and ``Σ_j p_ij W_j = V_i / S_i``, hence the loss rows and the query gradient
   ``g_x̂_i = (V_i/S_i − W_{y_i})/τ − 2λ·W_{y_i}`` (``docs/spec.md``), computed in forward like the fused op does.
4. Each rank returns the loss of its own rows (reduced over its own batch, as under DDP); backward multiplies
   the saved gradient rows by grad_output and needs no communication.
5. In training mode each rank applies the momentum update to its own slice with the global rows whose labels
   fall in it (through the backend's fused ``ccl_update_`` op when available).

Communication per step and rank (logical payload, counted in the module's ``stats``, formula in
:func:`fastcdml.distributed.step_bytes`): the preflight status table (32·W bytes), the all-gather of the
embeddings (W·B_max·D·itemsize, rows padded to the largest batch B_max) and labels (W·B_max·8), the MAX
all-reduce (B_global·4) and the SUM all-reduce (B_global·(2D + 2)·4; 8-byte floats for float64 embeddings). No
gradient is returned: backward is local. A ring sends (W−1)/W of each all-gather and 2(W−1)/W of each
all-reduce per rank.

Step 2 is a chunked PyTorch computation (at most ``B_global × chunk`` logits at a time, ``chunk`` chosen so a
tile holds ≤ 2²² elements), not the fused ``ccl_fwd`` op: that op's schema returns the slice's lse and a
gradient already projected through the row normalisation, and it rejects rows whose label lies outside the slice
(NaN), so it cannot produce the separate sum-exp and softmax-weighted center sum partials. A ``ccl_fwd_partials``
op would let the Triton kernel do this step. Memory per rank: the C_r × D slice plus O(B_global · D).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.distributed as dist
from torch import nn

from .. import _checks
from .._backend import resolve
from ..params import CenterParams
from ..distributed import CommStats, all_reduce, gather_batch, gather_rows, shard_range
from ..reference.ccl import EPS, compute_dtype, normalize_rows
from .ccl import _check_module_args, _empty, center_momentum_update_

_TILE_ELEMENTS = 1 << 22  # logits per chunk: B_global × chunk ≤ this
_INIT_BLOCK = 4096  # rows of the random initial bank drawn per seed, so the bank does not depend on world size


def _random_rows(start: int, stop: int, dim: int, generator: torch.Generator | None) -> torch.Tensor:
    """Gaussian rows [start, stop) of a (C, dim) bank drawn in blocks of ``_INIT_BLOCK`` rows, block b seeded by
    ``seed + b`` with one ``seed`` drawn from ``generator``: identical for any slicing when ranks seed alike."""
    seed = int(torch.randint(2**62, (), generator=generator))
    rows = []
    for block in range(start // _INIT_BLOCK, -(-stop // _INIT_BLOCK)):
        values = torch.randn(_INIT_BLOCK, dim, generator=torch.Generator().manual_seed(seed + block))
        base = block * _INIT_BLOCK
        rows.append(values[max(start, base) - base: min(stop, base + _INIT_BLOCK) - base])
    return torch.cat(rows) if rows else torch.empty(0, dim)


def _slice_partials(xh, local_labels, centers, temperature, margin):
    """Online-softmax partials of ``xh`` (N, D) against ``centers`` (C_r, D), margin at ``local_labels`` (N,)
    where it lies in [0, C_r): ``(m, s, v)`` with shapes (N,), (N,), (N, D) in ``xh``'s dtype."""
    n, d = xh.shape
    m = xh.new_full((n,), -math.inf)
    s, v = xh.new_zeros(n), xh.new_zeros(n, d)
    chunk = max(1, _TILE_ELEMENTS // max(n, 1))
    rows = torch.arange(n, device=xh.device)
    for c0 in range(0, centers.shape[0], chunk):
        w = centers[c0: c0 + chunk].to(xh.dtype)
        z = xh @ w.t()
        col = local_labels - c0
        hit = (col >= 0) & (col < w.shape[0])
        z[rows[hit], col[hit]] -= margin
        z /= temperature
        m_new = torch.maximum(m, z.max(dim=1).values)
        scale = torch.exp(m - m_new)
        p = torch.exp(z - m_new[:, None])
        s = s * scale + p.sum(dim=1)
        v = v * scale[:, None] + p @ w
        m = m_new
    return m, s, v


def _part_of(t: torch.Tensor, sizes, rank: int) -> torch.Tensor:
    """Rank ``rank``'s rows of a gathered tensor."""
    start = sum(sizes[:rank])
    return t[start: start + sizes[rank]]


class _ShardedRows(torch.autograd.Function):
    """Loss rows of this rank's queries against the sharded bank; the query gradient is computed in forward."""

    @staticmethod
    def forward(ctx, x, xg, local_labels, centers, offset, temperature, margin, center_weight, group, stats):
        dtype = compute_dtype(xg, centers)
        xh = normalize_rows(xg, dtype)
        m, s, v = _slice_partials(xh, local_labels, centers, temperature, margin)
        own = (local_labels >= 0) & (local_labels < centers.shape[0])
        w_y = xh.new_zeros(xh.shape)
        w_y[own] = centers[local_labels[own]].to(dtype)
        s_y = (xh * w_y).sum(dim=1)
        m_all = m.clone()
        all_reduce(m_all, dist.ReduceOp.MAX, group, stats, "max")
        scale = torch.exp(m - m_all)  # 0 on a rank without classes (m = −inf)
        packed = torch.cat([v * scale[:, None], w_y, (s * scale)[:, None], s_y[:, None]], dim=1)
        all_reduce(packed, dist.ReduceOp.SUM, group, stats, "sum")
        d = xh.shape[1]
        rows = slice(offset, offset + x.shape[0])
        v, w_y, s, s_y = packed[rows, :d], packed[rows, d: 2 * d], packed[rows, 2 * d], packed[rows, 2 * d + 1]
        loss = m_all[rows] + torch.log(s) - (s_y - margin) / temperature - 2.0 * center_weight * s_y
        g_hat = (v / s[:, None] - w_y) / temperature - 2.0 * center_weight * w_y
        xh_local = xh[rows]
        norm = xg[rows].to(dtype).norm(dim=1, keepdim=True).clamp_min(EPS)
        ctx.save_for_backward((g_hat - xh_local * (xh_local * g_hat).sum(dim=1, keepdim=True)) / norm)
        ctx.x_dtype = x.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_rows):
        (grad_x,) = ctx.saved_tensors
        return (grad_rows[:, None] * grad_x).to(ctx.x_dtype), None, None, None, None, None, None, None, None, None


def merge_shards(state_dicts: Sequence[dict]) -> dict:
    """Offline: the per-rank ``state_dict()``s of one sharded bank (any order) → ``{"centers": (C, D)}``, a full
    bank loadable by :class:`ShardedCenterContrastiveLoss` at any world size and by ``CenterContrastiveLoss``."""
    shards = sorted(state_dicts, key=lambda sd: sd["_extra_state"]["start"])
    num_classes, stop = shards[0]["_extra_state"]["num_classes"], 0
    for sd in shards:
        extra = sd["_extra_state"]
        if extra["num_classes"] != num_classes or extra["start"] != stop:
            raise ValueError(f"shards do not tile [0, {num_classes}): expected one starting at class {stop}, "
                             f"got classes [{extra['start']}, {extra['stop']}) of {extra['num_classes']}")
        stop = extra["stop"]
    if stop != num_classes:
        raise ValueError(f"shards cover classes [0, {stop}) of {num_classes}")
    return {"centers": torch.cat([sd["centers"] for sd in shards])}


class ShardedCenterContrastiveLoss(nn.Module):
    """Center Contrastive Loss with the center bank split by class across the ranks of a process group.

    Rank r owns classes ``[start, stop)`` (:func:`fastcdml.distributed.shard_range`; ``shard_sizes`` gives
    uneven slices) and stores only their centers: a ``(stop − start, embedding_dim)`` float32 (or ``dtype``)
    buffer ``centers``. Call ``loss_fn(embeddings, labels)`` on every rank of the group with that rank's batch
    (sizes may differ, even 0) and global labels in ``[0, num_classes)``; all ranks must call it together. The
    returned loss (``reduction`` over the rank's own rows) and its gradient for the rank's embeddings equal
    ``CenterContrastiveLoss`` with the full bank on that batch; in training mode the bank moves as the
    single-process bank does with the concatenated batch (momentum mode only: there is no learnable-proxy mode).
    The algorithm and its cost are in the module docstring.

    ``centers``: the full (num_classes, D) bank (each rank keeps its slice) or this rank's slice; by default
    Gaussian rows drawn in class blocks so that, when all ranks seed torch alike, the bank does not depend on the
    world size (it differs from ``CenterContrastiveLoss``'s random bank for the same seed).

    ``sample_rate < 1`` (Partial FC, An et al. 2021; training mode only): each rank scores its queries against
    the classes of its slice present in the global batch plus random others, ``ceil(sample_rate · C_r)`` centers
    in all (drawn from the rank's torch RNG), instead of the whole slice; the loss is then an approximation.

    Checkpoints: ``state_dict()`` holds the rank's slice and its class range; ``load_state_dict`` takes a
    state dict of the same slice or a full bank (``{"centers": (C, D)}``: from :meth:`full_state_dict`,
    :func:`merge_shards` or ``CenterContrastiveLoss``), which re-shards to any world size.

    ``stats`` (:class:`fastcdml.distributed.CommStats`): the bytes of each collective of the last step and in
    total, per rank, also logged at DEBUG level on the ``"fastcdml.distributed"`` logger; the formula is in the
    module docstring.
    """

    def __init__(
        self,
        num_classes: int,
        embedding_dim: int,
        temperature: float = 0.05,
        margin: float = 0.1,
        center_weight: float = 1.0,
        momentum: float = 0.9,
        reduction: str = "mean",
        backend: str = "auto",
        check_inputs: bool = True,
        centers: torch.Tensor | None = None,
        dtype: torch.dtype = torch.float32,
        generator: torch.Generator | None = None,
        shard_sizes: Sequence[int] | None = None,
        sample_rate: float = 1.0,
        process_group=None,
    ):
        super().__init__()
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("ShardedCenterContrastiveLoss needs torch.distributed.init_process_group() first")
        self.params = CenterParams(temperature, margin, center_weight)
        _check_module_args(num_classes, embedding_dim, momentum, reduction, backend, dtype)
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        self.num_classes, self.embedding_dim, self.momentum = num_classes, embedding_dim, momentum
        self.reduction, self.backend, self.check_inputs = reduction, backend, check_inputs
        self.sample_rate, self.process_group = sample_rate, process_group
        self.rank, self.world_size = dist.get_rank(process_group), dist.get_world_size(process_group)
        self.shard_sizes = [e - s for s, e in (shard_range(num_classes, self.world_size, r, shard_sizes)
                                               for r in range(self.world_size))]
        self.start, self.stop = shard_range(num_classes, self.world_size, self.rank, self.shard_sizes)
        local = self.stop - self.start
        if centers is None:
            centers = _random_rows(self.start, self.stop, embedding_dim, generator)
        elif tuple(centers.shape) == (num_classes, embedding_dim):
            centers = centers[self.start: self.stop]
        elif tuple(centers.shape) != (local, embedding_dim):
            raise ValueError(f"centers must have shape ({num_classes}, {embedding_dim}) or this rank's slice "
                             f"({local}, {embedding_dim}), got {tuple(centers.shape)}")
        self.register_buffer("centers", normalize_rows(centers.detach()).to(dtype).contiguous())
        self.stats = CommStats(self.world_size)

    def _check(self, embeddings, labels):
        backend = resolve(self.backend, "ccl", _checks.tensor(embeddings, "embeddings").device)
        _checks.embeddings(embeddings, "embeddings", backend, self.embedding_dim, self.check_inputs)
        _checks.same_device(self.centers, "centers", embeddings, "embeddings", "; move the loss with .to(device)")
        _checks.labels(labels, "labels", embeddings, "embeddings", self.num_classes, self.check_inputs)

    def _sampled(self, local_labels, own):
        """Partial FC: (centers subset, labels remapped into it) with every class present in the batch kept."""
        c = self.centers.shape[0]
        score = torch.rand(c, device=self.centers.device)
        score[local_labels[own]] = 2.0
        keep = score.topk(max(math.ceil(self.sample_rate * c), int((score > 1.0).sum()))).indices.sort().values
        remap = torch.full((c,), -1, dtype=torch.long, device=keep.device)
        remap[keep] = torch.arange(keep.numel(), device=keep.device)
        return self.centers[keep], torch.where(own, remap[local_labels.clamp(0, max(c - 1, 0))], -1)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self.stats.start_step(self.process_group)
        try:
            return self._step(embeddings, labels)
        finally:
            self.stats.log_step(type(self).__name__, self.process_group)

    def _step(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        xg, yg, sizes = gather_batch(embeddings, labels, lambda: self._check(embeddings, labels), self.process_group,
                                     self.stats)
        if sum(sizes) == 0:
            return _empty(embeddings, self.centers, self.reduction)
        local_labels = yg.to(self.centers.device) - self.start
        own = (local_labels >= 0) & (local_labels < self.centers.shape[0])
        centers, local_labels = self.centers, torch.where(own, local_labels, -1)
        if self.training and self.sample_rate < 1.0 and centers.shape[0]:
            centers, local_labels = self._sampled(local_labels, own)
        p = self.params
        rows = _ShardedRows.apply(embeddings, xg, local_labels, centers, sum(sizes[: self.rank]), p.temperature,
                                  p.margin, p.center_weight, self.process_group, self.stats)
        if not self.check_inputs:  # as CenterContrastiveLoss: an out-of-range label gives a NaN row
            mine = _part_of(yg, sizes, self.rank)
            rows = torch.where((mine >= 0) & (mine < self.num_classes), rows, torch.full_like(rows, math.nan))
        if self.training:
            center_momentum_update_(self.centers, xg[own], yg[own] - self.start, self.momentum, self.backend,
                                    check_inputs=False)
        if embeddings.shape[0] == 0:
            return _empty(embeddings, self.centers, self.reduction)  # after taking part in the collectives
        return _checks.reduce(rows, self.reduction)

    @torch.no_grad()
    def full_state_dict(self, dst: int | None = 0) -> dict | None:
        """Collective: ``{"centers": (num_classes, D)}`` on group rank ``dst`` (every rank when ``dst`` is None),
        None elsewhere. Save it to re-shard to another world size (this needs the full bank in one rank's memory;
        :func:`merge_shards` does the same offline from the per-rank files)."""
        full = gather_rows(self.centers, self.shard_sizes, dst, self.process_group)
        return None if full is None else {"centers": full}

    def get_extra_state(self) -> dict:
        return {"num_classes": self.num_classes, "start": self.start, "stop": self.stop}

    def set_extra_state(self, state: dict) -> None:
        mine = self.get_extra_state()
        if state != mine:
            raise ValueError(f"this checkpoint shard holds classes [{state['start']}, {state['stop']}) of "
                             f"{state['num_classes']} but rank {self.rank} owns [{self.start}, {self.stop}) of "
                             f"{self.num_classes}; load a full bank (full_state_dict or merge_shards) to re-shard")

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key, extra = prefix + "centers", prefix + "_extra_state"
        if extra in state_dict:
            self.set_extra_state(state_dict[extra])  # a wrong shard fails here, before any size-mismatch message
        elif key in state_dict and state_dict[key].shape[0] == self.num_classes:  # a full bank: take our slice
            state_dict = {**state_dict, key: state_dict[key][self.start: self.stop], extra: self.get_extra_state()}
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, embedding_dim={self.embedding_dim}, classes=[{self.start}, "
                f"{self.stop}) on rank {self.rank}/{self.world_size}, {self.params}, momentum={self.momentum}, "
                f"sample_rate={self.sample_rate}, reduction={self.reduction!r}, backend={self.backend!r}")

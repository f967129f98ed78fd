"""Class-sharded (model-parallel) Center Contrastive Loss: rank r holds the bank rows of a contiguous class slice.

:class:`ShardedBank` is the machinery; :class:`ShardedCenterContrastiveLoss` and the sharded margin-softmax
drop-ins (``fastcdml.losses.sharded_margin``) are its user APIs. Per step (B = B_global, the sum of the ranks'
batch sizes; C_r the classes of rank r, K bank rows per class):

1. :func:`fastcdml.distributed.gather_batch` checks the inputs on every rank (a bad label anywhere raises the same
   error everywhere) and all-gathers the embeddings and labels (detached).
2. Each rank runs the backend's ``ccl_partials`` (the fused ``ccl_fwd_partials`` op: the Triton or C++ forward
   kernel without its epilogue; or the reference) for every global row over its slice, labels mapped into it
   (a label of another slice is −1): the online-softmax partials of flash attention ``m``, ``l = Σ e^{z−m}``,
   ``lo`` (the same without the label's column), ``ps = Σ e^{z−m} c``, ``acc = Σ e^{z−m} W``, and where the slice
   owns the label its class cosine ``c_y`` and bank row (whose ``W_y`` the rank contributes).
3. An all-reduce MAX of ``m`` (B floats) and one reduce-scatter SUM of ``[acc·e, W_y, l·e, lo·e, c_y, ps·e]``,
   ``e = exp(m − M)`` (B × (2D + 4); B × 3 without a query gradient: ``[l·e, lo·e, c_y]``) give each rank, for its
   own rows, the exact global ``lse = M + log L``, ``q = 1 − p_y = LO/L`` and ``Σ_j p_j W_j = ACC/L``, hence the
   loss rows ``lse − t(c_y)/τ − 2λ c_y`` and the query gradient of the fused epilogue (``docs/spec.md``), computed
   in forward. (A reduce-scatter sends half the bytes of an all-reduce; a learnable bank also needs every row's
   lse and q: one more all-reduce of ``[l·e, lo·e]``, 2 floats per row.)
4. Each rank returns the loss of its own rows; backward of the embeddings multiplies the saved gradient rows by
   grad_output. In gradient mode it also all-gathers every row's grad_output (the gradient return, B_max floats
   per rank) and computes its slice's proxy gradient locally with the backend's ``ccl_slice_centers_grad``
   (``ccl_bwd_centers`` with ``foreign_labels``) from the global lse and q: W's gradient is never all-reduced.
5. In momentum mode, in training, each rank applies the momentum update to its own slice with the global rows
   whose labels fall in it (the backend's ``ccl_momentum_update``).

Communication per step and rank (logical payload, counted in ``stats``, formula in
:func:`fastcdml.distributed.step_bytes`): the preflight status table (32·W bytes), the all-gather of the
embeddings (W·B_max·D·itemsize, rows padded to the largest batch B_max) and labels (W·B_max·8), the MAX
all-reduce (B·c) and the SUM reduce-scatter (W·B_max·(2D + 4)·c), c = 4 (8 for float64 embeddings); in gradient
mode the all-reduce of ``[l·e, lo·e]`` (B·2·c) and the backward's all-gather of grad_output (W·B_max·c). A ring
sends (W−1)/W of each all-gather and reduce-scatter and 2(W−1)/W of each all-reduce per rank. Memory per rank: the C_r·K × D slice plus O(B·D).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.distributed as dist

from .. import _checks
from ..params import CenterParams
from ..distributed import CommStats, all_reduce, gather_batch, gather_rows, reduce_scatter_rows, shard_range
from ..reference.ccl import SlicePartials, ccl_epilogue, normalize_rows, partials_scale
from ._bank import Bank, ccl, check_args, empty_loss

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


class _ShardedRows(torch.autograd.Function):
    """Loss rows of this rank's queries against the sharded bank (module docstring, steps 2–4). The query
    gradient is computed in forward; the slice's proxy gradient (learnable mode) in backward."""

    @staticmethod
    def forward(ctx, x, bank, xg, local_labels, valid, sizes, params: CenterParams, backend, group, stats):
        rank = dist.get_rank(group)
        query_grad = ctx.needs_input_grad[0]
        p = SlicePartials(*ccl(backend).ccl_partials(xg, local_labels, bank, params.temperature, params.margin,
                                                     query_grad, params.margin_type, params.sub_centers))
        m_all = p.m.clone()
        all_reduce(m_all, dist.ReduceOp.MAX, group, stats, "max")
        e = partials_scale(p.m, m_all)
        scalars = [p.l * e, p.lo * e, p.c_y]
        if query_grad:
            w_y = p.acc.new_zeros(p.acc.shape)
            if bank.shape[0]:  # the owned labels' rows, gathered without a host sync
                rows_y = bank[p.row_y.clamp_min(0)].to(backend.operand_dtype(xg.dtype, bank.dtype))
                w_y = torch.where((p.row_y >= 0)[:, None], rows_y.to(w_y.dtype), w_y)
            scalars.append(p.ps * e)
            packed = torch.cat([p.acc * e[:, None], w_y, torch.stack(scalars, dim=1)], dim=1)
        else:
            packed = torch.stack(scalars, dim=1)
        mine = reduce_scatter_rows(packed, sizes, group, stats, "sum")  # this rank's rows, summed over the slices
        d = xg.shape[1]
        first = 2 * d if query_grad else 0  # [acc·e, W_y,] l·e, lo·e, c_y[, ps·e]
        l, lo, c_y = mine[:, first], mine[:, first + 1], mine[:, first + 2]
        rows = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
        hyper = params.as_args()[:4]
        if query_grad:  # the fused kernels' epilogue, on the combined partials
            acc, w_y, ps = mine[:, :d], mine[:, d: 2 * d], mine[:, -1]
            loss, grad = ccl_epilogue(xg[rows], c_y, m_all[rows] + torch.log(l), lo / l, *hyper,
                                      mean_row=acc / l[:, None], mean_dot=ps / l, w_y=w_y)
            grad = torch.where(valid[rows, None], grad, 0.0)
        else:
            loss, grad = ccl_epilogue(xg[rows], c_y, m_all[rows] + torch.log(l), lo / l, *hyper)
        loss = torch.where(valid[rows], loss, torch.full_like(loss, math.nan))
        ctx.needs_bank_grad = ctx.needs_input_grad[1]
        ctx.meta = (x.dtype, bank.dtype, sizes, params, backend, group, stats)
        saved = ()
        if ctx.needs_bank_grad:  # the slice's proxy gradient needs every row's lse and 1 − p_y
            sums = torch.stack(scalars[:2], dim=1)
            all_reduce(sums, dist.ReduceOp.SUM, group, stats, "lse")
            saved = (xg, local_labels, bank, m_all + torch.log(sums[:, 0]), sums[:, 1] / sums[:, 0], valid)
        ctx.save_for_backward(grad, *saved)
        return loss

    @staticmethod
    def backward(ctx, grad_rows):
        grad, *saved = ctx.saved_tensors
        x_dtype, bank_dtype, sizes, params, backend, group, stats = ctx.meta
        gx = gw = None
        if ctx.needs_input_grad[0]:
            gx = (grad_rows[:, None] * grad).to(x_dtype)
        if ctx.needs_bank_grad:  # the gradient return: every row's grad_output, from the rank that owns the row
            xg, local_labels, bank, lse, q, valid = saved
            g_all = gather_rows(grad_rows, sizes, group=group, stats=stats, name="grad_rows")
            g_all = torch.where(valid, g_all, 0.0) / dist.get_world_size(group)
            gw = ccl(backend).ccl_slice_centers_grad(xg, local_labels, bank, lse, q, g_all, *params.as_args())
            gw = gw.to(bank_dtype)
        return gx, gw, None, None, None, None, None, None, None, None


def merge_shards(state_dicts: Sequence[dict]) -> dict:
    """Offline: the per-rank ``state_dict()``s of one sharded loss (any order) → the full bank, ``{"centers":
    (C, D)}`` (:class:`ShardedCenterContrastiveLoss`) or ``{"W": (D, C·K)}`` (the sharded margin losses), loadable
    at any world size and by the single-process loss."""
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
    if "centers" in shards[0]:
        return {"centers": torch.cat([sd["centers"] for sd in shards])}
    return {"W": torch.cat([sd["W"] for sd in shards], dim=1)}


class ShardedBank(Bank):
    """What the class-sharded losses share: the slice of the bank this rank owns (a :class:`Bank` of the rank's
    C_r classes, same layouts and update modes), its checkpoints, the collective step."""

    def __init__(self, num_classes: int, embedding_size: int, params: CenterParams, update: str, momentum: float,
                 backend: str, check_inputs: bool, bank: torch.Tensor | None, dtype: torch.dtype,
                 generator: torch.Generator | None, shard_sizes: Sequence[int] | None, sample_rate: float,
                 process_group, normalize_init: bool = True, init=None):
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(f"{type(self).__name__} needs torch.distributed.init_process_group() first")
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        rank, world_size = dist.get_rank(process_group), dist.get_world_size(process_group)
        sizes = [e - s for s, e in (shard_range(num_classes, world_size, r, shard_sizes) for r in range(world_size))]
        start, stop = shard_range(num_classes, world_size, rank, sizes)
        k = params.sub_centers
        local = (stop - start) * k
        if bank is None and init is not None:  # PML's weight_init_func, on this rank's (D, C_r·K) columns
            bank = torch.empty(embedding_size, local)
            init(bank)
            bank = bank.t()
        elif bank is None:
            bank = _random_rows(start * k, stop * k, embedding_size, generator)
        elif tuple(bank.shape) == (num_classes * k, embedding_size):
            bank = bank[start * k: stop * k]
        elif tuple(bank.shape) != (local, embedding_size):
            raise ValueError(f"the bank must have {num_classes * k} rows (all classes) or this rank's {local} rows "
                             f"of {embedding_size} values, got {tuple(bank.shape)}")
        super().__init__(num_classes, embedding_size, params, update, momentum, backend, check_inputs, bank, dtype,
                         normalize_init)
        self.sample_rate, self.process_group = sample_rate, process_group
        self.rank, self.world_size, self.shard_sizes, self.start, self.stop = rank, world_size, sizes, start, stop
        self.stats = CommStats(self.world_size)

    def _gather(self, embeddings, labels, stats: CommStats | None = None):
        """The global batch ``(x, y, sizes)``; a bad input on any rank raises the same error on every rank."""
        return gather_batch(embeddings, labels, lambda: self._check(embeddings, labels, self._resolve(embeddings)),
                            self.process_group, stats)

    @torch.no_grad()
    def init_centers_(self, embeddings: torch.Tensor, labels: torch.Tensor):
        """Collective: set the bank row of every class in the labels of all ranks to ``normalize(mean x̂)`` of its
        rows over all ranks (each rank passes its part of, e.g., a pretrained network's training-set embeddings
        with global labels); each rank writes the rows of its own slice, in either update mode, and absent
        classes keep their values: the bank the single-process loss's ``init_centers_`` gives on the concatenated
        data. Returns self."""
        xg, yg, _ = self._gather(embeddings, labels)
        bank = self._stored_rows()
        if xg.shape[0] and bank.shape[0]:
            local = yg.to(bank.device) - self.start
            local = torch.where((local >= 0) & (local < self.stop - self.start), local, -1)
            new = ccl(self._resolve(embeddings)).ccl_momentum_update(
                bank.detach().contiguous(), xg.detach(), local, 0.0, self.sub_centers)  # μ = 0: the class means
            bank.copy_(new)
        return self

    def _sampled(self, bank, local_labels):
        """Partial FC: (bank rows of the kept classes, labels remapped into them), every class of the batch kept."""
        c, k = bank.shape[0] // self.params.sub_centers, self.params.sub_centers
        own = local_labels >= 0
        score = torch.rand(c, device=bank.device)
        score[local_labels[own]] = 2.0
        keep = score.topk(max(math.ceil(self.sample_rate * c), int((score > 1.0).sum()))).indices.sort().values
        remap = torch.full((c,), -1, dtype=torch.long, device=keep.device)
        remap[keep] = torch.arange(keep.numel(), device=keep.device)
        rows = (keep[:, None] * k + torch.arange(k, device=keep.device)).flatten()
        return bank[rows], torch.where(own, remap[local_labels.clamp(0, max(c - 1, 0))], -1)

    def loss_rows(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Collective: the loss rows (B_r,) of this rank's batch; in training mode, the momentum step."""
        self.stats.start_step(self.process_group)
        try:
            return self._step(embeddings, labels)
        finally:
            self.stats.log_step(type(self).__name__, self.process_group)

    def _step(self, embeddings, labels):
        xg, yg, sizes = self._gather(embeddings, labels, self.stats)
        bank = self.bank_rows()
        if sum(sizes) == 0:
            return empty_loss(embeddings, bank, "none")
        backend = self._resolve(embeddings)
        yg = yg.to(bank.device)
        local = yg - self.start
        local = torch.where((local >= 0) & (local < self.stop - self.start), local, -1)
        valid = (yg >= 0) & (yg < self.num_classes)  # with check_inputs=False a bad label gives a NaN row
        scored, scored_labels = bank, local
        if self.training and self.sample_rate < 1.0 and bank.shape[0]:
            scored, scored_labels = self._sampled(bank, local)
        rows = _ShardedRows.apply(embeddings, scored, xg, scored_labels, valid, sizes, self.params, backend,
                                  self.process_group, self.stats)
        if self.training and self.update == "momentum" and bank.shape[0]:
            self._momentum_step(backend, bank, xg, local)
        return rows

    def _reduce(self, rows: torch.Tensor, reduction: str) -> torch.Tensor:
        """``reduction`` of this rank's rows; an empty batch gives 0 (still in the graph: backward is a
        collective in gradient mode)."""
        if rows.shape[0] == 0 and reduction == "mean":
            return rows.sum()
        return _checks.reduce(rows, reduction)

    @torch.no_grad()
    def full_state_dict(self, dst: int | None = 0) -> dict | None:
        """Collective: the full bank (``{KEY: ...}`` in this loss's layout) on group rank ``dst`` (every rank
        when ``dst`` is None), None elsewhere. Save it to re-shard to another world size (this needs the full bank
        in one rank's memory; :func:`merge_shards` does the same offline from the per-rank files)."""
        k = self.params.sub_centers
        full = gather_rows(self._stored_rows(), [n * k for n in self.shard_sizes], dst, self.process_group)
        return None if full is None else {self.KEY: full.t() if self.COLUMNS else full}

    def get_extra_state(self) -> dict:
        return {"num_classes": self.num_classes, "start": self.start, "stop": self.stop}

    def set_extra_state(self, state: dict) -> None:
        mine = self.get_extra_state()
        if state != mine:
            raise ValueError(f"this checkpoint shard holds classes [{state['start']}, {state['stop']}) of "
                             f"{state['num_classes']} but rank {self.rank} owns [{self.start}, {self.stop}) of "
                             f"{self.num_classes}; load a full bank (full_state_dict or merge_shards) to re-shard")

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key, extra = prefix + self.KEY, prefix + "_extra_state"
        k, dim = self.params.sub_centers, 1 if self.COLUMNS else 0
        full = extra not in state_dict and key in state_dict and state_dict[key].shape[dim] == self.num_classes * k
        if extra in state_dict:
            self.set_extra_state(state_dict[extra])  # a wrong shard fails here, before any size-mismatch message
        elif full:  # a full bank (e.g. PML's W): our slice
            part = state_dict[key].narrow(dim, self.start * k, (self.stop - self.start) * k)
            state_dict = {**state_dict, key: part, extra: self.get_extra_state()}
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if self.update == "momentum" and full:  # the bank keeps unit, contiguous rows
            with torch.no_grad():
                self._set_rows(normalize_rows(self._stored_rows()).to(self._stored_rows().dtype).contiguous())

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, embedding_size={self.embedding_size}, classes=[{self.start}, "
                f"{self.stop}) on rank {self.rank}/{self.world_size}, {self.params}, update={self.update!r}, "
                f"momentum={self.momentum}, sample_rate={self.sample_rate}, backend={self.backend!r}")


class ShardedCenterContrastiveLoss(ShardedBank):
    """Center Contrastive Loss with the center bank split by class across the ranks of a process group.

    Rank r owns classes ``[start, stop)`` (:func:`fastcdml.distributed.shard_range`; ``shard_sizes`` gives
    uneven slices) and stores only their centers: ``centers``, a ``(stop − start, embedding_size)`` float32 (or
    ``dtype``) buffer of unit rows (``update="momentum"``) or Parameter (``update="gradient"``). Call
    ``loss_fn(embeddings, labels)`` on every rank of the group with that rank's batch (sizes may differ, even 0)
    and global labels in ``[0, num_classes)``; all ranks must call it together (and, in gradient mode, call
    backward together, as under DDP). The returned loss (``reduction`` over the rank's own rows) and its gradient
    for the rank's embeddings equal ``CenterContrastiveLoss`` with the full bank on that batch.

    ``update="momentum"``: in training mode the slice moves as the single-process bank does with the
    concatenated batch. ``update="gradient"``: each rank's slice is a learnable proxy matrix, normalised in
    forward; backward gives it the gradient DDP would give a replicated bank, the average over ranks of each
    rank's loss gradient (with equal batch sizes, the gradient of the single-process loss on the concatenated
    batch), computed on this rank from the global softmax statistics: no all-reduce of the bank's gradient, only
    an all-gather of the rows' grad_output. Do not wrap the loss in DDP (its parameters are not replicas).

    ``centers``: the full (num_classes, D) bank (each rank keeps its slice) or this rank's slice; by default
    Gaussian rows drawn in class blocks so that, when all ranks seed torch alike, the bank does not depend on the
    world size (it differs from ``CenterContrastiveLoss``'s random bank for the same seed).

    ``sample_rate < 1`` (Partial FC, An et al. 2021; training mode only): each rank scores its queries against
    the classes of its slice present in the global batch plus random others, ``ceil(sample_rate · C_r)`` centers
    in all (drawn from the rank's torch RNG), instead of the whole slice; the loss is then an approximation, and
    in gradient mode only the scored centers get a gradient.

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
        embedding_size: int | None = None,
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
        update: str = "momentum",
        **alias,
    ):
        embedding_size = _checks.embedding_size_alias(embedding_size, alias)
        if alias:
            raise TypeError(f"{type(self).__name__}.__init__() got an unexpected keyword argument "
                            f"{next(iter(alias))!r}")
        params = CenterParams(temperature, margin, center_weight)
        check_args(num_classes, embedding_size, update, momentum, backend, reduction, dtype)
        super().__init__(num_classes, embedding_size, params, update, momentum, backend, check_inputs, centers, dtype,
                         generator, shard_sizes, sample_rate, process_group)
        self.reduction = reduction

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self._reduce(self.loss_rows(embeddings, labels), self.reduction)

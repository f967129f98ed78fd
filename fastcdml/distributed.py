"""Multi-process training on ``torch.distributed`` (NCCL on GPUs, gloo on CPUs): the collectives the losses use.

Two modes (the README shows how to launch each with ``torchrun``):

* **Data parallel** (``CenterContrastiveLoss(distributed="auto")``): every rank keeps the whole bank. Each
  training step all-gathers the batch (embeddings in their own dtype, labels; batch sizes may differ per rank)
  and applies the momentum update to the *global* batch in rank order, so every rank's bank stays bit-identical
  to the single-process bank trained on the concatenated batches. The loss is the rank's own (local rows,
  local reduction) as usual under DDP. Gathering the B_global×D batch is cheaper than all-reducing per-class
  sums (C×D) as soon as C > B_global.
* **Class sharded** (:class:`fastcdml.losses.sharded_ccl.ShardedCenterContrastiveLoss`): rank r holds only a
  contiguous slice of the classes (:func:`shard_range`).

Every collective entry point first runs the caller's input checks on every rank and exchanges a small
status table: a bad input on one rank raises the same error on every rank (naming the rank) instead of
leaving the others blocked in a collective.

**Communication counters.** Both losses keep a :class:`CommStats` in their ``stats`` attribute: the bytes each
collective of a training step carried on this rank, computed from the shapes and dtypes at the call sites (no
extra synchronisation), and logged at DEBUG level on the ``"fastcdml.distributed"`` logger. The closed form
is :func:`step_bytes`; ``docs/scaling.md`` turns it into time.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.distributed as dist

_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_STATUS_FIELDS = 4  # [failed, B, D, dtype] as int64: the preflight table row of one rank
_LABEL_ITEMSIZE = 8  # labels travel as int64

log = logging.getLogger("fastcdml.distributed")

#: bytes a rank sends per byte of logical payload under the ring algorithm (NCCL's choice for large messages),
#: as a function of the world size W: the "bus bandwidth" factors of nccl-tests.
RING_FACTORS = {"all_gather": lambda w: (w - 1) / w, "reduce_scatter": lambda w: (w - 1) / w,
                "all_reduce": lambda w: 2 * (w - 1) / w}


@dataclass
class CommStats:
    """Bytes this rank moved through ``torch.distributed`` collectives in the loss's training steps.

    ``last_step`` maps ``"<collective>:<what>"`` to the **logical payload** of that collective in the most recent
    step, the nccl-tests convention: an all-gather counts its whole output (``W`` × the per-rank tensor, this
    rank's own part included), a reduce-scatter its whole input, an all-reduce its buffer. ``total`` sums
    ``last_step`` over ``steps``. The bytes actually sent by a rank depend on the algorithm; :meth:`ring_bytes`
    gives the ring algorithm's ``(W−1)/W`` × (all-gathers + reduce-scatters) + ``2(W−1)/W`` × all-reduces. Every
    rank records the same numbers (all-gathers and reduce-scatters are padded to the largest batch; all-reduces
    have the global size). The error path of the preflight (an
    ``all_gather_object`` of the exception, only when a step raises) is not counted.
    """

    world_size: int = 1
    steps: int = 0
    last_step: dict[str, int] = field(default_factory=dict)
    total: dict[str, int] = field(default_factory=dict)

    def start_step(self, group=None) -> None:
        self.world_size, self.steps, self.last_step = dist.get_world_size(group), self.steps + 1, {}

    def record(self, key: str, nbytes: int) -> None:
        self.last_step[key] = self.last_step.get(key, 0) + nbytes
        self.total[key] = self.total.get(key, 0) + nbytes

    @property
    def last_step_bytes(self) -> int:
        return sum(self.last_step.values())

    def ring_bytes(self, counts: dict[str, int] | None = None) -> float:
        """Bytes one rank sends for ``counts`` (default ``last_step``) under the ring algorithm."""
        counts = self.last_step if counts is None else counts
        return sum(RING_FACTORS[key.split(":")[0]](self.world_size) * n for key, n in counts.items())

    def log_step(self, owner: str, group=None) -> None:
        """One DEBUG line on the ``"fastcdml.distributed"`` logger with ``last_step``, if that level is on."""
        if log.isEnabledFor(logging.DEBUG):
            parts = ", ".join(f"{k}={v}" for k, v in self.last_step.items())
            log.debug("%s rank %d/%d step %d: %s; %d B logical, %.0f B sent by a ring", owner, dist.get_rank(group),
                      self.world_size, self.steps, parts, self.last_step_bytes, self.ring_bytes())

    def reset(self) -> None:
        self.steps, self.last_step, self.total = 0, {}, {}


def step_bytes(sizes: Sequence[int], dim: int, itemsize: int, sharded: bool, compute_itemsize: int = 4,
               query_grad: bool = True, bank_grad: bool = False) -> dict[str, int]:
    """The closed form of :attr:`CommStats.last_step` for one training step with per-rank batch sizes ``sizes``
    (W = len(sizes), B = Σ sizes, B_max = max sizes), embeddings of ``dim`` columns and ``itemsize`` bytes::

        all_gather:status      32·W                  preflight: [failed, B_r, D, dtype] as int64 per rank
        all_gather:embeddings  W·B_max·D·itemsize    the global batch, rows padded to B_max             (B > 0)
        all_gather:labels      W·B_max·8             int64                                              (B > 0)
        all_reduce:max         B·c                   sharded only: the row maxima                        (B > 0)
        reduce_scatter:sum     W·B_max·(2D + 4)·c    sharded only: [acc·e, W_y, l·e, lo·e, c_y, ps·e] to
                                                     the rank that owns each row                        (B > 0)
                               W·B_max·3·c           the same without a query gradient: [l·e, lo·e, c_y]
        all_reduce:lse         B·2·c                 sharded, learnable bank: [l·e, lo·e] of every row   (B > 0)
        all_gather:grad_rows   W·B_max·c             sharded, learnable bank: backward's grad_output     (B > 0)

    with ``c = compute_itemsize`` (4: float32 accumulation; 8 for float64 embeddings). The sharded loss computes
    the query gradient in forward from the reduce-scatter; only a learnable bank (``bank_grad``) needs every row's
    lse and its grad_output, the latter in backward (counted in the step of its forward). The data parallel
    ``CenterContrastiveLoss`` has only the first three (and none in evaluation mode).
    """
    w, b = len(sizes), sum(sizes)
    out = {"all_gather:status": _STATUS_FIELDS * 8 * w}
    if b == 0:
        return out
    out["all_gather:embeddings"] = w * max(sizes) * dim * itemsize
    out["all_gather:labels"] = w * max(sizes) * _LABEL_ITEMSIZE
    if sharded:
        out["all_reduce:max"] = b * compute_itemsize
        out["reduce_scatter:sum"] = w * max(sizes) * ((2 * dim + 4) if query_grad else 3) * compute_itemsize
        if bank_grad:
            out["all_reduce:lse"] = b * 2 * compute_itemsize
            out["all_gather:grad_rows"] = w * max(sizes) * compute_itemsize
    return out


def all_reduce(t: torch.Tensor, op=None, group=None, stats: CommStats | None = None, name: str = "sum") -> None:
    """``dist.all_reduce(t, op)`` in place (``op`` default SUM), counted in ``stats`` as ``"all_reduce:<name>"``."""
    if stats is not None:
        stats.record(f"all_reduce:{name}", t.numel() * t.element_size())
    dist.all_reduce(t, op=dist.ReduceOp.SUM if op is None else op, group=group)


def reduce_scatter_rows(t: torch.Tensor, sizes: Sequence[int], group=None, stats: CommStats | None = None,
                        name: str = "sum") -> torch.Tensor:
    """The sum over the ranks of ``t`` (B_global, F) (rows in rank order, ``sizes[r]`` rows of rank r), returned
    only for this rank's rows (sizes[rank], F): a reduce-scatter, each rank's rows padded to ``max(sizes)``, counted
    in ``stats`` as ``"reduce_scatter:<name>"`` (its whole input, ``len(sizes) × max(sizes)`` rows)."""
    b_max, rank = max(sizes), dist.get_rank(group)
    if min(sizes) == b_max:  # even batches: the rows are already laid out as the collective wants them
        padded = t.contiguous().view((len(sizes), b_max) + tuple(t.shape[1:]))
    else:
        padded = t.new_zeros((len(sizes), b_max) + tuple(t.shape[1:]))
        start = 0
        for r, n in enumerate(sizes):
            padded[r, :n] = t[start: start + n]
            start += n
    out = t.new_empty((b_max,) + tuple(t.shape[1:]))
    if stats is not None:
        stats.record(f"reduce_scatter:{name}", padded.numel() * padded.element_size())
    dist.reduce_scatter_tensor(out, padded.flatten(0, 1), group=group)
    return out[: sizes[rank]]


def enabled(distributed: bool | str, group=None) -> bool:
    """Whether a loss built with ``distributed=`` should synchronise: ``"auto"`` → torch.distributed is
    initialised with world size > 1; ``True`` → always (it must be initialised; world size 1 is allowed);
    ``False`` → never."""
    if distributed not in ("auto", True, False):
        raise ValueError(f"distributed must be 'auto', True or False, got {distributed!r}")
    if distributed is False:
        return False
    initialised = dist.is_available() and dist.is_initialized()
    if distributed is True and not initialised:
        raise RuntimeError("distributed=True needs torch.distributed.init_process_group() to have been called")
    if distributed == "auto":
        return initialised and dist.get_world_size(group) > 1
    return True


def comm_device(group=None) -> torch.device:
    """The device collectives of ``group`` run on: the current CUDA device for NCCL, else the CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _basic_check(embeddings, labels) -> None:
    if not isinstance(embeddings, torch.Tensor) or embeddings.dim() != 2:
        raise ValueError(f"embeddings must be a 2-D tensor, got {getattr(embeddings, 'shape', type(embeddings))}")
    if not isinstance(labels, torch.Tensor) or tuple(labels.shape) != (embeddings.shape[0],):
        raise ValueError(f"labels must have shape ({embeddings.shape[0]},), got {getattr(labels, 'shape', labels)}")


def preflight(check: Callable[[], None], embeddings, group=None, stats: CommStats | None = None) -> list[int]:
    """Run ``check()`` on every rank, then agree: returns the batch size of every rank, or raises on every rank.

    One all-gather of ``[failed, B, D, dtype]`` per rank; only when some rank failed, a second
    ``all_gather_object`` ships its exception type and message, and every rank raises ``type(f"rank r: msg")``
    for the lowest failing rank r. Embedding sizes or dtypes that differ across ranks raise ``ValueError``.
    """
    error = None
    try:
        check()
    except Exception as err:  # noqa: BLE001 - re-raised below, on every rank
        error = err
    ok_shape = error is None and isinstance(embeddings, torch.Tensor) and embeddings.dim() == 2
    info = [int(error is not None), embeddings.shape[0] if ok_shape else -1, embeddings.shape[1] if ok_shape else -1,
            _DTYPES.index(embeddings.dtype) if ok_shape and embeddings.dtype in _DTYPES else -1]
    world = dist.get_world_size(group)
    mine = torch.tensor(info, dtype=torch.int64, device=comm_device(group))
    table = [torch.empty_like(mine) for _ in range(world)]
    if stats is not None:
        stats.record("all_gather:status", world * mine.numel() * mine.element_size())
    dist.all_gather(table, mine, group=group)
    table = torch.stack(table).cpu().tolist()
    failed = [r for r, row in enumerate(table) if row[0]]
    if failed:
        errors = [None] * world
        dist.all_gather_object(errors, None if error is None else (type(error), str(error)), group=group)
        cls, message = errors[failed[0]]
        text = f"rank {failed[0]} of {world}: {message} (raised on every rank)"
        try:
            raised = cls(text)
        except Exception:  # noqa: BLE001 - an exception type with another signature
            raised = RuntimeError(f"{cls.__name__}: {text}")
        raise raised from error
    if len({row[2] for row in table}) > 1 or len({row[3] for row in table}) > 1:
        shapes = ", ".join(f"rank {r}: D={row[2]} {_DTYPES[row[3]]}" for r, row in enumerate(table))
        raise ValueError(f"embeddings must have the same size and dtype on every rank; got {shapes}")
    return [row[1] for row in table]


def gather_rows(t: torch.Tensor, sizes: Sequence[int], dst: int | None = None, group=None,
                stats: CommStats | None = None, name: str = "rows") -> torch.Tensor | None:
    """Concatenate ``t`` (sizes[rank], ...) of every rank in rank order, detached, on every rank (``dst=None``,
    all-gather) or only on group rank ``dst`` (gather; the others get None). Rows are padded to the largest
    size for the collective; 2-byte floats travel as their raw bytes (gloo gathers neither bfloat16 nor int16).
    ``stats`` counts the all-gather's output, ``len(sizes) × max(sizes)`` rows, as ``"all_gather:<name>"``."""
    wire, rest = t.detach().to(comm_device(group)).contiguous(), tuple(t.shape[1:])
    raw = wire.dtype in (torch.bfloat16, torch.float16)
    if raw:
        wire = wire.reshape(wire.shape[0], math.prod(rest)).view(torch.uint8)
    padded = wire.new_zeros((max(sizes),) + tuple(wire.shape[1:]))
    padded[: wire.shape[0]] = wire
    receive = dst is None or dist.get_rank(group) == dst
    parts = [torch.empty_like(padded) for _ in sizes] if receive else None
    if dst is None:
        if stats is not None:
            stats.record(f"all_gather:{name}", len(sizes) * padded.numel() * padded.element_size())
        dist.all_gather(parts, padded, group=group)
    else:
        dist.gather(padded, parts, dst=dst if group is None else dist.get_global_rank(group, dst), group=group)
    if not receive:
        return None
    out = torch.cat([p[:n] for p, n in zip(parts, sizes)])
    return (out.view(t.dtype).reshape((-1,) + rest) if raw else out).to(t.device)


def gather_batch(embeddings: torch.Tensor, labels: torch.Tensor, check: Callable[[], None] | None = None,
                 group=None, stats: CommStats | None = None) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """The global batch: ``(embeddings (B_global, D) in their dtype, labels (B_global,) int64, sizes)``, rows in
    rank order, detached; ``sizes[r]`` is rank r's batch size (rank r's rows start at ``sum(sizes[:r])``).

    ``check`` (default: shapes only) runs first on every rank through :func:`preflight`, so an invalid batch on
    any rank raises the same error everywhere and nothing is gathered. ``stats`` counts the three all-gathers
    (:func:`step_bytes`)."""
    sizes = preflight(check or (lambda: _basic_check(embeddings, labels)), embeddings, group, stats)
    if sum(sizes) == 0:
        return embeddings.detach(), labels.long(), sizes
    return (gather_rows(embeddings, sizes, group=group, stats=stats, name="embeddings"),
            gather_rows(labels.long(), sizes, group=group, stats=stats, name="labels"), sizes)


def gather_references(embeddings: torch.Tensor, labels: torch.Tensor, group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The other ranks' embeddings and labels, detached: a reference set of cross-rank negatives for CBML::

        ref, ref_labels = gather_references(x, y)
        loss = contrastive_bayesian_loss(x, y, ref, ref_labels, include_self=True)

    The reference set of rank r is then its own batch (self pairs excluded, gradient flows) followed by every
    other rank's batch (no gradient), so each row's loss value equals that row's loss in a single process on the
    concatenated batch (up to summation order). Gradient semantics, as in pytorch-metric-learning's
    ``DistributedLossWrapper(efficient=True)``: rank r differentiates only its own rows' losses, and other
    ranks' embeddings are constants, so the pair terms where a rank-r embedding is the *reference* of another
    rank's anchor give it no gradient. After DDP averages the gradients this is not the gradient of the global
    loss (it misses those cross-rank reference terms) but it costs one detached all-gather and no extra memory
    for the other ranks' graphs. Returns ``((B_global − B_r, D), (B_global − B_r,) int64)``.
    """
    emb, lab, sizes = gather_batch(embeddings, labels, group=group)
    start = sum(sizes[: dist.get_rank(group)])
    keep = torch.ones(emb.shape[0], dtype=torch.bool, device=emb.device)
    keep[start: start + embeddings.shape[0]] = False
    return emb[keep], lab[keep]


def shard_range(num_classes: int, world_size: int, rank: int, sizes: Sequence[int] | None = None) -> tuple[int, int]:
    """``[start, stop)``: the contiguous class slice rank ``rank`` owns. By default the first
    ``num_classes % world_size`` ranks own one class more than the others; ``sizes`` (one count ≥ 0 per rank,
    summing to ``num_classes``) chooses uneven slices."""
    if sizes is None:
        base, extra = divmod(num_classes, world_size)
        sizes = [base + (r < extra) for r in range(world_size)]
    if len(sizes) != world_size or sum(sizes) != num_classes or min(sizes) < 0:
        raise ValueError(f"shard sizes {list(sizes)} must be {world_size} counts >= 0 summing to {num_classes}")
    start = sum(sizes[:rank])
    return start, start + sizes[rank]

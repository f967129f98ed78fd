"""torch.distributed modes on CPU with gloo: the data-parallel bank, cross-rank CBML references and the
class-sharded CCL, each against the single-process computation on the concatenated batch.

Every rank of a scenario builds the same data from one seed, takes its part, runs the distributed code and checks
it against the single-process reference, which it also computes. The ranks live in one spawned pool per world
size (started once: importing torch costs seconds per process); every wait has a timeout, so a hang fails.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import queue
import socket
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastcdml
from fastcdml.distributed import enabled, gather_batch, gather_references, shard_range
from fastcdml.functional import contrastive_bayesian_loss
from fastcdml.losses.sharded_ccl import merge_shards
from fastcdml.reference import cbml_loss_rows, ccl_loss_rows

from fastcdml._backend import unavailable_reason

from .helpers import FLOOR, rel_err

SCENARIO_TIMEOUT_S = 60  # per scenario, on top of STARTUP_TIMEOUT_S for the first one of a pool
STARTUP_TIMEOUT_S = 180  # spawning and importing torch in every rank, on a busy machine
C, D = 13, 8  # 13 classes: uneven slices over 2 and 3 ranks
DTYPE_BACKENDS = [(torch.float64, "reference"), (torch.float32, "auto")]  # float64 only in the reference
# every backend of the sharded step on the gloo ranks' CPU tensors: the reference, the C++ kernels and the Triton
# kernels (through the interpreter: on a CUDA machine they are checked on NCCL by the gpu-marked test instead)
KERNEL_BACKENDS = [b for b in ("cpp", "triton") if unavailable_reason(b, "ccl", "cpu") is None]
EVERY_BACKEND = [pytest.param(torch.float64, "reference", id="float64")] + [
    pytest.param(torch.float32, b, id=f"float32-{b}") for b in KERNEL_BACKENDS]


# --- the pool of ranks -----------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, backend, port, tasks, results):
    torch.set_num_threads(1)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=STARTUP_TIMEOUT_S))
    while True:  # until the test process kills it
        name, args = tasks.get()
        try:
            torch.manual_seed(0)
            globals()[name](rank, world, *args)
            results.put((rank, None))
        except BaseException:  # noqa: BLE001 - reported to the test process
            results.put((rank, traceback.format_exc()))


class _Pool:
    def __init__(self, world: int, backend: str):
        ctx = mp.get_context("spawn")
        self.world, self.results, self.started = world, ctx.Queue(), False
        self.tasks = [ctx.Queue() for _ in range(world)]
        port = _free_port()
        self.procs = [ctx.Process(target=_worker, args=(r, world, backend, port, self.tasks[r], self.results),
                                  daemon=True) for r in range(world)]
        for p in self.procs:
            p.start()

    def run(self, name: str, *args) -> None:
        for q in self.tasks:
            q.put((name, args))
        errors, timeout = {}, SCENARIO_TIMEOUT_S + (0 if self.started else STARTUP_TIMEOUT_S)
        self.started = True
        for _ in range(self.world):
            try:
                rank, error = self.results.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(f"{name} on {self.world} ranks did not finish in {timeout} s") from None
            if error:
                errors[rank] = error
        if errors:
            raise AssertionError("\n".join(f"--- rank {r} ---\n{e}" for r, e in sorted(errors.items())))

    def close(self) -> None:
        for p in self.procs:
            p.kill()  # a clean exit is no part of the test; on a busy machine it takes seconds
        for p in self.procs:
            p.join()


@pytest.fixture(scope="module")
def ranks():
    """``ranks(world, scenario, *args, backend="gloo")`` runs ``scenario`` on every rank; a failed pool is
    replaced."""
    pools: dict[tuple[int, str], _Pool] = {}

    def run(world, name, *args, backend="gloo"):
        key = (world, backend)
        pool = pools.get(key) or pools.setdefault(key, _Pool(world, backend))
        try:
            pool.run(name, *args)
        except BaseException:
            pools.pop(key).close()  # the ranks may be out of step: start afresh
            raise

    yield run
    for pool in pools.values():
        pool.close()


# --- data shared by the ranks ----------------------------------------------------------------------------------

def _sizes(world, step):
    """Uneven per-rank batch sizes; some ranks get none at some steps."""
    return [(3 + 2 * r + step) % 6 for r in range(world)]


def _batch(world, step, dtype, label_hi=C):
    """Embeddings near their class centers (the target logit matters), unnormalised, labels in [0, label_hi)."""
    g = torch.Generator().manual_seed(100 + step)
    n = sum(_sizes(world, step))
    y = torch.randint(0, label_hi, (n,), generator=g)
    x = (_bank().double()[y] + 0.4 * torch.randn(n, D, generator=g, dtype=torch.float64)) * 3
    return x.to(dtype), y


def _part(t, world, step, rank):
    sizes = _sizes(world, step)
    start = sum(sizes[:rank])
    return t[start: start + sizes[rank]]


def _bank():
    w = torch.randn(C, D, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    return (w / w.norm(dim=1, keepdim=True)).float()


def _close(actual, expected, dtype, what):
    err = rel_err(actual, expected)
    assert err <= FLOOR[dtype], f"{what}: relative error {err:.2e} > {FLOOR[dtype]:.0e} ({dtype})"


def _check_step(loss_fn, ref_fn, x_all, y_all, world, step, rank, dtype, what):
    """One training step of ``loss_fn`` on this rank's part vs ``ref_fn`` (single process, reduction none) on the
    whole batch: the rank's loss and embedding gradient."""
    x = _part(x_all, world, step, rank).clone().requires_grad_()
    loss = loss_fn(x, _part(y_all, world, step, rank))
    (grad,) = torch.autograd.grad(loss, x)
    xr = x_all.clone().requires_grad_()
    rows = _part(ref_fn(xr, y_all), world, step, rank)
    ref = rows.mean() if rows.numel() else xr.sum() * 0.0
    (ref_grad,) = torch.autograd.grad(ref, xr)
    _close(loss, ref, dtype, f"{what} loss, step {step}")
    _close(grad, _part(ref_grad, world, step, rank), dtype, f"{what} gradient, step {step}")


# --- scenarios (run on every rank) -----------------------------------------------------------------------------

def _dp_matches_single_process(rank, world, dtype, backend):
    kw = dict(centers=_bank(), backend=backend)
    dp = fastcdml.CenterContrastiveLoss(C, D, **kw)  # distributed="auto": on, the group has world > 1 ranks
    ref = fastcdml.CenterContrastiveLoss(C, D, reduction="none", distributed=False, **kw)
    for step in range(4):
        x_all, y_all = _batch(world, step, dtype, label_hi=5)  # few classes: several rows per class
        _check_step(dp, ref, x_all, y_all, world, step, rank, dtype, "data parallel")
        _close(dp.centers, ref.centers, dtype, f"bank after step {step}")
    assert not torch.equal(dp.centers, _bank()), "the bank never moved"


def _bad_label_fails_everywhere(rank, world):
    bad = world - 1
    dp = fastcdml.CenterContrastiveLoss(C, D, centers=_bank(), backend="reference")
    sharded = fastcdml.ShardedCenterContrastiveLoss(C, D, centers=_bank(), backend="reference")
    x = torch.randn(3, D)
    y = torch.tensor([0, 1, C if rank == bad else 2])
    for loss_fn in (dp, sharded):
        with pytest.raises(ValueError, match=rf"^rank {bad} of {world}: labels must lie in \[0, {C}\)"):
            loss_fn(x, y)
    wrong_dim = torch.randn(3, D + (rank == 0))
    with pytest.raises(ValueError, match=r"^rank 0 of .*embedding_size"):
        dp(wrong_dim, torch.zeros(3, dtype=torch.long))
    assert torch.equal(dp.centers, _bank()) and torch.equal(sharded.centers, _bank()[sharded.start: sharded.stop])
    unchecked = fastcdml.ShardedCenterContrastiveLoss(C, D, centers=_bank(), reduction="none", check_inputs=False)
    rows = unchecked(x, y)  # as unsharded: a NaN row for the bad label, the bank untouched by it
    assert torch.equal(torch.isnan(rows), torch.tensor([False, False, rank == bad]))
    dp(x, torch.zeros(3, dtype=torch.long))  # the ranks are still in step: the next collective works
    banks = [torch.empty_like(dp.centers) for _ in range(world)]
    dist.all_gather(banks, dp.centers)
    assert all(torch.equal(b, banks[0]) for b in banks) and not torch.equal(banks[0], _bank())


def _cbml_cross_rank_references(rank, world):
    x_all, _ = _batch(world, 0, torch.float64)
    y_all = torch.arange(x_all.shape[0]) % 3
    x, y = _part(x_all, world, 0, rank).clone().requires_grad_(), _part(y_all, world, 0, rank)
    ref, ref_labels = gather_references(x, y)
    assert not ref.requires_grad and ref.shape[0] == x_all.shape[0] - x.shape[0]
    loss = contrastive_bayesian_loss(x, y, ref, ref_labels, include_self=True, backend="reference")
    (grad,) = torch.autograd.grad(loss, x)
    # Single process: the rank's rows of the loss on the concatenated batch, other ranks' embeddings constant.
    mine = torch.zeros(x_all.shape[0], dtype=torch.bool)
    _part(mine, world, 0, rank).fill_(True)
    xr = x_all.clone().requires_grad_()
    xs = torch.where(mine[:, None], xr, x_all)
    rows = cbml_loss_rows(xs, y_all)
    expected = rows[mine].sum() / max(int(mine.sum()), 1)
    (expected_grad,) = torch.autograd.grad(expected, xr)
    _close(loss, expected, torch.float64, "CBML loss with cross-rank references")
    _close(grad, expected_grad[mine], torch.float64, "CBML gradient with cross-rank references")
    total = loss.detach() * x.shape[0]
    dist.all_reduce(total)
    _close(total / x_all.shape[0], rows.sum() / x_all.shape[0], torch.float64, "global CBML loss")


def _sharded_matches_unsharded(rank, world, dtype, backend, shard_sizes):
    kw = dict(centers=_bank(), backend=backend)
    if dtype == torch.float64:  # float32 runs the defaults
        kw.update(temperature=0.1, margin=0.3, center_weight=0.25)
    sharded = fastcdml.ShardedCenterContrastiveLoss(C, D, shard_sizes=shard_sizes, **kw)
    ref = fastcdml.CenterContrastiveLoss(C, D, reduction="none", distributed=False, **kw)
    start, stop = shard_range(C, world, rank, shard_sizes)
    assert (sharded.start, sharded.stop) == (start, stop) and sharded.centers.shape == (stop - start, D)
    for step in range(3):
        # step 1: every label in rank 0's slice, so the other ranks own no class of the batch
        x_all, y_all = _batch(world, step, dtype, label_hi=sharded.shard_sizes[0] if step == 1 else C)
        _check_step(sharded, ref, x_all, y_all, world, step, rank, dtype, "sharded")
        _close(sharded.centers, ref.centers[start:stop], dtype, f"bank slice after step {step}")
    sharded.eval()
    x_all, y_all = _batch(world, 3, dtype)
    before = sharded.centers.clone()
    _check_step(sharded, ref.eval(), x_all, y_all, world, 3, rank, dtype, "sharded, eval mode")
    assert torch.equal(sharded.centers, before)


def _learnable_step(sharded_loss, single_rows, single_params, x_all, y_all, world, step, rank, dtype, what):
    """One optimizer-free step: the rank's loss and embedding gradient against the single process, and the bank
    gradient of the sharded slice against the single-process gradient of Σ_r (rank r's mean loss) / W (DDP's
    average of the ranks' gradients). ``single_rows(x)`` gives the single process's per-row losses on the whole
    batch; ``sharded_loss(x, y)`` the rank's loss. Returns (sharded bank gradient, single bank gradients)."""
    x = _part(x_all, world, step, rank).clone().requires_grad_()
    loss = sharded_loss(x, _part(y_all, world, step, rank))
    loss.backward()  # a collective in gradient mode: every rank calls it
    xr = x_all.clone().requires_grad_()
    rows = single_rows(xr)
    means = [(_part(rows, world, step, r).mean() if _sizes(world, step)[r] else rows.sum() * 0.0)
             for r in range(world)]
    (ref_grad,) = torch.autograd.grad(means[rank], xr, retain_graph=True)
    _close(loss, means[rank], dtype, f"{what} loss, step {step}")
    _close(x.grad, _part(ref_grad, world, step, rank), dtype, f"{what} embedding gradient, step {step}")
    return torch.autograd.grad(sum(means) / world, single_params)


def _sharded_init_centers_matches_unsharded(rank, world, backend, update):
    """Every rank passes its part of the data; each slice gets the rows the single-process bank gets from all."""
    x_all, y_all = _batch(world, 0, torch.float32, label_hi=C - 3)  # the last 3 classes are absent
    kw = dict(centers=_bank(), backend=backend, update=update)
    sharded = fastcdml.ShardedCenterContrastiveLoss(C, D, shard_sizes=[6, 0, 7][:world] if world == 3 else None,
                                                    **kw)
    single = fastcdml.CenterContrastiveLoss(C, D, distributed=False, **kw).init_centers_(x_all, y_all)
    assert sharded.init_centers_(_part(x_all, world, 0, rank), _part(y_all, world, 0, rank)) is sharded
    _close(sharded.centers.detach(), single.centers.detach()[sharded.start:sharded.stop], torch.float32,
           "initialised slice")


def _sharded_learnable_matches_single_process(rank, world, dtype, backend, shard_sizes):
    kw = dict(centers=_bank(), backend=backend, update="gradient", temperature=0.1, margin=0.2, center_weight=0.25)
    sharded = fastcdml.ShardedCenterContrastiveLoss(C, D, shard_sizes=shard_sizes, **kw)
    single = fastcdml.CenterContrastiveLoss(C, D, reduction="none", distributed=False, **kw)
    assert isinstance(sharded.centers, torch.nn.Parameter)
    start, stop = sharded.start, sharded.stop
    opts = [torch.optim.SGD(m.parameters(), lr=0.5) for m in (sharded, single)]
    for step in range(4):  # step 1: every label in rank 0's slice
        x_all, y_all = _batch(world, step, dtype, label_hi=sharded.shard_sizes[0] if step == 1 else C)
        for opt in opts:
            opt.zero_grad()
        (single_grad,) = _learnable_step(sharded, lambda xr: single(xr, y_all), [single.centers], x_all, y_all,
                                         world, step, rank, dtype, "learnable sharded")
        _close(sharded.centers.grad, single_grad[start:stop], dtype, f"slice gradient, step {step}")
        single.centers.grad = single_grad
        for opt in opts:
            opt.step()
        _close(sharded.centers, single.centers[start:stop], dtype, f"slice after step {step}")
    # it trains: the global loss of a fixed batch (the mean over all ranks' rows) falls
    x_all, y_all = _batch(world, 0, dtype)
    x, y = _part(x_all, world, 0, rank), _part(y_all, world, 0, rank)
    losses = []
    for _ in range(8):
        opts[0].zero_grad()
        loss = sharded(x, y)
        loss.backward()
        opts[0].step()
        total = loss.detach() * x.shape[0]
        dist.all_reduce(total)
        losses.append(total.item() / x_all.shape[0])
    assert losses[-1] < losses[0] - 0.1, losses


def _sharded_margin_dropins_match(rank, world, backend):
    from fastcdml.losses import sharded_margin

    cases = [("NormalizedSoftmaxLoss", dict(temperature=0.1)), ("CosFaceLoss", dict(margin=0.2, scale=8)),
             ("ArcFaceLoss", dict(margin=20.0, scale=8)), ("SubCenterArcFaceLoss", dict(scale=8, sub_centers=2))]
    for name, kw in cases:
        single = getattr(fastcdml, name)(C, D, **kw)
        sharded = getattr(sharded_margin, "Sharded" + name)(C, D, backend=backend, shard_sizes=[5, 0, 8][:world]
                                                             if world == 3 else None, **kw)
        sharded.load_state_dict(single.state_dict())  # PML's full W: each rank keeps its columns
        k = single.sub_centers
        cols = slice(sharded.start * k, sharded.stop * k)
        assert torch.equal(sharded.W, single.W[:, cols])
        opts = [torch.optim.SGD(m.parameters(), lr=0.2) for m in (sharded, single)]
        for step in range(3):
            x_all, y_all = _batch(world, step, torch.float32)
            for opt in opts:
                opt.zero_grad()

            def rows(xr):  # the single process's per-row losses: the reference on its normalised W
                return ccl_loss_rows(xr, y_all, single.bank_rows(), *dataclasses.astuple(single.params))

            (single_grad,) = _learnable_step(sharded, rows, [single.W], x_all, y_all, world, step, rank,
                                             torch.float32, f"Sharded{name}")
            _close(sharded.W.grad, single_grad[:, cols], torch.float32, f"Sharded{name} W gradient, step {step}")
            single.W.grad = single_grad
            for opt in opts:
                opt.step()
        _close(sharded.W, single.W[:, cols], torch.float32, f"Sharded{name} W after 3 steps")
        full = sharded.full_state_dict(dst=None)
        _close(full["W"], single.W, torch.float32, f"Sharded{name} gathered W")
        logits = sharded.get_logits(x_all)
        _close(logits, single.get_logits(x_all)[:, sharded.start: sharded.stop], torch.float32, "slice logits")
    # momentum mode with sub-centers: the slice moves as the single-process bank does
    single = fastcdml.SubCenterArcFaceLoss(C, D, sub_centers=2, update="momentum", backend=backend)
    sharded = sharded_margin.ShardedSubCenterArcFaceLoss(C, D, sub_centers=2, update="momentum", backend=backend)
    sharded.load_state_dict(single.state_dict())
    for step in range(3):
        x_all, y_all = _batch(world, step, torch.float32)
        sharded(_part(x_all, world, step, rank), _part(y_all, world, step, rank))
        single(x_all, y_all)
        _close(sharded.W, single.W[:, sharded.start * 2: sharded.stop * 2], torch.float32, f"momentum W, {step}")


def _sharded_16bit_matches_fused_single_process(rank, world):
    """fp16 queries on the Triton kernels (fp16 products): the sharded loss and query gradient equal the fused
    single-process ones to the gradient's own fp16 rounding (the label's W_y is rounded to the operand dtype as in
    the fused epilogue, ``Backend.operand_dtype``)."""
    kw = dict(centers=_bank(), backend="triton", reduction="none")
    sharded = fastcdml.ShardedCenterContrastiveLoss(C, D, **kw)
    single = fastcdml.CenterContrastiveLoss(C, D, distributed=False, **kw)
    x_all, y_all = _batch(world, 0, torch.float16)
    x, xr = _part(x_all, world, 0, rank).clone().requires_grad_(), x_all.clone().requires_grad_()
    rows = sharded(x, _part(y_all, world, 0, rank))
    (grad,) = torch.autograd.grad(rows.sum(), x)
    ref_rows = single(xr, y_all)
    (ref_grad,) = torch.autograd.grad(ref_rows.sum(), xr)
    assert rel_err(rows, _part(ref_rows, world, 0, rank)) < 1e-5
    assert rel_err(grad, _part(ref_grad, world, 0, rank)) <= 2 * 2.0**-11  # an fp16 ulp or two


def _sharded_sampling(rank, world):
    full = fastcdml.ShardedCenterContrastiveLoss(C, D, centers=_bank(), backend="reference", reduction="none")
    sampled = fastcdml.ShardedCenterContrastiveLoss(C, D, centers=_bank(), backend="reference", reduction="none",
                                                     sample_rate=0.3)
    x_all, y_all = _batch(world, 0, torch.float32)
    x, y = _part(x_all, world, 0, rank), _part(y_all, world, 0, rank)
    rows_full, rows_sampled = full(x, y), sampled(x, y)
    # fewer negatives, same positive: every row's loss can only drop, and the update does not depend on sampling
    assert torch.isfinite(rows_sampled).all() and (rows_sampled <= rows_full + 1e-5).all()
    assert (rows_sampled < rows_full - 1e-3).any() or x.shape[0] == 0
    assert torch.equal(sampled.centers, full.centers)
    # gradient mode: only the scored centers (every class of the batch among them) get a gradient
    learnable = fastcdml.ShardedCenterContrastiveLoss(C, D, centers=_bank(), backend="reference", update="gradient",
                                                      sample_rate=0.3)
    learnable(x.clone().requires_grad_(), y).backward()
    touched = learnable.centers.grad.abs().sum(dim=1) > 0
    local = y_all - learnable.start
    present = torch.zeros_like(touched)
    present[local[(local >= 0) & (local < touched.numel())]] = True
    budget = max(-(-3 * touched.numel() // 10), int(present.sum()))
    assert bool(touched[present].all()) and int(touched.sum()) <= budget


def _checkpoint_save_two(rank, world, directory):
    sharded = fastcdml.ShardedCenterContrastiveLoss(C, D, centers=_bank(), backend="reference")
    for step in range(2):
        x_all, y_all = _batch(world, step, torch.float32)
        sharded(_part(x_all, world, step, rank), _part(y_all, world, step, rank))
    torch.save(sharded.state_dict(), os.path.join(directory, f"shard{rank}.pt"))
    full = sharded.full_state_dict(dst=0)
    assert (full is None) == (rank != 0)
    if rank == 0:
        torch.save(full, os.path.join(directory, "full.pt"))
    reloaded = fastcdml.ShardedCenterContrastiveLoss(C, D, backend="reference")
    reloaded.load_state_dict(torch.load(os.path.join(directory, f"shard{rank}.pt")))
    assert torch.equal(reloaded.centers, sharded.centers)


def _checkpoint_load_three(rank, world, directory):
    shards = [torch.load(os.path.join(directory, f"shard{r}.pt")) for r in range(2)]
    full = torch.load(os.path.join(directory, "full.pt"))
    assert torch.equal(merge_shards(shards[::-1])["centers"], full["centers"])
    sharded = fastcdml.ShardedCenterContrastiveLoss(C, D, backend="reference")
    with pytest.raises(ValueError, match="load a full bank"):
        sharded.load_state_dict(shards[0])  # the 2-rank slice [0, 7) is not this rank's slice of 3
    sharded.load_state_dict(full)
    # single process: the same 2 steps on the 2-rank batches, then 2 more on the 3-rank batches
    ref = fastcdml.CenterContrastiveLoss(C, D, centers=_bank(), backend="reference", reduction="none",
                                         distributed=False)
    for step in range(2):
        ref(*_batch(2, step, torch.float32))
    _close(sharded.centers, ref.centers[sharded.start: sharded.stop], torch.float32, "re-sharded bank")
    for step in range(2, 4):
        x_all, y_all = _batch(world, step, torch.float32)
        _check_step(sharded, ref, x_all, y_all, world, step, rank, torch.float32, "re-sharded")
    unsharded = fastcdml.CenterContrastiveLoss(C, D, distributed=False)
    unsharded.load_state_dict(sharded.full_state_dict(dst=None))
    _close(unsharded.centers, ref.centers, torch.float32, "gathered bank")


@contextlib.contextmanager
def _traffic():
    """Intercept the torch.distributed collectives: yields a list that fills with ``(collective, bytes)``, the
    logical payload of each call measured on the tensors actually passed (an all-gather's output list, a
    reduce-scatter's input, an all-reduce's buffer); any other collective is recorded with -1 bytes so that it
    shows up."""
    seen, originals = [], {}

    def counting(name, size):
        original = originals[name] = getattr(dist, name)

        def call(*args, **kwargs):
            seen.append((name, size(*args, **kwargs)))
            return original(*args, **kwargs)
        return call

    sizes = {"all_gather": lambda outs, t, **kw: sum(o.numel() * o.element_size() for o in outs),
             "reduce_scatter_tensor": lambda out, t, **kw: t.numel() * t.element_size(),
             "all_reduce": lambda t, **kw: t.numel() * t.element_size()}
    others = ("all_gather_into_tensor", "all_gather_object", "broadcast", "gather", "reduce", "reduce_scatter",
              "scatter", "all_to_all", "all_to_all_single", "send", "recv", "barrier")
    for name in sizes.keys() | set(others):
        setattr(dist, name, counting(name, sizes.get(name, lambda *a, **kw: -1)))
    try:
        yield seen
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _comm_stats_match_formula(rank, world, dtype, backend):
    from fastcdml.distributed import RING_FACTORS, step_bytes
    e = torch.empty((), dtype=dtype).element_size()
    c = 8 if dtype == torch.float64 else 4  # the accumulation dtype's size
    sharded = fastcdml.ShardedCenterContrastiveLoss(C, D, centers=_bank(), backend=backend)
    learnable = fastcdml.ShardedCenterContrastiveLoss(C, D, centers=_bank(), backend=backend, update="gradient")
    dp = fastcdml.CenterContrastiveLoss(C, D, centers=_bank(), backend=backend)
    logger, handler = logging.getLogger("fastcdml.distributed"), _Records()
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    totals = {id(sharded): {}, id(learnable): {}, id(dp): {}}
    try:
        # uneven sizes with an empty rank at steps 1 (world 3) and 3, then a step where every rank is empty
        for step in range(5):
            sizes = _sizes(world, step) if step < 4 else [0] * world
            if step < 4:
                x_all, y_all = _batch(world, step, dtype)
                x, y = _part(x_all, world, step, rank), _part(y_all, world, step, rank)
            else:
                x, y = torch.empty(0, D, dtype=dtype), torch.empty(0, dtype=torch.long)
            w, b, b_max = world, sum(sizes), max(sizes)
            if b:  # the gathered batch is bit-exact in every dtype (2-byte floats travel as raw bytes)
                xg, yg, got_sizes = gather_batch(x, y)
                assert got_sizes == sizes and torch.equal(xg, x_all) and torch.equal(yg, y_all)
            for loss_fn, is_sharded in ((sharded, True), (learnable, True), (dp, False)):
                # the formula of step_bytes' docstring, written out
                bank_grad = loss_fn is learnable
                expected = {"all_gather:status": 32 * w}
                if b:
                    expected.update({"all_gather:embeddings": w * b_max * D * e, "all_gather:labels": w * b_max * 8})
                    if is_sharded:
                        expected.update({"all_reduce:max": b * c, "reduce_scatter:sum": w * b_max * (2 * D + 4) * c})
                    if bank_grad:  # every row's lse; backward returns every row's grad_output to the ranks
                        expected.update({"all_reduce:lse": b * 2 * c, "all_gather:grad_rows": w * b_max * c})
                with _traffic() as seen:
                    loss_fn(x.clone().requires_grad_(), y).backward()  # moves nothing unless the bank learns
                name = type(loss_fn).__name__
                assert loss_fn.stats.last_step == expected, f"{name} step {step}: {loss_fn.stats.last_step}"
                assert step_bytes(sizes, D, e, is_sharded, c, bank_grad=bank_grad) == expected
                # the counters saw every collective that ran, with its real size
                measured = {}
                for collective, nbytes in seen:  # reduce_scatter_tensor is the counters' reduce_scatter
                    collective = collective.replace("reduce_scatter_tensor", "reduce_scatter")
                    measured[collective] = measured.get(collective, 0) + nbytes
                counted = {}
                for key, nbytes in expected.items():
                    counted[key.split(":")[0]] = counted.get(key.split(":")[0], 0) + nbytes
                assert measured == counted and len(seen) == len(expected), f"{name} step {step}: {seen}"
                ring = sum(RING_FACTORS[k.split(":")[0]](w) * n for k, n in expected.items())
                assert loss_fn.stats.ring_bytes() == pytest.approx(ring)
                assert handler.messages[-1].startswith(f"{name} rank {rank}/{world} step {step + 1}:")
                logged = sum(n for key, n in expected.items() if key != "all_gather:grad_rows")  # before backward
                assert f"{logged} B logical" in handler.messages[-1]
                for key, nbytes in expected.items():
                    totals[id(loss_fn)][key] = totals[id(loss_fn)].get(key, 0) + nbytes
        for loss_fn in (sharded, learnable, dp):
            assert loss_fn.stats.steps == 5 and loss_fn.stats.total == totals[id(loss_fn)]
        x_all, y_all = _batch(world, 0, dtype)
        with torch.no_grad():  # no query gradient: the reduce-scatter carries [l·e, lo·e, c_y] only
            sharded.eval()(_part(x_all, world, 0, rank), _part(y_all, world, 0, rank))
        assert sharded.stats.last_step["reduce_scatter:sum"] == world * max(_sizes(world, 0)) * 3 * c
        assert step_bytes(_sizes(world, 0), D, e, True, c, query_grad=False) == sharded.stats.last_step
        dp.eval()
        with _traffic() as seen:
            dp(x, y)  # evaluation mode: no momentum update, nothing gathered, nothing counted
        assert seen == [] and dp.stats.steps == 5
    finally:
        logger.removeHandler(handler)
        logger.setLevel(logging.NOTSET)


def _nccl_world_one(rank, world):
    for loss_fn in (fastcdml.CenterContrastiveLoss(C, D, centers=_bank(), distributed=True),
                    fastcdml.ShardedCenterContrastiveLoss(C, D, centers=_bank())):
        ref = fastcdml.CenterContrastiveLoss(C, D, centers=_bank(), reduction="none", distributed=False).cuda()
        loss_fn.cuda()
        for step in range(4):
            x_all, y_all = (t.cuda() for t in _batch(world, step, torch.float32))
            _check_step(loss_fn, ref, x_all, y_all, world, step, rank, torch.float32, type(loss_fn).__name__)
            _close(loss_fn.centers, ref.centers, torch.float32, f"bank after step {step}")
    kw = dict(centers=_bank(), update="gradient")
    sharded = fastcdml.ShardedCenterContrastiveLoss(C, D, **kw).cuda()
    single = fastcdml.CenterContrastiveLoss(C, D, reduction="none", distributed=False, **kw).cuda()
    for step in range(3):
        x_all, y_all = (t.cuda() for t in _batch(world, step, torch.float32))
        sharded.zero_grad()
        (grad,) = _learnable_step(sharded, lambda xr: single(xr, y_all), [single.centers], x_all, y_all, world,
                                  step, rank, torch.float32, "learnable sharded on NCCL")
        _close(sharded.centers.grad, grad, torch.float32, f"learnable bank gradient, step {step}")


# --- tests -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("dtype,backend", DTYPE_BACKENDS, ids=["float64", "float32"])
def test_data_parallel_bank_matches_single_process(ranks, world, dtype, backend):
    ranks(world, "_dp_matches_single_process", dtype, backend)


@pytest.mark.parametrize("world", [2, 3])
def test_bad_input_on_one_rank_fails_on_every_rank(ranks, world):
    ranks(world, "_bad_label_fails_everywhere")


def test_cbml_cross_rank_references(ranks):
    ranks(3, "_cbml_cross_rank_references")


@pytest.mark.parametrize("world,shard_sizes", [(2, None), (3, None), (3, [6, 0, 7]), (2, [12, 1])],
                         ids=["2-even", "3-even", "3-empty-slice", "2-uneven"])
@pytest.mark.parametrize("dtype,backend", EVERY_BACKEND)
def test_sharded_matches_unsharded(ranks, world, shard_sizes, dtype, backend):
    ranks(world, "_sharded_matches_unsharded", dtype, backend, shard_sizes)


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("backend", ["reference"] + KERNEL_BACKENDS)
@pytest.mark.parametrize("update", ["momentum", "gradient"])
def test_sharded_init_centers_matches_unsharded(ranks, world, backend, update):
    ranks(world, "_sharded_init_centers_matches_unsharded", backend, update)


@pytest.mark.parametrize("world,shard_sizes", [(2, None), (3, [6, 0, 7])], ids=["2-even", "3-empty-slice"])
@pytest.mark.parametrize("dtype,backend", EVERY_BACKEND)
def test_sharded_learnable_matches_single_process(ranks, world, shard_sizes, dtype, backend):
    ranks(world, "_sharded_learnable_matches_single_process", dtype, backend, shard_sizes)


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_sharded_margin_dropins_match_single_process(ranks, world, backend):
    ranks(world, "_sharded_margin_dropins_match", backend)


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("dtype,backend", [(torch.float64, "reference"), (torch.bfloat16, "auto")],
                         ids=["float64", "bfloat16"])
def test_communication_counters_match_formula(ranks, world, dtype, backend):
    ranks(world, "_comm_stats_match_formula", dtype, backend)


def test_the_sharded_step_runs_on_every_kernel_backend_here():
    """Without CUDA (CI) the interpreter runs the Triton kernels and the C++ extension is built: the sharded tests
    above cover both (a missing one would silently drop its cases)."""
    if torch.cuda.is_available():
        pytest.skip("with CUDA, the gloo ranks' CPU tensors have no Triton backend; the NCCL test covers it")
    assert KERNEL_BACKENDS == ["cpp", "triton"] or os.environ.get("FASTCDML_SKIP_EXT") == "1", KERNEL_BACKENDS


@pytest.mark.skipif("triton" not in KERNEL_BACKENDS, reason="no Triton kernels for CPU tensors here")
def test_sharded_16bit_matches_fused_single_process(ranks):
    ranks(2, "_sharded_16bit_matches_fused_single_process")


def test_sharded_partial_fc_sampling(ranks):
    ranks(2, "_sharded_sampling")


def test_checkpoint_reshard_two_to_three(ranks, tmp_path):
    ranks(2, "_checkpoint_save_two", str(tmp_path))
    ranks(3, "_checkpoint_load_three", str(tmp_path))


@pytest.mark.gpu
def test_nccl_world_size_one_smoke(ranks):
    ranks(1, "_nccl_world_one", backend="nccl")


# --- without a process group -----------------------------------------------------------------------------------

def test_enabled_without_process_group():
    assert not enabled("auto") and not enabled(False)
    with pytest.raises(RuntimeError, match="init_process_group"):
        enabled(True)
    with pytest.raises(ValueError, match="distributed must be"):
        enabled("yes")
    with pytest.raises(RuntimeError, match="init_process_group"):
        fastcdml.ShardedCenterContrastiveLoss(C, D)


@pytest.mark.parametrize("num_classes,world", [(13, 3), (2, 3), (1000, 7)])
def test_shard_range_tiles_the_classes(num_classes, world):
    bounds = [shard_range(num_classes, world, r) for r in range(world)]
    assert bounds[0][0] == 0 and bounds[-1][1] == num_classes
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    assert max(e - s for s, e in bounds) - min(e - s for s, e in bounds) <= 1
    with pytest.raises(ValueError, match="summing to"):
        shard_range(num_classes, world, 0, [num_classes] + [1] * (world - 1))


def test_scaling_model_uses_the_tested_formula(capsys):
    """bench/scaling_model.py: its communication column is step_bytes, and its grid is complete."""
    from bench import scaling_model
    from fastcdml.distributed import step_bytes

    s = scaling_model.sharded_step(10**6, 512, 1024, 8)
    assert s.comm == step_bytes([128] * 8, 512, 2, sharded=True)
    assert s.bank_bytes == 125_000 * 512 * 4 and s.flops == 4 * 1024 * 125_000 * 512
    assert s.ring_bytes == pytest.approx(7 / 8 * (s.comm["all_gather:status"] + s.comm["all_gather:embeddings"]
                                                  + s.comm["all_gather:labels"])
                                         + 7 / 8 * s.comm["reduce_scatter:sum"] + 2 * 7 / 8 * s.comm["all_reduce:max"])
    assert scaling_model.main([]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("| 1e+06 |", "| 1e+07 |"))]
    assert len(rows) == 2 * 2 * 2 * 3

"""``python bench/scaling_model.py``: the scaling model of the class-sharded Center Contrastive Loss step.

Prints, for C ∈ {10⁶, 10⁷}, D ∈ {128, 512}, B_global ∈ {1024, 8192} and W ∈ {1, 8, 64} ranks, the per-GPU bank
memory, the FLOPs and HBM bytes of one loss step per rank, the bytes each rank moves through collectives, and
a predicted step time on H100-class GPUs; then the same model at the sizes of Partial FC's published figures.
``--anchor`` times the fused C++ step on this CPU and compares it with the same model fed this CPU's measured
GEMM rate and copy bandwidth, then the class-sharded step on the C++ partials op against the PyTorch reference. The reasoning, the assumptions and the recorded output are in ``docs/scaling.md``.

The model, per rank (C_r = ⌈C/W⌉ classes, B = B_global rows, D columns)::

    FLOPs     4·B·C_r·D                       s = x̂Wᵀ and Σ_j p_ij W_j: two B×C_r×D products, gradient in forward
    exps      B·C_r                           one exponential per logit, on the special-function units
    HBM       C_r·D·4 (the fp32 slice, read once) + B·D·2 (bf16 queries) + B·(2D+4)·4 (partials out)
              + 2·(B/W)·D·4 (momentum update of the rows this rank owns)
    comm      fastcdml.distributed.step_bytes: the counters the loss records and the tests check
    time      max(FLOPs / peak + exps / exp rate, HBM / bandwidth) + Σ_collectives (α + ring bytes / link bandwidth)

The collectives are on the critical path (gather → slice pass → MAX → SUM reduce-scatter → epilogue), so nothing
overlaps.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from fastcdml.distributed import RING_FACTORS, step_bytes

ROW_BLOCK = 64  # query rows per program of the Triton forward at D ≥ 128 (FWD_CONFIGS)
GB, MB, MS = 1e9, 1e6, 1e-3


@dataclass(frozen=True)
class Hardware:
    name: str
    dot_flops: float  # dense tensor-core FLOP/s for bf16 operands (bf16 queries against an fp32 bank tile)
    fp32_flops: float  # FP32 (non-tensor-core) FLOP/s: the chunked PyTorch reference, torch's default matmul precision
    hbm: float  # bytes/s
    nvlink: float  # bytes/s one GPU sends within a node
    network: tuple[float, float]  # bytes/s one GPU sends across nodes: (fast, slow)
    gpus_per_node: int
    alpha_node: float  # seconds per collective within a node (launch + latency)
    alpha_network: float  # seconds per collective across nodes
    memory: float  # bytes of device memory
    exp_rate: float  # exponentials/s (special-function units)


# exp rate: 132 SMs × 16 MUFU ops/clock × ~1.8 GHz ≈ 3.9e12/s (the FlashAttention-3 paper's "3.9 TFLOPS of special
# functions" for H100 SXM5)
H100 = Hardware("H100-class", 800e12, 60e12, 3.0e12, 450e9, (50e9, 25e9), 8, 10e-6, 30e-6, 80e9, 3.9e12)


@dataclass
class Step:
    """One loss step of one rank; times in seconds."""
    C: int
    D: int
    B: int
    W: int
    bank_bytes: int
    workspace_bytes: int
    flops: float
    hbm_bytes: float
    comm: dict[str, int]
    ring_bytes: float
    t_compute: float  # matmul FLOPs at peak plus the exponentials, not overlapped
    t_exp: float
    t_memory: float
    t_comm: tuple[float, float]
    t_chunked: float  # the per-slice step on the reference backend: chunked PyTorch, fp32 matmul

    @property
    def t_step(self) -> tuple[float, float]:
        return tuple(max(self.t_compute, self.t_memory) + t for t in self.t_comm)


def sharded_step(C: int, D: int, B: int, W: int, hw: Hardware = H100, bank_itemsize: int = 4, emb_itemsize: int = 2,
                 l2_reuse: bool = True) -> Step:
    """The model for the fused per-slice pass (flash-attention-style, no B×C_r matrix). ``l2_reuse=False``: every
    block of ``ROW_BLOCK`` query rows re-reads the slice from HBM (the pessimistic bound) instead of once."""
    c_r = math.ceil(C / W)
    bank = c_r * D * bank_itemsize
    flops = 4.0 * B * c_r * D
    reads = bank * (1 if l2_reuse else math.ceil(B / ROW_BLOCK))
    hbm = reads + B * D * emb_itemsize + B * (2 * D + 4) * 4 + 2 * (B / W) * D * bank_itemsize
    workspace = B * D * emb_itemsize + B * (2 * D + 5) * 4  # gathered batch, packed partials and row maxima
    sizes = [B // W + (r < B % W) for r in range(W)]
    comm = step_bytes(sizes, D, emb_itemsize, sharded=True, compute_itemsize=4)
    ring = sum(RING_FACTORS[k.split(":")[0]](W) * n for k, n in comm.items())
    if W <= hw.gpus_per_node:
        t_comm = (len(comm) * hw.alpha_node + ring / hw.nvlink,) * 2
    else:
        t_comm = tuple(len(comm) * hw.alpha_network + ring / bw for bw in hw.network)
    # the reference backend's per-slice step: fp32 GEMMs (two products) plus ~8 passes over the B×chunk fp32 logits
    # (write s, margin, /τ read+write, max, exp read+write, sum, read for p@W)
    t_chunked = flops / hw.fp32_flops + (8 * 4 * B * c_r + bank) / hw.hbm + B * c_r / hw.exp_rate
    t_exp = B * c_r / hw.exp_rate
    return Step(C, D, B, W, bank, workspace, flops, hbm, comm, ring, flops / hw.dot_flops + t_exp, t_exp,
                hbm / hw.hbm, t_comm, t_chunked + max(t_comm))


def data_parallel_step(C: int, D: int, B: int, W: int, hw: Hardware = H100, bank_itemsize: int = 4,
                       emb_itemsize: int = 2) -> tuple[float, float]:
    """``CenterContrastiveLoss(distributed="auto")``: the whole bank on every GPU, local rows only, the global
    batch all-gathered for the momentum update. Returns (bank bytes per GPU, step seconds at the slow network)."""
    bank = C * D * bank_itemsize
    rows = math.ceil(B / W)
    flops = 4.0 * rows * C * D
    hbm = bank + B * D * emb_itemsize + 2 * B * D * bank_itemsize
    t_pass = max(flops / hw.dot_flops + rows * C / hw.exp_rate, hbm / hw.hbm)
    if W == 1:
        return bank, t_pass
    comm = step_bytes([rows] * W, D, emb_itemsize, sharded=False)
    ring = sum(RING_FACTORS[k.split(":")[0]](W) * n for k, n in comm.items())
    node = W <= hw.gpus_per_node
    t_comm = len(comm) * (hw.alpha_node if node else hw.alpha_network) + ring / (hw.nvlink if node else hw.network[1])
    return bank, t_pass + t_comm


def _ms(t) -> str:
    if isinstance(t, tuple):
        return f"{t[0] / MS:.3g}" if t[0] == t[1] else f"{t[0] / MS:.3g}–{t[1] / MS:.3g}"
    return f"{t / MS:.3g}"


def table(l2_reuse: bool = True, hw: Hardware = H100) -> str:
    head = ("| C | D | B | W | bank/GPU GB | GFLOP/rank | HBM MB/rank | comm MB/rank (logical) | ring MB sent/rank "
            "| compute ms (of which exp) | memory ms | comm ms | **step ms** | reference backend ms "
            "| data parallel: bank GB, step ms |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for C in (10**6, 10**7):
        for D in (128, 512):
            for B in (1024, 8192):
                for W in (1, 8, 64):
                    s = sharded_step(C, D, B, W, hw, l2_reuse=l2_reuse)
                    bank, t_dp = data_parallel_step(C, D, B, W, hw)
                    dp = f"{bank / GB:.3g}, " + (f"{t_dp / MS:.3g}" if bank < 0.8 * hw.memory else "does not fit")
                    lines.append(
                        f"| {C:.0e} | {D} | {B} | {W} | {s.bank_bytes / GB:.3g} | {s.flops / GB:.4g} | "
                        f"{s.hbm_bytes / MB:.4g} | {sum(s.comm.values()) / MB:.3g} | {s.ring_bytes / MB:.3g} | "
                        f"{_ms(s.t_compute)} ({_ms(s.t_exp)}) | {_ms(s.t_memory)} | {_ms(s.t_comm)} | "
                        f"**{_ms(s.t_step)}** | "
                        f"{_ms(s.t_chunked)} | {dp} |")
    return "\n".join(lines)


V100 = Hardware("V100 (fp16 tensor cores)", 125e12, 15.7e12, 0.9e12, 150e9, (12.5e9, 12.5e9), 8, 10e-6, 30e-6, 32e9,
                80 * 16 * 1.53e9)


def partial_fc_rows() -> str:
    """The model at the sizes of Partial FC's published figures (docs/scaling.md says what each one measured)."""
    rows = ["| sizes (C, D, B_global, W) | GPU model | bank/GPU MB | compute ms | memory ms | comm ms "
            "| loss step ms |", "|---|---|---|---|---|---|---|"]
    for C, D, B, W, gpu in ((125_000, 512, 1024, 8, V100), (10**6, 512, 1024, 8, V100),
                            (10**7, 512, 4096, 64, V100), (10**7, 512, 4096, 64, H100)):
        s = sharded_step(C, D, B, W, gpu)
        rows.append(f"| {C:.3g}, {D}, {B}, {W} | {gpu.name} | {s.bank_bytes / MB:.4g} | {_ms(s.t_compute)} | "
                    f"{_ms(s.t_memory)} | {_ms(s.t_comm)} | {_ms(s.t_step)} |")
    return "\n".join(rows)


# ----------------------------------------------------------------------------------------------- anchor (CPU)

def _median_s(fn, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def anchor(reps: int = 5, threads: int = 1) -> tuple[str, list[dict]]:
    """Time the fused C++ CCL step (loss forward + backward + momentum update, the bench's step) at sizes where
    the model predicts compute-bound and memory-bound steps, next to this CPU's GEMM rate (fp32 1024³
    ``torch.mm``) and copy bandwidth (64 MiB ``copy_``, bytes read + written) measured in the same process with
    the same threads, before and after each case (the machine may be shared; one thread by default, since
    OpenMP regions on oversubscribed cores wait for descheduled workers). Returns (Markdown table, rows)."""
    import torch

    torch.set_num_threads(threads)

    import fastcdml.functional as F
    from fastcdml._backend import resolve

    a = torch.randn(1024, 1024)
    big = torch.empty(64 * 2**20 // 4)
    big2 = torch.empty_like(big)

    def gemm_rate() -> float:
        return 2 * 1024**3 / _median_s(lambda: torch.mm(a, a), reps)

    def copy_bw() -> float:  # bytes read + written per second
        return 2 * big.numel() * 4 / _median_s(lambda: big2.copy_(big), reps)

    def tile_gemm_rate(D: int) -> float:  # the C++ op's GEMM shape: 64 queries × a 512 KiB bank chunk
        q, w = torch.randn(64, D), torch.randn(512 * 1024 // (4 * D), D)
        return 2 * q.shape[0] * w.shape[0] * D / _median_s(lambda: torch.mm(q, w.t()), reps * 20)

    def exp_rate() -> float:  # exponentials per second (a 256 KiB tensor: in cache, as the op's tiles are)
        e, e2 = torch.randn(1 << 16), torch.empty(1 << 16)
        return e.numel() / _median_s(lambda: torch.exp(e, out=e2), reps)

    out = [f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), backend "
           f"{resolve('auto', 'ccl', torch.device('cpu')).name}:", "",
           "| B, C, D | model bound | GFLOP | bank MB | GEMM GFLOP/s: 1024³, op's tile | copy GB/s | exp G/s | "
           "predicted ms: roofline | + exps | at the tile GEMM rate | measured ms | measured / roofline | "
           "measured / (tile rate + exps) | achieved GFLOP/s |", "|" + "---|" * 14]
    rows = []
    for B, C, D in ((256, 50_000, 128), (256, 12_500, 512), (2, 500_000, 128)):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(B, D, generator=g, requires_grad=True)
        y = torch.randint(0, C, (B,), generator=g)
        bank = torch.nn.functional.normalize(torch.randn(C, D, generator=g), dim=1)

        def step():
            x.grad = None
            F.center_contrastive_loss(x, y, bank, check_inputs=False).backward()
            F.center_momentum_update_(bank, x.detach(), y, 0.9, check_inputs=False)

        rate, bw, ex, tile = gemm_rate(), copy_bw(), exp_rate(), tile_gemm_rate(D)
        t = _median_s(step, reps)
        rate, bw, ex = (rate + gemm_rate()) / 2, (bw + copy_bw()) / 2, (ex + exp_rate()) / 2
        tile = (tile + tile_gemm_rate(D)) / 2
        flops = 4.0 * B * C * D
        hbm = C * D * 4 + 2 * B * D * 4
        t_c, t_m, t_e = flops / rate, hbm / bw, B * C / ex
        roof, with_exp, at_tile = max(t_c, t_m), max(t_c + t_e, t_m), max(flops / tile + t_e, t_m)
        rows.append(dict(B=B, C=C, D=D, gemm_gflops=rate / GB, tile_gflops=tile / GB, copy_gbs=bw / GB,
                         exp_gs=ex / GB, roofline_ms=roof / MS, with_exps_ms=with_exp / MS,
                         at_tile_rate_ms=at_tile / MS, p50_ms=t / MS))
        out.append(f"| {B}, {C}, {D} | {'compute' if t_c >= t_m else 'memory'} | {flops / GB:.3g} | "
                   f"{C * D * 4 / MB:.4g} | {rate / GB:.3g}, {tile / GB:.3g} | {bw / GB:.3g} | {ex / GB:.3g} | "
                   f"{roof / MS:.4g} | {with_exp / MS:.4g} | {at_tile / MS:.4g} | {t / MS:.4g} | {t / roof:.2f} | "
                   f"{t / at_tile:.2f} | {flops / t / GB:.3g} |")
    return "\n".join(out), rows


def sharded_anchor(reps: int = 5, threads: int = 1) -> tuple[str, list[dict]]:
    """Time one training step (forward, backward, momentum update or proxy gradient) of
    ``ShardedCenterContrastiveLoss`` on a world-size-1 gloo group in this process: the per-slice pass on the fused
    C++ partials op against the chunked PyTorch reference, in momentum and gradient mode, next to the same step of
    the single-process ``CenterContrastiveLoss`` (whose fused op the partials op shares its pass with)."""
    import tempfile

    import torch
    import torch.distributed as dist

    import fastcdml

    torch.set_num_threads(threads)
    store = tempfile.TemporaryDirectory()
    dist.init_process_group("gloo", init_method=f"file://{store.name}/store", rank=0, world_size=1)
    out = [f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), gloo world size 1:", "",
           "| B, C, D | update | single process, C++ ms | sharded, C++ partials ms | sharded, reference ms | "
           "reference / C++ |", "|---|---|---|---|---|---|"]
    rows = []
    try:
        for B, C, D in ((256, 50_000, 128), (256, 12_500, 512)):
            g = torch.Generator().manual_seed(0)
            x = torch.randn(B, D, generator=g, requires_grad=True)
            y = torch.randint(0, C, (B,), generator=g)
            bank = torch.randn(C, D, generator=g)
            for update in ("momentum", "gradient"):
                times = []
                for make in (lambda: fastcdml.CenterContrastiveLoss(C, D, centers=bank, update=update,
                                                                    backend="cpp", distributed=False),
                             lambda: fastcdml.ShardedCenterContrastiveLoss(C, D, centers=bank, update=update,
                                                                           backend="cpp"),
                             lambda: fastcdml.ShardedCenterContrastiveLoss(C, D, centers=bank, update=update,
                                                                           backend="reference")):
                    loss_fn = make()

                    def step():
                        x.grad = None
                        loss_fn.zero_grad()
                        loss_fn(x, y).backward()

                    times.append(_median_s(step, reps))
                rows.append(dict(B=B, C=C, D=D, update=update, single_cpp_p50_ms=times[0] / MS,
                                 sharded_cpp_p50_ms=times[1] / MS, sharded_reference_p50_ms=times[2] / MS))
                out.append(f"| {B}, {C}, {D} | {update} | {times[0] / MS:.4g} | {times[1] / MS:.4g} | "
                           f"{times[2] / MS:.4g} | {times[2] / times[1]:.2f} |")
    finally:
        dist.destroy_process_group()
        store.cleanup()
    return "\n".join(out), rows


def write_anchor(folder: Path, single: list[dict], sharded: list[dict]) -> Path:
    """The anchor's measurements as ``<device>-scaling-anchor-<date>.json`` in ``folder``, with the device,
    versions, date and load (``bench.run.environment``)."""
    import torch

    from bench.run import environment, load_check, slug

    meta = environment(torch.device("cpu"))
    meta["load_1min"], meta["loaded"] = load_check(torch.get_num_threads())
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{slug(meta['device'])}-scaling-anchor-{meta['date']}.json"
    path.write_text(json.dumps({"meta": meta, "command": "python bench/scaling_model.py --anchor",
                                "single_process_step": single, "sharded_step": sharded}, indent=1) + "\n")
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--anchor", action="store_true", help="also time the C++ step on this CPU against the model")
    parser.add_argument("--no-l2-reuse", action="store_true",
                        help=f"memory term: every block of {ROW_BLOCK} query rows re-reads the slice from HBM")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions per anchor measurement (median)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for the anchor")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results",
                        help="folder of the anchor's JSON results file")
    args = parser.parse_args(argv)
    hw = H100
    memory_term = "slice re-read per 64-row block" if args.no_l2_reuse else "slice read once (L2 reuse across row blocks)"
    print(f"## Predicted loss step per rank, {hw.name}: {hw.dot_flops / 1e12:.0f} TFLOP/s bf16 dense, "
          f"{hw.hbm / 1e12:.0f} TB/s HBM, NVLink {hw.nvlink / GB:.0f} GB/s within {hw.gpus_per_node} GPUs, "
          f"{hw.network[0] / GB:.0f}–{hw.network[1] / GB:.0f} GB/s per GPU across nodes; fp32 bank, bf16 queries; "
          f"memory term: {memory_term}\n")
    print(table(l2_reuse=not args.no_l2_reuse, hw=hw))
    print("\n## The model at the sizes of Partial FC's published figures\n")
    print(partial_fc_rows())
    if args.anchor:
        print("\n## Anchor: the fused C++ step on this CPU against the model fed this CPU's measured rates\n")
        text, single = anchor(args.reps, args.threads)
        print(text)
        print("\n## Anchor: the class-sharded step on the fused C++ partials op against the reference\n")
        text, sharded = sharded_anchor(args.reps, args.threads)
        print(text)
        print(f"\nwrote {write_anchor(args.out, single, sharded)}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: `bench` importable
    sys.exit(main())

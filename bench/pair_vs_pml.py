"""``python -m bench.pair_vs_pml``: fastcdml's pair losses against pytorch-metric-learning's, plain (M = 0) and in a
``CrossBatchMemory`` of M entries, on the device given (CPU by default): time of one training step (forward and
backward of the loss) and its peak extra memory. Implementations (``--impls``): ``fastcdml`` (the fused kernels),
``pml``, and ``compiled``: ``torch.compile`` (inductor, static shapes) of fastcdml's module on the reference
backend, the eager specification compiled; its compilation is part of the warm-up step, not of the timed ones.

Each case runs in a fresh subprocess with a wall-clock limit (``--timeout``): CPU memory is the peak RSS of one
step after a warm-up step above the RSS before it (Linux: the peak is reset through ``/proc/self/clear_refs``;
glibc is told to return every freed block of 64 KiB or more to the system, so retained heap cannot hide the
peak); CUDA memory is ``max_memory_allocated`` above the memory in use
before the step. Time: the median of ``--reps`` steps after one warm-up. The memory a PML case would need is
predicted from its largest intermediates first; a case predicted above ``--mem-cap-gib`` is not run and is
recorded as such (``status``: ``ok``, ``timeout``, ``skipped: …``, ``error: …``), as is one that runs past the time
limit. Classes: B / 4 in the batch (4 per class), the memory's labels drawn from the same classes. Writes
``<out>/<device>-pair-vs-pml-<date>.json``.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from .run import environment, load_check, write_results

LOSSES = ("NTXentLoss", "SupConLoss", "MultiSimilarityLoss", "ContrastiveLoss")
IMPLS = ("fastcdml", "pml", "compiled")
BATCHES = (128, 256, 1024)
MEMORIES = (0, 4096, 16384, 65536)
DIMS = (128, 512)
_MARK = "PAIR_BENCH_RESULT "


def predicted_pml_gib(loss: str, b: int, m: int, d: int) -> float:
    """PML's largest live intermediates for one step (an estimate that errs high): NTXent's (positive pairs) ×
    (negative pairs) float and bool matrices; the others about 13 fp32 (B × R) matrices and the int64 pair lists."""
    r = m or b
    per_class = max(b // max(b // 4, 1), 1)
    n_pos = b * (per_class * max(r // b, 1) - (0 if m else 1))
    n_neg = b * r - n_pos
    if loss == "NTXentLoss":
        return (n_pos * n_neg * 9 + b * r * 60) / 2**30
    return (b * r * (13 * 4 + 4 * 8)) / 2**30


def _make(loss: str, impl: str, b: int, m: int, d: int, device: torch.device):
    """(step function, its input) for one case: a loss module (in a CrossBatchMemory pre-filled with M entries
    when m > 0) and a batch that requires a gradient."""
    g = torch.Generator().manual_seed(0)
    classes = max(b // 4, 1)
    x = torch.randn(b, d, generator=g).to(device).requires_grad_()
    y = torch.arange(b).remainder(classes).to(device)
    if impl == "pml":
        from pytorch_metric_learning import losses as lib
    else:
        import fastcdml as lib
    loss_fn = getattr(lib, loss)(**({"backend": "reference"} if impl == "compiled" else {}))
    if m:
        loss_fn = lib.CrossBatchMemory(loss_fn, d, memory_size=m)
        with torch.no_grad():
            loss_fn.embedding_memory = torch.randn(m, d, generator=g).to(device)
            loss_fn.label_memory = torch.randint(0, classes, (m,), generator=g).to(device)
        if impl == "pml":
            loss_fn.has_been_filled = True
        else:
            loss_fn.has_been_filled.fill_(True)
            loss_fn.to(device)
    if impl == "compiled":
        loss_fn = torch.compile(loss_fn, dynamic=False)

    def step():
        out = loss_fn(x, y)
        out.backward()
        x.grad = None
        return out

    return step


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def run_case(loss: str, impl: str, b: int, m: int, d: int, device: str, reps: int) -> dict:
    """In the case's own process: time and peak extra memory of one step."""
    import time

    dev = torch.device(device)
    step = _make(loss, impl, b, m, d, dev)
    step()  # warm-up
    _sync(dev)
    if dev.type == "cuda":
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        _sync(dev)
        peak_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:  # Linux: writing 5 to clear_refs resets the peak RSS (VmHWM) to the current RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _status_kib("VmRSS")
        step()
        peak_mb = (_status_kib("VmHWM") - before) / 1024
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        _sync(dev)
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return dict(p50_ms=times[len(times) // 2], min_ms=times[0], peak_extra_mb=round(peak_mb, 2))


def _subprocess(case: dict, device: str, reps: int, timeout: float) -> dict:
    code = (f"import json, torch; torch.set_num_threads({torch.get_num_threads()}); "
            f"from bench.pair_vs_pml import run_case; "
            f"print({_MARK!r} + json.dumps(run_case({case['loss']!r}, {case['impl']!r}, {case['B']}, {case['M']}, "
            f"{case['D']}, {device!r}, {reps})))")
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", PYTHONWARNINGS="ignore")
    root = Path(__file__).resolve().parent.parent
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env,
                              cwd=root)
    except subprocess.TimeoutExpired:
        return dict(status=f"timeout: over {timeout:.0f} s (warm-up, memory step and {reps} timed steps)")
    for line in proc.stdout.splitlines():
        if line.startswith(_MARK):
            return dict(status="ok", **json.loads(line[len(_MARK):]))
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return dict(status=f"error: {tail[:200]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--losses", default=",".join(LOSSES))
    parser.add_argument("--impls", default="fastcdml,pml", help=f"from {','.join(IMPLS)}")
    parser.add_argument("--batches", default=",".join(map(str, BATCHES)))
    parser.add_argument("--memories", default=",".join(map(str, MEMORIES)))
    parser.add_argument("--dims", default=",".join(map(str, DIMS)))
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per case")
    parser.add_argument("--mem-cap-gib", type=float, default=6.0, help="PML cases predicted above it are not run")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    ints = lambda s: [int(v) for v in s.split(",") if v]  # noqa: E731
    meta = environment(device) | {"threads": args.threads, "reps": args.reps, "timeout_s": args.timeout,
                                  "mem_cap_gib": args.mem_cap_gib,
                                  "command": "python -m bench.pair_vs_pml " + " ".join(argv or sys.argv[1:])}
    rows = []
    for d, b, m, loss in itertools.product(ints(args.dims), ints(args.batches), ints(args.memories),
                                           args.losses.split(",")):
        for impl in args.impls.split(","):
            case = dict(loss=loss, impl=impl, B=b, M=m, D=d)
            load, _ = load_check(args.threads)
            predicted = predicted_pml_gib(loss, b, m, d)
            if impl == "pml" and predicted > args.mem_cap_gib:
                result = dict(status=f"skipped: predicted {predicted:.1f} GiB > cap {args.mem_cap_gib} GiB")
            else:
                result = _subprocess(case, args.device, args.reps, args.timeout)
            rows.append(case | result | {"load_1min": load})
            r = rows[-1]
            print(f"{loss:20s} {impl:8s} B={b:5d} M={m:6d} D={d:4d}: {r['status']:8.8s} "
                  f"{r.get('p50_ms', float('nan')):10.1f} ms {r.get('peak_extra_mb', float('nan')):10.1f} MB",
                  flush=True)
    write_results(args.out, meta, "pair-vs-pml", rows, key=("loss", "impl", "B", "M", "D"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

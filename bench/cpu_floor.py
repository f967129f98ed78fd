"""``python -m bench.cpu_floor``: the C++ CCL ops against the GEMM floor of the same shapes, on this CPU.

For each (B, C, D): the fused forward with the query gradient (``ccl_fwd``) against two ``torch.mm`` (S = X·Wᵀ and
P·W, the products any single pass must do), and the forward plus the proxy gradient (``ccl_bwd_centers``) against
three (adding Pᵀ·X). With ``--threads 1`` (the default) each call is timed in thread CPU time
(``time.thread_time``), so that other processes on a shared machine do not count; with more threads, in wall
time (then the load matters, and is recorded). The minimum of ``--reps`` interleaved runs. Writes
``<out>/<device>-<threads>-threads-cpu-floor-<date>.json`` with the device, versions, date and load.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from .run import environment, load_check, write_results

SIZES = ((256, 1000, 128), (1024, 10_000, 128), (1024, 100_000, 128), (128, 11_318, 512), (1024, 10_000, 512))
HYPER = (0.05, 0.1, 1.0)  # temperature, margin, center_weight


def _min_ms(fns, reps: int) -> list[float]:
    """The minimum time of each function over ``reps`` interleaved rounds, in ms: thread CPU time on one thread,
    wall time on more."""
    clock = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter
    best = [float("inf")] * len(fns)
    for fn in fns:
        fn()  # warm-up
    for _ in range(reps):
        for i, fn in enumerate(fns):
            t0 = clock()
            fn()
            best[i] = min(best[i], clock() - t0)
    return [b * 1e3 for b in best]


def measure(b: int, c: int, d: int, reps: int) -> dict:
    ops = torch.ops.fastcdml
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, d, generator=g)
    w = torch.nn.functional.normalize(torch.randn(c, d, generator=g), dim=1)
    y = torch.randint(0, c, (b,), generator=g)
    s = torch.empty(b, c)
    lse = ops.ccl_fwd(x, y, w, *HYPER, False, 0, 1)[2]
    go = torch.randn(b, generator=g)
    mm_nt, mm_nn, mm_tn, fwd, bwd = _min_ms([
        lambda: torch.mm(x, w.t(), out=s), lambda: torch.mm(s, w), lambda: torch.mm(s.t(), x),
        lambda: ops.ccl_fwd(x, y, w, *HYPER, True, 0, 1),
        lambda: ops.ccl_bwd_centers(x, y, w, lse, go, *HYPER, 0, 1, None, False)], reps)
    return dict(B=b, C=c, D=d, mm_nt_ms=mm_nt, mm_nn_ms=mm_nn, mm_tn_ms=mm_tn, fwd_ms=fwd, proxy_grad_ms=bwd,
                fwd_over_floor=fwd / (mm_nt + mm_nn), fwd_proxy_over_floor=(fwd + bwd) / (mm_nt + mm_nn + mm_tn))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--sizes", default=",".join(f"{b}x{c}x{d}" for b, c, d in SIZES), help="BxCxD,...")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from fastcdml import _extension

    module = _extension.load()[0]
    if module is None:
        print("the C++ backend is not available:", _extension.load()[2])
        return 2
    load, _ = load_check(args.threads)
    timer = "thread CPU time" if args.threads == 1 else "wall time"
    meta = environment(torch.device("cpu")) | {"load_1min": load, "isa": module.build_info().get("isa"),
                                               "timer": f"{timer}, min of reps", "reps": args.reps}
    rows = []
    for b, c, d in (tuple(int(v) for v in size.split("x")) for size in args.sizes.split(",")):
        rows.append(measure(b, c, d, args.reps))
        r = rows[-1]
        print(f"{b} x {c} x {d}: fwd {r['fwd_ms']:.2f} ms = {r['fwd_over_floor']:.2f} x two mm; "
              f"fwd + proxy grad {r['fwd_ms'] + r['proxy_grad_ms']:.2f} ms = {r['fwd_proxy_over_floor']:.2f} x three mm",
              flush=True)
    command = " ".join(["python -m bench.cpu_floor", *(argv if argv is not None else sys.argv[1:])])
    write_results(args.out, meta | {"command": command}, "cpu-floor", rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

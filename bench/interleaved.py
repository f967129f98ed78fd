"""``python -m bench.interleaved``: fastcdml's proxy losses against pytorch-metric-learning's at one size, the two
steps interleaved, so that load from other work on a shared machine falls on both alike.

Pairs (one training step each: forward, backward to the embeddings and to the learnable ``W``, PML's default
hyper-parameters, the same ``W`` on both sides): NormalizedSoftmax, CosFace, ArcFace, SubCenterArcFace (K = 3),
ProxyNCA and SoftTriple (K = 10, PML's ``fc``) against PML's class of the same name; and
``CenterContrastiveLoss`` in its default (momentum) mode (forward, backward to the embeddings, the in-place bank
update) against PML's ``NormalizedSoftmaxLoss(temperature=0.05)``, the nearest PML loss (CCL with neither margin
nor center pull, its bank trained by gradient). Ours run with their
defaults (``check_inputs=True``) unless ``--no-check``.

Method: warm-up steps, then ``--reps`` rounds, each running every step of a pair once, the order alternating
between rounds; wall clock (``time.perf_counter``) per step; the median, p20 and p80 per side and the ratio of
the medians. Peak extra memory of one step (RSS high-water-mark growth above the steady state) is measured for
each side in a fresh process with glibc returning every freed block ≥ 64 KiB to the system
(``bench.run._peak_extra_mb``). Writes ``<out>/<device>-interleaved-<date>.json`` (``bench.run.write_results``:
rows of the same loss, size and check setting replaced).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from .impls import MARGIN_CLASSES, _version
from .run import _git, environment, load_check, write_results

PAIRS = ("normalizedsoftmax", "cosface", "arcface", "subcenter", "proxynca", "softtriple", "ccl")
CCL_PEER_TEMPERATURE = 0.05  # CenterContrastiveLoss's default τ
_MARK = "INTERLEAVED_MEMORY "


def _inputs(b: int, d: int, c: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, d, generator=g).requires_grad_(), torch.randint(0, c, (b,), generator=g)


def build(name: str, side: str, b: int, c: int, d: int, check: bool = True):
    """One step of ``side`` ("ours" or "pml") for the pair ``name`` on fresh inputs (seeded: both sides get the same
    embeddings, labels and ``W``)."""
    import fastcdml
    from pytorch_metric_learning import losses as pml

    x, y = _inputs(b, d, c)
    if name == "ccl" and side == "ours":
        loss_fn = fastcdml.CenterContrastiveLoss(c, d, check_inputs=check, generator=torch.Generator().manual_seed(1))
        loss_fn.train()
        params = []
    else:
        cls, _, kwargs = MARGIN_CLASSES["normalizedsoftmax" if name == "ccl" else name]
        if name == "ccl":
            kwargs = {"temperature": CCL_PEER_TEMPERATURE}
        if side == "pml":
            loss_fn = getattr(pml, cls)(num_classes=c, embedding_size=d, **kwargs)
        else:
            loss_fn = getattr(fastcdml, cls)(c, d, check_inputs=check, **kwargs)
        params = list(loss_fn.parameters())
        with torch.no_grad():
            params[0].copy_(torch.randn(params[0].shape, generator=torch.Generator().manual_seed(1)))

    def run():
        x.grad = None
        for p in params:
            p.grad = None
        loss_fn(x, y).backward()

    return run


def _quantiles(times: list[float]) -> dict:
    q = statistics.quantiles(times, n=10, method="inclusive")
    return {"p50_ms": statistics.median(times), "p20_ms": q[1], "p80_ms": q[7]}


def interleave(name: str, b: int, c: int, d: int, reps: int, warmup: int, check: bool) -> dict:
    """Times (ms) of both sides of ``name``, interleaved (module docstring)."""
    steps = {side: build(name, side, b, c, d, check) for side in ("ours", "pml")}
    for _ in range(warmup):
        for run in steps.values():
            run()
    times = {side: [] for side in steps}
    order = list(steps)
    for i in range(reps):
        for side in order if i % 2 == 0 else order[::-1]:
            t0 = time.perf_counter()
            steps[side]()
            times[side].append((time.perf_counter() - t0) * 1e3)
    out = {f"{side}_{k}": v for side in steps for k, v in _quantiles(times[side]).items()}
    out["ratio"] = out["ours_p50_ms"] / out["pml_p50_ms"]
    return out


def memory_mb(name: str, side: str, b: int, c: int, d: int, check: bool) -> float | None:
    """Peak extra memory of one step of ``side``, in a fresh process (module docstring)."""
    code = (f"import torch; torch.set_num_threads({torch.get_num_threads()}); "
            f"import json; from bench.interleaved import build, _MARK; from bench.run import _peak_extra_mb; "
            f"run = build({name!r}, {side!r}, {b}, {c}, {d}, {check}); run(); run(); "
            f"print(_MARK + json.dumps(_peak_extra_mb(run, torch.device('cpu'))))")
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", PYTHONWARNINGS="ignore",
               PYTHONPATH=os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=root,
                          timeout=600)
    for line in proc.stdout.splitlines():
        if line.startswith(_MARK):
            value = json.loads(line[len(_MARK):])
            return None if value is None else round(value, 2)
    raise RuntimeError((proc.stderr.strip().splitlines() or ["no output"])[-1][:300])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="256x1000x128", help="BxCxD")
    parser.add_argument("--losses", default=",".join(PAIRS))
    parser.add_argument("--reps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-check", dest="check", action="store_false",
                        help="ours with check_inputs=False (no value checks)")
    parser.add_argument("--no-memory", dest="memory", action="store_false", help="skip the memory processes")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    b, c, d = (int(v) for v in args.size.split("x"))
    argv = sys.argv[1:] if argv is None else argv
    from fastcdml._backend import resolve

    meta = environment(torch.device("cpu")) | {
        "git": _git(), "backend": resolve("auto", "ccl", torch.device("cpu")).name,
        "threads": args.threads, "reps": args.reps, "warmup": args.warmup, "pml": _version("pml"),
        "command": "python -m bench.interleaved " + " ".join(argv)}
    rows = []
    for name in args.losses.split(","):
        load0 = load_check(args.threads)[0]
        row = {"loss": name, "B": b, "C": c, "D": d, "dtype": "float32", "check_inputs": args.check,
               **interleave(name, b, c, d, args.reps, args.warmup, args.check)}
        row["load_1min"] = [load0, load_check(args.threads)[0]]
        if args.memory:
            for side in ("ours", "pml"):
                row[f"{side}_peak_extra_mb"] = memory_mb(name, side, b, c, d, args.check)
        rows.append(row)
        print(f"{name:18s} ours {row['ours_p50_ms']:7.2f} ms  pml {row['pml_p50_ms']:7.2f} ms  "
              f"ours/pml {row['ratio']:.2f}  (p20-p80 ours {row['ours_p20_ms']:.2f}-{row['ours_p80_ms']:.2f}, "
              f"pml {row['pml_p20_ms']:.2f}-{row['pml_p80_ms']:.2f}; load {row['load_1min']})"
              + (f"  peak MB {row['ours_peak_extra_mb']} / {row['pml_peak_extra_mb']}" if args.memory else ""),
              flush=True)
    write_results(args.out, meta, "interleaved", rows, key=("loss", "B", "C", "D", "check_inputs"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

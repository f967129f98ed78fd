"""One command for a machine with one NVIDIA GPU: ``make gpu-check OUT=dir [WHEELS=dir]``
(``python -m bench.gpu_check --out DIR [--wheels DIR] [--dry-run]``).

It uses the CUDA torch and triton already installed and needs no network: nothing is installed. Extra
pure-Python packages come as wheel files and are put on ``PYTHONPATH`` as they are (a pure-Python wheel is an
importable zip). Fetch them on a machine with network access, for CPython 3.12 on manylinux x86-64::

    pip download --only-binary=:all: --no-deps --python-version 3.12 --implementation cp --abi cp312 \\
        --platform manylinux2014_x86_64 -d wheels pytorch-metric-learning tqdm pytest-benchmark py-cpuinfo

Stages, each with its own time budget (seconds, below; about 8.5 minutes in all on an H100/H200) and one line in
``OUT/summary.txt`` saying what ran and what it skipped:

a. ``tests`` — the test suite on CUDA (the kernel tests at GPU sizes and the ``gpu``-marked tests: CUDA-graph
   capture, torch.compile, determinism, bit-identical reruns); JUnit XML and the log.
b. ``bench`` — ``python -m bench --preset gpu``, one (loss, size) at a time, so that a size the budget
   cannot fit is skipped and named instead of losing the rows already measured.
c. ``sweep`` — CCL forward (+ query gradient) configs at D ∈ {128, 256, 512} on 1024×1M and 4096×1M (bf16
   queries and bank) against the 2-GEMM floor (cuBLAS ``x Wᵀ`` plus ``P W``, the products the fused kernel does).

Files in OUT (8): summary.txt, env.json, tests.log, tests.xml, bench.log, bench.json, sweep.log, sweep.json.
``--dry-run`` (CPU, CI) runs the same plumbing on tiny work: test collection only, one tiny benchmark case and
a sweep of two configs on one small problem in the Triton interpreter.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUDGET_S = {"tests": 240, "bench": 150, "sweep": 120}
SWEEP_DIMS = (128, 256, 512)
SWEEP_SHAPES = ((1024, 1_000_000), (4096, 1_000_000))


def _env(wheels: Path | None, extra: dict | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    paths = [str(ROOT)] + (sorted(str(w) for w in wheels.glob("*.whl")) if wheels else [])
    env["PYTHONPATH"] = os.pathsep.join(paths + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return {**env, **(extra or {})}


def _run(cmd: list[str], budget: float, log: Path, env: dict, append: bool = False) -> tuple[int | None, float]:
    """Run ``cmd`` (its own process group) with output to ``log``; kill it at ``budget`` seconds.
    Returns (exit status or None when killed, seconds)."""
    t0 = time.perf_counter()
    with open(log, "a" if append else "w") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=max(1.0, budget))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = None
            f.write(f"\n[gpu-check] killed after the {budget:.0f} s budget\n")
    return rc, time.perf_counter() - t0


def _last_line(log: Path, startswith: str = "") -> str:
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    lines = [ln for ln in lines if not ln.startswith("[gpu-check]") and ln.startswith(startswith)]
    return lines[-1][:200] if lines else "no output"


def stage_tests(out: Path, env: dict, dry: bool) -> tuple[str, bool]:
    log = out / "tests.log"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests", f"--junitxml={out / 'tests.xml'}"]
    if dry:
        cmd.append("--collect-only")
    rc, s = _run(cmd, BUDGET_S["tests"], log, env)
    if rc is None:
        return (f"tests: stopped at the {BUDGET_S['tests']} s budget; skipped: every test after the last one in "
                f"tests.log ({_last_line(log)})"), False
    what = "collected only (dry run)" if dry else "ran the whole suite"
    return f"tests: {what}, exit {rc}, {s:.0f} s: {_last_line(log)}; skipped: none beyond pytest's own skips", rc == 0


def stage_bench(out: Path, env: dict, dry: bool) -> tuple[str, bool]:
    sys.path.insert(0, str(ROOT))
    from bench.run import PRESETS

    log = out / "bench.log"
    log.write_text("")
    jobs = ([("ccl", "32x1000x64")] if dry else
            [(loss, size) for loss, sizes in PRESETS["gpu"].sizes.items() for size in sizes])
    extra = (["--device", "cpu", "--impl", "fastcdml,reference", "--quick", "--no-isolate"] if dry
             else ["--preset", "gpu"])
    done, skipped, failed = [], [], []
    t_end = time.perf_counter() + BUDGET_S["bench"]
    with tempfile.TemporaryDirectory() as tmp:
        for loss, size in jobs:
            left = t_end - time.perf_counter()
            if left < 5:
                skipped.append(f"{loss} {size}")
                continue
            rc, _ = _run([sys.executable, "-m", "bench", *extra, "--loss", loss, "--sizes", size, "--out", tmp],
                         left, log, env, append=True)
            (done if rc == 0 else skipped if rc is None else failed).append(f"{loss} {size}")
        results = sorted(Path(tmp).glob("*.json"))
        if results:
            shutil.copy(results[-1], out / "bench.json")
    return (f"bench: {len(done)} of {len(jobs)} (loss, size) runs measured{' (dry run, CPU)' if dry else ''}"
            + (f"; failed (see bench.log): {', '.join(failed)}" if failed else "")
            + f"; skipped (budget {BUDGET_S['bench']} s): {', '.join(skipped) or 'none'}"), not (failed or skipped)


def stage_sweep(out: Path, env: dict, dry: bool) -> tuple[str, bool]:
    log, path = out / "sweep.log", out / "sweep.json"
    cmd = [sys.executable, "-m", "bench.gpu_check", "--sweep-worker", str(path)] + (["--dry-run"] if dry else [])
    rc, s = _run(cmd, BUDGET_S["sweep"], log, {**env, "TRITON_INTERPRET": "1"} if dry else env)
    rows = json.loads(path.read_text())["rows"] if path.exists() else []
    planned = len(_sweep_plan(dry))
    return (f"sweep: {len(rows)} of {planned} (D, B×C, config) points timed, exit {rc}, {s:.0f} s"
            + ("" if rc is not None else f"; skipped (budget {BUDGET_S['sweep']} s): the {planned - len(rows)} "
                                         "points not in sweep.json")), rc == 0


def _sweep_plan(dry: bool) -> list[tuple[int, int, int, tuple | None]]:
    """(D, B, C, config or None for the launcher's default) points, cheapest first."""
    if dry:
        return [(32, 64, 512, None), (32, 64, 512, (32, 32, 1, 4, 1))]
    plan = []
    for b, c in SWEEP_SHAPES:
        for d in SWEEP_DIMS:
            # the default, then the neighbours that trade registers and shared memory for reuse
            variants = [None, (64, 64, 1, 8, 3), (128, 32, 1, 8, 2), (64, 32, 2, 8, 2)]
            plan += [(d, b, c, v) for v in variants]
    return plan


def sweep_worker(path: Path, dry: bool) -> int:
    import torch

    from fastcdml.kernels import ccl

    dev = torch.device("cpu" if dry else "cuda")
    dtype = torch.float32 if dry else torch.bfloat16
    if dry:
        def bench(fn):
            fn()
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
    else:
        from triton.testing import do_bench

        def bench(fn):
            return do_bench(fn, warmup=10, rep=50)
    rows, floors, data = [], {}, {}
    for d, b, c, cfg in _sweep_plan(dry):
        if (b, c, d) not in data:
            data.clear()
            torch.manual_seed(0)
            w = torch.nn.functional.normalize(torch.randn(c, d, device=dev), dim=1).to(dtype)
            data[(b, c, d)] = (torch.randn(b, d, device=dev, dtype=dtype), torch.randint(0, c, (b,), device=dev), w)
        x, y, w = data[(b, c, d)]
        if (b, c, d) not in floors:
            p = torch.empty(b, c, device=dev, dtype=dtype)
            floors[(b, c, d)] = bench(lambda: x @ w.t()) + bench(lambda: p @ w)
            del p
        config = None if cfg is None else ccl.Config(*cfg)
        used = config or ccl.default_config(d, x.dtype, w.dtype, ccl._smem(dev))
        try:
            ms = bench(lambda: ccl.ccl_fwd(x, y, w, 0.05, 0.1, 1.0, True, config=config))
            err = None
        except Exception as exc:  # noqa: BLE001 - a config that does not compile is a result
            ms, err = None, f"{type(exc).__name__}: {str(exc)[:200]}"
        floor = floors[(b, c, d)]
        rows.append(dict(D=d, B=b, C=c, config=used._asdict(), default=cfg is None, ms=ms, floor_2gemm_ms=floor,
                         vs_floor=None if ms is None else ms / floor,
                         tflops=None if ms is None else 4 * b * c * d / ms / 1e9, error=err))
        print(json.dumps(rows[-1]), flush=True)
        path.write_text(json.dumps({"rows": rows}, indent=1) + "\n")
    return 0


def environment() -> dict:
    import torch
    import triton

    info = dict(torch=torch.__version__, triton=triton.__version__, python=sys.version.split()[0],
                cuda_available=torch.cuda.is_available())
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                    memory_gb=round(p.total_memory / 2**30, 1), cuda=torch.version.cuda)
    with_git = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    info["git"] = with_git.stdout.strip() or None
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="folder for the (at most 8) result files")
    parser.add_argument("--wheels", type=Path, help="folder of extra pure-Python wheels to put on the path")
    parser.add_argument("--dry-run", action="store_true", help="CPU: the same plumbing on tiny work")
    parser.add_argument("--stages", default="tests,bench,sweep", help="comma-separated subset (%(default)s)")
    parser.add_argument("--sweep-worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.sweep_worker:
        return sweep_worker(args.sweep_worker, args.dry_run)
    if args.out is None:
        parser.error("--out is required")
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA device: run on a GPU machine, or pass --dry-run")
    args.out.mkdir(parents=True, exist_ok=True)
    env = _env(args.wheels)
    t0 = time.perf_counter()
    (args.out / "env.json").write_text(json.dumps(environment(), indent=1) + "\n")
    stages = {"tests": stage_tests, "bench": stage_bench, "sweep": stage_sweep}
    lines, ok = [], True
    for name in args.stages.split(","):
        line, passed = stages[name](args.out, env, args.dry_run)
        print(line, flush=True)
        lines.append(line)
        ok &= passed
    lines.append(f"gpu-check: {time.perf_counter() - t0:.0f} s in all{' (dry run)' if args.dry_run else ''}, "
                 + ("every stage completed" if ok else "a stage failed or ran out of time (see above)"))
    (args.out / "summary.txt").write_text("\n".join(lines) + "\n")
    print(lines[-1])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""``python -m bench`` (also ``python -m fastcdml bench`` in a source checkout): time and memory of one training step, per implementation and size.

Sweeps the sizes of a preset (or ``--sizes``) for each loss and implementation (see
:mod:`bench.impls` for what a step is and what each peer does), prints a table and writes
``<out>/<device-slug>-<date>.json`` (``{"rows": [...], "meta": {...}}``, merged with the file of the same day)
and PNG plots (time and memory against C, one line per implementation, log scales) next to it.

Method. Every case gets fresh random inputs and warm-up steps (which also absorb torch.compile). CPU: wall clock
of repeated steps (median, p20, p80) in one fresh subprocess per case; peak extra memory = RSS high-water-mark
growth over one step above the steady state, in a second fresh subprocess started with glibc told to return
every freed block ≥ 64 KiB to the system (``MALLOC_MMAP_THRESHOLD_``), so retained heap cannot hide the peak.
CUDA: ``triton.testing.do_bench`` quantiles (events, L2 flushed between runs); memory = ``max_memory_allocated``
above ``memory_allocated`` before the step; cases run in this process unless ``--isolate``. ``--quick`` (a smoke
test) runs the smallest size per loss in this process, with few repetitions, and leaves out ``torch_compile``
(whose compile alone takes longer than every other case) unless ``--impl`` names it.

Every row records the 1-minute load average before its case; above the cores the benchmark uses (its torch
threads on CPU, one on CUDA) the run warns and the tables mark the row, since other work inflates the times.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import importlib.metadata
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from fastcdml import __version__, backends

from . import impls
from .impls import Case

MODE = "step"
ROW_FIELDS = ("loss", "impl", "backend", "mode", "variant", "B", "C", "D", "dtype", "p50_ms", "p20_ms", "p80_ms",
              "peak_extra_mb", "tflops", "floor_ms", "reps", "device", "torch", "triton", "fastcdml", "date",
              "load_1min", "loaded")
KEY_FIELDS = ("loss", "impl", "mode", "variant", "B", "C", "D", "dtype")
_MARK = "FASTCDML_BENCH_RESULT "
QUICK_LEAVES_OUT = ("torch_compile",)  # unless named in --impl


@dataclass(frozen=True)
class Preset:
    """Sizes ``BxCxD`` per loss (CBML: C is the memory size M, or ``self``), small to large."""

    about: str
    dtype: str
    sizes: dict[str, tuple[str, ...]]
    impls: tuple[str, ...] | None = None  # None: every implementation importable here


PROXY_ANCHOR_SIZES = tuple(f"{b}x{c}x{d}" for c in (1000, 100_000, 1_000_000) for b in (256, 1024) for d in (128, 512))
PRESETS = {
    "cpu": Preset(
        "CPU sweep (default without CUDA): ~16 min on 2 cores, C up to 50k / M up to 8k, with PML and the GEMM floor",
        "float32",
        {"ccl": ("256x1000x128", "256x10000x128", "256x50000x128"),
         "cbml": ("256xselfx128", "256x2048x128", "256x8192x128"),
         "margin": ("256x1000x128", "256x10000x128"), "proxy_anchor": ("256x1000x128",)},
    ),
    "cpu-full": Preset(
        "longer CPU sweep, C up to 100k / M up to 16k: ~12 min on 2 busy cores, 30 cases",
        "float32",
        {"ccl": ("256x1000x128", "256x10000x128", "256x100000x128"),
         "cbml": ("256xselfx128", "256x2048x128", "256x16384x128"),
         "margin": ("256x1000x128", "256x10000x128", "256x100000x128"), "proxy_anchor": ("256x1000x128",)},
    ),
    "cpu-targets": Preset(
        "the C++ backend's target sizes: C++ vs the eager reference",
        "float32",
        {"ccl": ("1024x100000x128", "256x11318x512"), "cbml": ("512xselfx512", "256x16384x128"), "margin": (),
         "proxy_anchor": ()},
        ("fastcdml", "reference"),
    ),
    "gpu": Preset(
        "the Triton kernels' target sizes plus a C sweep at fixed B, D (default on CUDA)",
        "bfloat16",
        {"ccl": ("256x100x128", "512x11318x512", "1024x10000x512", "1024x100000x512", "1024x1000000x512",
                 "4096x1000000x512"),
         "cbml": ("100xselfx512", "512xselfx512", "1024x4096x128", "1024x16384x128", "256x55000x128",
                  "1024x65536x128"),
         "margin": ("512x100000x512", "1024x1000000x512"), "proxy_anchor": PROXY_ANCHOR_SIZES},
    ),
    "proxy-anchor": Preset(
        "ProxyAnchor against PML, C in {1k, 100k, 1M} x B in {256, 1024} x D in {128, 512}; sizes beyond the "
        "machine's memory (PML) or --max-case-s (CPU estimate) are recorded as not run",
        "float32",
        {"proxy_anchor": PROXY_ANCHOR_SIZES},
    ),
}


def parse_size(text: str, loss: str, impl: str, dtype: str) -> Case:
    """``"BxCxD"`` → Case; for CBML, C is M (memory variant) or ``self`` (the batch is the reference set)."""
    match = re.fullmatch(r"(\d+)x(\d+|self)x(\d+)", text.strip())
    if match is None:
        raise ValueError(f"size {text!r} is not BxCxD (e.g. 256x100000x128, or 512xselfx512 for CBML)")
    b, c, d = match.groups()
    if c == "self":
        if loss != "cbml":
            raise ValueError(f"size {text!r}: 'self' is a CBML reference set, not a number of classes")
        return Case(loss, impl, "self", int(b), int(b), int(d), dtype)
    variant = {"ccl": "momentum", "margin": "gradient", "proxy_anchor": "gradient"}.get(loss, "memory")
    return Case(loss, impl, variant, int(b), int(c), int(d), dtype)


def plan(args, device: torch.device) -> tuple[list[Case], list[dict]]:
    """The cases to run, size by size, and the (loss, impl) pairs skipped with the reason."""
    preset = PRESETS[args.preset]
    losses = [args.loss] if args.loss else list(impls.IMPLS)
    wanted = args.impl.split(",") if args.impl else None
    unknown = set(wanted or ()) - {i for loss in losses for i in impls.IMPLS[loss]}
    if unknown:
        raise SystemExit(f"unknown --impl {sorted(unknown)}; choose from {dict((k, impls.IMPLS[k]) for k in losses)}")
    dtype = args.dtype or preset.dtype
    cases, skipped = [], []
    for loss in losses:
        sizes = args.sizes.split(",") if args.sizes else preset.sizes.get(loss, ())[: 1 if args.quick else None]
        if args.sizes and loss == "ccl" and not args.loss:
            sizes = [s for s in sizes if "self" not in s]
        names = [i for i in impls.IMPLS[loss] if i in (wanted or preset.impls or impls.IMPLS[loss])]
        if args.quick and not wanted:  # its compile costs more than every other quick case together
            names = [i for i in names if i not in QUICK_LEAVES_OUT]
        runnable = []
        for impl in names:
            reason = impls.unavailable(impl, device)
            if reason is None:
                runnable.append(impl)
            else:
                skipped.append({"loss": loss, "impl": impl, "reason": reason})
        for case in (parse_size(s, loss, impl, dtype) for s in sizes for impl in runnable):
            reason = impls.over_budget(case, device, args.max_case_s)
            if reason is None:
                cases.append(case)
            else:
                skipped.append({**asdict(case), "reason": reason})
    return cases, skipped


# ------------------------------------------------------------------------------------------- measuring


def _proc_status(field: str) -> int:
    """``VmRSS`` / ``VmHWM`` of this process in bytes (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"{field} not in /proc/self/status")


def _peak_extra_mb(run, device: torch.device) -> float | None:
    """Peak memory of one step above the steady state, in MiB (None where it cannot be measured).

    CPU: RSS high-water mark growth over one step. It is exact only when glibc returns every freed block to the
    system (``MALLOC_MMAP_THRESHOLD_`` set at process start, as :func:`measure_isolated` does); otherwise
    blocks kept from earlier steps are reused and the growth is underestimated (seen: 49–134 MB for 138)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        run()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the RSS high-water mark to the current RSS
        base = _proc_status("VmRSS")
        run()
        return (_proc_status("VmHWM") - base) / 2**20
    except OSError:
        return None


def _times_ms(run, device: torch.device, quick: bool) -> list[float]:
    """[p50, p20, p80, reps] of one step in ms, after warm-up."""
    if device.type == "cuda":
        from triton.testing import do_bench

        rep_ms = 20 if quick else 200
        p50, p20, p80 = do_bench(run, warmup=10 if quick else 50, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
        return [p50, p20, p80, max(int(rep_ms / max(p50, 1e-3)), 1)]
    budget_s, min_reps, max_reps = (0.2, 3, 20) if quick else (2.0, 7, 200)
    start = time.perf_counter()
    run()
    probe = time.perf_counter() - start
    times = []
    for _ in range(int(min(max(budget_s / max(probe, 1e-6), min_reps), max_reps))):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1e3)
    q = statistics.quantiles(times, n=10, method="inclusive")
    return [statistics.median(times), q[1], q[7], len(times)]


def floor_ms(case: Case, device: torch.device, quick: bool) -> float:
    """The row's GEMM floor: the median time of ``torch.mm`` (the BLAS on CPU, cuBLAS on CUDA) on each of
    :func:`impls.products` in the case's dtype, into preallocated outputs, summed. A fused step cannot do less
    work than these products, so its time over the floor says what the fusion costs or saves."""
    dtype = getattr(torch, case.dtype)
    total = 0.0
    for m, n, k in impls.products(case):
        a, b = torch.randn(m, k, device=device, dtype=dtype), torch.randn(k, n, device=device, dtype=dtype)
        out = torch.empty(m, n, device=device, dtype=dtype)
        total += _times_ms(lambda: torch.mm(a, b, out=out), device, quick)[0]
    return total


def measure(case: Case, device: torch.device, quick: bool, parts: str = "time,memory") -> dict:
    """Build ``case`` on fresh inputs, warm up, then time it and/or measure its memory (``parts``); the row's
    measured fields."""
    torch._dynamo.reset()  # no compiled graph (or recompile budget) carried over from another case
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the backend fallback; the row's backend says it
        step = impls.build(case, impls.make_inputs(case, device))
        for _ in range(1 if quick else 2):
            step.run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        result = {"backend": step.backend}
        if "time" in parts:
            p50, p20, p80, reps = _times_ms(step.run, device, quick)
            result.update(p50_ms=p50, p20_ms=p20, p80_ms=p80, reps=reps, tflops=impls.nominal_gflop(case) / p50)
        if "memory" in parts:
            result["peak_extra_mb"] = _peak_extra_mb(step.run, device)
        del step
    if "time" in parts:  # after the step's tensors are freed
        result["floor_ms"] = floor_ms(case, device, quick)
    return result


def _worker(case: Case, device: torch.device, quick: bool, timeout: float, parts: str, env: dict) -> dict:
    cmd = [sys.executable, "-m", "bench", "--worker", json.dumps(asdict(case)), "--device", str(device),
           "--parts", parts]
    path = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parent.parent), os.environ.get("PYTHONPATH")]))
    proc = subprocess.run(cmd + (["--quick"] if quick else []), capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": path, **env})
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(_MARK):
            return json.loads(line[len(_MARK):])
    tail = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
    raise RuntimeError(tail[:300])


def measure_isolated(case: Case, device: torch.device, quick: bool, timeout: float) -> dict:
    """:func:`measure` in fresh interpreters: one times the step with the default allocator; on CPU another
    measures its memory with glibc returning every freed block ≥ 64 KiB to the system from the start (which
    slows steps down, hence two processes), so no earlier allocation hides or inflates the peak."""
    if device.type == "cuda":
        return _worker(case, device, quick, timeout, "time,memory", {})
    timed = _worker(case, device, quick, timeout, "time", {})
    return {**timed, **_worker(case, device, quick, timeout, "memory", {"MALLOC_MMAP_THRESHOLD_": "65536"})}


# ------------------------------------------------------------------------------------------ environment


def _cpuinfo() -> dict[str, str]:
    """The first CPU's fields in /proc/cpuinfo (empty where there is none)."""
    fields: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            key, _, value = line.partition(":")
            if not key.strip():
                break
            fields.setdefault(key.strip(), value.strip())
    return fields


def _cpu_name() -> str:
    return _cpuinfo().get("model name") or platform.processor() or platform.machine()


def cpu_model() -> str:
    """The host CPU with its vendor's family and model numbers, which a VM's model name may leave out (e.g.
    "AMD EPYC, family 25 model 17"): speed claims name the CPU they were measured on."""
    info = _cpuinfo()
    numbers = f", family {info['cpu family']} model {info['model']}" if "cpu family" in info and "model" in info else ""
    return _cpu_name() + numbers


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{_cpu_name()} ({torch.get_num_threads()} threads)"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git() -> str | None:
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (sha + ("-dirty" if dirty else "")) or None


def environment(device: torch.device) -> dict:
    """The fields every row carries (device, versions, date), and the host CPU (:func:`cpu_model`) for the meta."""

    return {"device": device_name(device), "torch": torch.__version__, "triton": _version("triton"),
            "fastcdml": __version__, "date": dt.date.today().isoformat(), "cpu": cpu_model()}


def write_results(out: Path, meta: dict, name: str, rows: list[dict], key: tuple[str, ...] = ()) -> Path:
    """Write ``{"meta", "rows"}`` to ``out/<device slug>-<name>-<date>.json`` and print its path. With ``key`` (the
    fields naming a case), the rows of the day's earlier runs whose case was not measured again are kept."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{slug(meta['device'])}-{name}-{meta['date']}.json"
    if key and path.exists():  # a case measured again replaces its old row
        fresh = {tuple(r[k] for k in key) for r in rows}
        rows = [r for r in json.loads(path.read_text())["rows"] if tuple(r[k] for k in key) not in fresh] + rows
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    print(f"wrote {path}")
    return path


def cores_used(device: torch.device) -> int:
    """How many cores a case keeps busy: torch's CPU threads, or the one launching thread for CUDA."""
    return torch.get_num_threads() if device.type == "cpu" else 1


def load_check(cores: int) -> tuple[float | None, bool]:
    """(1-minute load average, whether it exceeds ``cores``): more runnable tasks than the cores the benchmark
    uses means other work competes with it, and small cases then read several times slower (bench/NOTES.md)."""
    try:
        load = round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):  # no load average on this platform
        return None, False
    return load, load > cores


LOADED_NOTE = ("measured while the 1-minute load average exceeded the cores the benchmark used: other work "
               "competed with it, so the time is likely inflated")


# --------------------------------------------------------------------------------------------- reporting


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 10 ** digits else f"{value:.0f}"
    return str(value)


def table(rows: list[dict], markdown: bool = False) -> str:
    """The rows as a text (or Markdown) table, with the speed-up over the eager reference at the same size and the
    time over the row's GEMM floor (:func:`floor_ms`)."""
    ref = {tuple(r[k] for k in KEY_FIELDS if k != "impl"): r["p50_ms"] for r in rows if r["impl"] == "reference"}
    head = ["loss", "variant", "B", "C", "D", "dtype", "impl", "backend", "p50 ms", "p20–p80 ms", "peak extra MB",
            "TFLOP/s", "× ref", "× floor"]
    body = []
    for r in sorted(rows, key=lambda r: (r["loss"], r["variant"], r["D"], r["B"], r["C"], r["impl"])):
        base = ref.get(tuple(r[k] for k in KEY_FIELDS if k != "impl"))
        body.append([r["loss"], r["variant"], r["B"], "self" if r["variant"] == "self" else r["C"], r["D"],
                     r["dtype"], r["impl"], r["backend"], _fmt(r["p50_ms"]) + (" *" if r.get("loaded") else ""),
                     f"{_fmt(r['p20_ms'])}–{_fmt(r['p80_ms'])}", _fmt(r["peak_extra_mb"]),
                     _fmt(r.get("tflops"), 2), _fmt(base / r["p50_ms"], 2) if base else "–",
                     _fmt(r["p50_ms"] / r["floor_ms"], 2) if r.get("floor_ms") else "–"])
    cells = [head] + [[str(c) for c in line] for line in body]
    note = [f"* {LOADED_NOTE}."] if any(r.get("loaded") for r in rows) else []
    if markdown:
        lines = ["| " + " | ".join(line) + " |" for line in cells]
        return "\n".join(lines[:1] + ["|" + "---|" * len(head)] + lines[1:] + (["", *note] if note else []))
    widths = [max(len(line[i]) for line in cells) for i in range(len(head))]
    return "\n".join(["  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in cells] + note)


def plot(rows: list[dict], out: Path, stem: str) -> tuple[list[str], str | None]:
    """One PNG per (loss, variant, B, D, dtype) with ≥ 2 values of C: time and memory against C, one line per
    impl, log scales. Returns the file names and a note (why no plots), if any."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["loss"], r["variant"], None if r["variant"] == "self" else r["B"], r["D"], r["dtype"]),
                          []).append(r)
    groups = {key: group for key, group in groups.items() if len({r["C"] for r in group}) >= 2}
    if not groups:  # e.g. one size per loss: nothing to draw, and no matplotlib import (seconds) either
        return [], None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return [], "matplotlib is not installed (pip install 'fastcdml[bench]'): no plots"
    files = []
    for (loss, variant, b, d, dtype), group in sorted(groups.items(), key=str):
        fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
        for impl in sorted({r["impl"] for r in group}):
            line = sorted((r for r in group if r["impl"] == impl), key=lambda r: r["C"])
            backends = {r["backend"] for r in line}
            label = f"{impl} ({', '.join(sorted(backends))})" if impl == "fastcdml" else impl
            c = [r["C"] for r in line]
            (handle,) = ax_t.plot(c, [r["p50_ms"] for r in line], marker="o", label=label)
            ax_t.fill_between(c, [r["p20_ms"] for r in line], [r["p80_ms"] for r in line], alpha=0.2,
                              color=handle.get_color())
            mem = [(r["C"], r["peak_extra_mb"]) for r in line if (r["peak_extra_mb"] or 0) > 0]
            if mem:
                ax_m.plot(*zip(*mem), marker="o", label=label, color=handle.get_color())
        xlabel = {"ccl": "C (classes)", "margin": "C (classes)", "proxy_anchor": "C (classes)",
                  "self": "B = reference set (self mode)"}.get(
            loss if loss in ("ccl", "margin", "proxy_anchor") else variant, "M (memory entries)")
        size = f"D={d}" if b is None else f"B={b}, D={d}"
        for ax, ylabel in ((ax_t, "ms per training step (median, p20–p80)"), (ax_m, "peak extra memory (MB)")):
            ax.set(xscale="log", yscale="log", xlabel=xlabel, ylabel=ylabel)
            ax.grid(True, which="both", alpha=0.3)
        ax_t.legend(fontsize=8)
        fig.suptitle(f"{loss.upper()} {variant}, {size}, {dtype} — {group[0]['device']}", fontsize=10)
        fig.tight_layout()
        name = f"{stem}-{loss}-{variant}-{'' if b is None else f'B{b}-'}D{d}-{dtype}.png"
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        files.append(name)
    return files, None


def merge(path: Path, rows: list[dict], meta: dict) -> tuple[list[dict], dict]:
    """``rows`` and ``meta`` merged with the results file at ``path``, if any: rows of the same case are
    replaced, runs accumulate, and the peer notes cover every implementation in the rows."""
    old_rows, runs = [], []
    if path.exists():
        with contextlib.suppress(ValueError, KeyError, TypeError):
            old = json.loads(path.read_text())
            old_rows, runs = old["rows"], old["meta"].get("runs", [])
    keys = {tuple(r[k] for k in KEY_FIELDS) for r in rows}
    merged = [r for r in old_rows if tuple(r[k] for k in KEY_FIELDS) not in keys] + rows
    meta = dict(meta, runs=runs + meta["runs"],
                notes={i: impls.NOTES[i] for i in sorted({r["impl"] for r in merged}) if i in impls.NOTES})
    return merged, meta


# ------------------------------------------------------------------------------------------------ CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Time and memory of one training step (forward + backward + bank update) per implementation.",
        epilog="presets: " + "; ".join(f"{k}: {v.about}" for k, v in PRESETS.items()),
    )
    p.add_argument("--preset", choices=PRESETS, help="size set (default: gpu on CUDA, cpu otherwise)")
    p.add_argument("--sizes", help="comma-separated BxCxD (C = classes, or M memory entries / 'self' for CBML)")
    p.add_argument("--loss", choices=tuple(impls.IMPLS), help="one loss family only (default: all)")
    p.add_argument("--impl", help="comma-separated implementations (default: the preset's, or every importable one)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="input dtype (default: the preset's)")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--quick", action="store_true",
                   help="smoke test, under a minute on 2 cores: the smallest size per loss, few repetitions, every "
                        "case in this process (so CPU memory is approximate unless --isolate), and no torch_compile "
                        "unless --impl names it")
    p.add_argument("--out", default="bench/results", help="results folder (default: bench/results)")
    p.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                   help="fresh subprocesses per case (default: on for CPU, where memory is exact only so, except "
                        "with --quick; off for CUDA)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per isolated case (default 1800)")
    p.add_argument("--max-case-s", type=float, default=600,
                   help="proxy_anchor on CPU: leave out (and record) sizes whose estimated time exceeds this "
                        "(default 600)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--parts", default="time,memory", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the sweep (or, with the hidden ``--worker``, one case) and return the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parser().parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.worker:
        result = measure(Case(**json.loads(args.worker)), device, args.quick, args.parts)
        print(_MARK + json.dumps(result), flush=True)
        return 0
    from tqdm import tqdm


    args.preset = args.preset or ("gpu" if device.type == "cuda" else "cpu")
    isolate = (device.type == "cpu" and not args.quick) if args.isolate is None else args.isolate
    cases, skipped = plan(args, device)
    env = environment(device)
    started, t0 = dt.datetime.now().isoformat(timespec="seconds"), time.perf_counter()
    cores = cores_used(device)
    load0, warned = load_check(cores)  # before the first case: the other work on the machine
    if warned:
        print(f"bench: warning: the 1-minute load average is {load0}, more than the {cores} cores this benchmark "
              "uses: other work will compete with it and inflate the timings (rows measured so are marked *)",
              file=sys.stderr)
    for s in skipped:
        print(f"skip {s['loss']} {s['impl']}: {s['reason']}", file=sys.stderr)
    rows = []
    bar = tqdm(cases, desc="bench", unit="case", file=sys.stderr)
    for case in bar:
        bar.set_postfix_str(case.label())
        load, loaded = load_check(cores)
        if loaded and not warned:
            warned = True
            bar.write(f"bench: warning: the 1-minute load average rose to {load}, more than the {cores} cores this "
                      "benchmark uses; rows measured so are marked *", file=sys.stderr)
        if device.type == "cuda" and not isolate:
            gc.collect()  # the previous case's tensors (also after an OOM) go back to the device
            torch.cuda.empty_cache()
        try:
            result = (measure_isolated(case, device, args.quick, args.timeout) if isolate
                      else measure(case, device, args.quick))
        except Exception as err:  # one failing case (OOM, a peer's bug) must not end the sweep
            skipped.append({**asdict(case), "reason": f"{type(err).__name__}: {str(err).strip()[:300]}"})
            bar.write(f"failed {case.label()}: {skipped[-1]['reason']}", file=sys.stderr)
            continue
        fields = {**asdict(case), **env, "mode": MODE, **result, "load_1min": load, "loaded": loaded}
        rows.append({k: fields[k] for k in ROW_FIELDS})
    wall_s = time.perf_counter() - t0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{slug(env['device'])}-{env['date']}"
    meta = {**{k: env[k] for k in ("device", "torch", "triton", "fastcdml", "cpu")}, "device_slug": slug(env["device"]),
            "device_type": device.type, "threads": torch.get_num_threads(), "python": platform.python_version(),
            "platform": platform.platform(), "git": _git(), "backends": backends(),
            "runs": [{"command": " ".join(["python -m bench", *argv]), "preset": args.preset,
                      "isolated": isolate, "quick": args.quick, "started": started, "wall_s": round(wall_s, 1),
                      "load_avg_1min": [load0, load_check(cores)[0]], "cores_used": cores,
                      "loaded_rows": sum(r["loaded"] for r in rows), "skipped": skipped}]}
    path = out / f"{stem}.json"
    merged, meta = merge(path, rows, meta)
    files, note = plot(merged, out, stem)
    meta["plots"] = files
    path.write_text(json.dumps({"rows": merged, "meta": meta}, indent=1) + "\n")
    print(table(rows) if rows else "no rows measured")
    for impl in sorted({r["impl"] for r in rows} & set(impls.NOTES)):
        print(f"note {impl}: {impls.NOTES[impl]}")
    for s in skipped:
        print(f"skipped {s.get('loss')} {s.get('impl')}: {s['reason']}")
    if any(r["loaded"] for r in rows):
        print(f"warning: {sum(r['loaded'] for r in rows)} of {len(rows)} rows were measured while the 1-minute "
              f"load average exceeded the {cores} cores the benchmark used (marked *)", file=sys.stderr)
    print(f"wrote {path} ({len(rows)} rows this run, {len(merged)} in the file) and {len(files)} plots"
          + (f"; {note}" if note else "") + f" in {wall_s:.0f} s")
    return 0 if rows or not cases else 1


if __name__ == "__main__":
    sys.exit(main())

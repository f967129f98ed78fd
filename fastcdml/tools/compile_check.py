"""Offline GPU compile check: ``python -m fastcdml compile-check [--targets ...] [--json FILE]``.

Compiles, without a GPU and without ``TRITON_INTERPRET``, every Triton kernel that fastcdml's launchers would
launch for a matrix of problems, for the targets sm_90a (H100/H200), sm_80 (A100) and sm_86 (consumer Ampere),
and reports per compiled kernel: compiled or the error, registers per thread, spill bytes, shared memory
against the target's per-block limit, whether the launcher had to shrink its config to fit, wgmma use on
sm_90a, and the compile time.

A row is one compiled specialisation per target (its identity: Triton's kernel hash, which covers every
constexpr, argument dtype, integer and alignment specialisation and launch option), shown by its ``spec``
(``_spec``: every constexpr — ``EPILOGUE``, ``COMPUTE_GRAD``, ``FOREIGN``, ``ANGULAR``, … —, the dtypes of the
tensor arguments that are not fp32, ``num_warps`` and ``num_stages``; two rows share one when only Triton's
integer or alignment specialisation differs) and listing every problem that compiled it; a compile error is
one row per spec. Nothing in a row or a verdict depends on the order of the problems, and the problems of one
D do not depend on which other Ds are asked for (``cases``), so ``--dims 512`` judges exactly the D = 512
kernels of the full run.

How: the launchers run on CPU tensors with Triton's active driver replaced by one that only names the target
(``GPUTarget("cuda", cc, 32)``) and with ``JITFunction.run`` turned into a compile (``warmup=True``), so the
launcher's own config choice, its shrink retries, its split heuristic and Triton's argument specialisation
decide what is compiled — the check drives the real launch path and cannot drift from it. The whole NVIDIA
pipeline runs (TTIR → TTGIR → LLIR → PTX → cubin with the ptxas in the triton wheel); ptxas's ``-v`` log gives
registers and spills. A compiled kernel whose shared memory exceeds the target's limit raises
``OutOfResources`` exactly as the CUDA launcher would, so the launcher's shrink path runs and is reported.
``fastcdml.kernels._device.limits`` / ``resources`` (SM count, per-SM limits, a kernel's registers and shared
memory: the split heuristic's occupancy) are answered from the target's table and the ptxas log.

Each target runs in its own process with a fresh ``TRITON_CACHE_DIR`` (nothing is cached between runs); the
same specialisation met by several problems is compiled once per target. The launchers keep no state that
changes their config choice (``fastcdml.kernels.ccl._launch``); their one cache, the split kernel's occupancy,
is emptied before each problem, so a problem compiles the same kernels whatever ran before it in the process.

Gates (``gates()``; ``--gates`` exits 1 when one fails): every kernel compiles on every target; the launcher's
config fits without the shrink path (a config that needs the launcher's runtime shrink fails); on sm_90a the
matrix-product loops (``WGMMA_KERNELS``) use wgmma unless they compute fp32 FMA products or have fewer than the
64 rows a wgmma needs (``_wgmma_expected``); no spills in the CCL forward at D ≤ 256 with 16-bit queries, at
most ``SPILL_BUDGET`` bytes elsewhere unless the specialisation matches an ``OVER_BUDGET`` entry with its
reason; no kernel takes more than ``MAX_COMPILE_S`` to compile.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import sys
import tempfile
import time
import warnings
from multiprocessing import get_context
from typing import NamedTuple


class Target(NamedTuple):
    capability: int
    sms: int
    smem_per_block: int
    smem_per_sm: int
    threads_per_sm: int


TARGETS = {
    "sm_90a": Target(90, 132, 227 * 1024, 228 * 1024, 2048),  # H100 SXM
    "sm_80": Target(80, 108, 163 * 1024, 164 * 1024, 2048),  # A100
    "sm_86": Target(86, 84, 99 * 1024, 100 * 1024, 1536),  # RTX 3090 / A40 class
}
DIMS = (64, 128, 256, 512, 1024)
FULL_DIMS = (128, 512)  # every dtype pair here; CBML's modes at the first, the fp32 precisions at the last
# (x dtype, bank dtype): CCL queries with the fp32 master bank or a bf16 bank; CBML batch with its memory.
CCL_PAIRS = (("fp32", "fp32"), ("bf16", "fp32"), ("fp16", "fp32"), ("fp32", "bf16"), ("bf16", "bf16"))
CBML_PAIRS = (("fp32", "fp32"), ("bf16", "bf16"), ("fp16", "fp16"), ("bf16", "fp32"), ("fp16", "fp32"))
PA_PAIRS = (("fp32", "fp32"), ("bf16", "fp32"), ("fp16", "fp32"), ("bf16", "bf16"))  # (embeddings, proxies)
PRECISIONS = ("highest", "high", "medium")  # torch.get_float32_matmul_precision() for fp32 products
WGMMA_KERNELS = ("_ccl_fwd_kernel", "_ccl_bwd_centers_kernel", "_cbml_stats_kernel", "_cbml_sums_kernel",
                 "_cbml_grad_query_kernel", "_cbml_grad_ref_kernel", "_pair_stats_kernel", "_pair_grad_kernel")
SPILL_BUDGET = 512  # bytes of spill stores per thread
MAX_COMPILE_S = 60.0
# Specialisations allowed above SPILL_BUDGET, each with its reason (also in bench/NOTES.md): (kernel, {spec field:
# regular expression its value must match in full}, targets, reason). An entry that names no EPILOGUE /
# COMPUTE_GRAD / … value covers every variant.
OVER_BUDGET: list[tuple[str, dict[str, str], tuple[str, ...], str]] = [
    ("_ccl_fwd_kernel", dict(BLOCK_D="1024", DOT="bf16|fp16", SOFT="False"), ("sm_90a",),
     "64 rows × D = 1024 of 16-bit queries stay in registers for the whole C loop: 1.4–1.5 KB at any D split, "
     "2.3 KB in the fused-epilogue variant"),
    ("_ccl_fwd_kernel", dict(BLOCK_D="512", DOT="fp32", PREC="tf32"), ("sm_90a",),
     "'high' fp32 operands, 64 × 512 query tile: 1.1 KB; 32 rows would lose wgmma"),
    ("_ccl_fwd_kernel", dict(BLOCK_D="512", DOT="bf16|fp16", SOFT="False"), ("sm_90a", "sm_80", "sm_86"),
     "64 rows × 512: the fp32 accumulator alone is 128 registers per thread at 8 warps; 1.1–1.9 KB, also with "
     "the D split (it halves the accumulator but adds the PV operand tile)"),
    ("_ccl_fwd_kernel", dict(BLOCK_D="512|1024", DOT="bf16|fp16", SOFT="True"), ("sm_90a", "sm_80"),
     "SoftTriple's centre mean (slopes and padded (rows, classes, 16) tiles) next to the accumulator of the row: "
     "up to 3.3 KB in the fused-epilogue variant (sm_80, D = 512, 64 rows without the D split), 0.4–1.9 KB "
     "elsewhere"),
    ("_ccl_fwd_kernel", dict(BLOCK_D="128", DOT="fp32", PREC="tf32x3"), ("sm_90a",),
     "tf32x3 keeps hi and lo parts of both operands: 680 B at 64 × 128"),
    ("_cbml_stats_kernel", dict(PRECISION="tf32x3", TOPK="1"), ("sm_90a",),
     "fp32 or mixed inputs at 'highest', top-K: hi/lo operand parts next to the 64 × 64 int64 key tile, 0.4–0.6 KB"),
    ("_cbml_stats_kernel", dict(PRECISION="tf32x3", TOPK="0"), ("sm_90a",),
     "fp32 inputs at 'highest', adaptive negatives: hi/lo operand parts of the 64 × 64 tile; within 512 B with "
     "triton 3.9, 532 B with triton 3.6"),
    ("_cbml_grad_query_kernel", dict(PRECISION="tf32x3"), ("sm_90a",),
     "fp32 inputs at 'highest': hi/lo parts of the G tile and of the operand, 0.5–0.7 KB"),
    ("_cbml_grad_ref_kernel", dict(PRECISION="tf32x3"), ("sm_90a",),
     "fp32 inputs at 'highest': hi/lo parts of the G tile and of the operand, 0.7–1.1 KB"),
    ("_pa_rows_kernel", dict(BLOCK_D="512", DOT="fp32", PREC="ieee"), ("sm_90a", "sm_80", "sm_86"),
     "fp32 inputs at 'highest' (FMA products): the owned 16 × 512 query operand, the accumulator and the streamed "
     "proxy tile in the FMA layouts of both products, 2.2–2.6 KB at 8 warps (9–13 KB at 4)"),
    ("_pa_rows_kernel", dict(BLOCK_D="1024", DOT="bf16|fp16"), ("sm_90a", "sm_80", "sm_86"),
     "16 rows × D = 1024: the owned operand, the accumulator and the renormalised proxy tile, 0.6–1.4 KB"),
]


def _allowed_over_budget(target: str, row: dict) -> bool:
    return any(row["kernel"] == k and target in ts and all(
        f in row["spec"] and re.fullmatch(rx, str(row["spec"][f])) for f, rx in fields.items())
        for k, fields, ts, _ in OVER_BUDGET)


def cases(dims=DIMS) -> list[dict]:
    """The problem matrix (B=256, C=1000 classes, CBML memory M=4096), chosen so that every kernel, code path
    and dtype branch compiles at least once per target at a moderate cost (a specialisation met twice compiles
    once). Which problems a D gets depends on that D alone (``FULL_DIMS``), so ``cases(dims)`` holds the
    problems of ``cases((d,))`` for each d in ``dims``:

    - CCL training step (forward + query gradient, proxy gradient, momentum update: both update modes' kernels)
      for every (x, bank) dtype pair at D = 128 and 512, and for fp32 and bf16 queries with the fp32 bank and
      the bf16 bank at every D; fp32 products at each ``torch.set_float32_matmul_precision`` setting at D = 512
      (at the other D "highest" only); the fused-epilogue path (a batch that fills the GPU, so no split of C)
      for fp32 and bf16 queries with the fp32 bank at every D and the bf16 bank at D = 128 and 512; the forward
      without gradient at D = 512.
    - SoftTriple's centre mean (``SOFT``: K = 10 rows per class, γ = 0.1) in the training step for fp32 and bf16
      queries with the fp32 bank at every D (and the bf16 bank at D = 128 and 512), and in the fused-epilogue
      path for bf16 queries with the fp32 bank.
    - The class-sharded step (per-slice partials, the forward kernel without its epilogue, and the slice's proxy
      gradient with foreign labels) for fp32 and bf16 queries with the fp32 bank at every D, and the bf16 bank
      at D = 128 and 512.
    - ProxyAnchor forward with both gradients (columns and rows kernels) for fp32 and bf16 embeddings with fp32
      proxies at every D, and fp16 / fp32 and bf16 / bf16 at D = 128 and 512.
    - CBML forward + both gradients, adaptive negatives, for every (batch, memory) dtype pair; top-K with
      K = 100 and 1000 for 16-bit, fp32 and mixed inputs; every D for one 16-bit and the fp32 pair; the
      reference set without the batch; a mined-pair mask (adaptive and top-K). These use the class-means
      variance centre and φ = log; the boundary centre for the fp32, 16-bit and mixed pairs (adaptive) and top-K
      with K = 100, and φ = sqrt and constant once each.
    - Pair losses (batch against a memory M = 4096, both gradients): NTXent for every (batch, memory) dtype pair
      at D = 128 and 512 and for fp32 and bf16 at every D; SupCon, MultiSimilarity and Contrastive for fp32
      and bf16, mined multiplicities and the plain label mode at the first full D.
    """
    full, modes = FULL_DIMS, [d for d in dims if d == FULL_DIMS[0]]
    out = []
    ccl = dict(loss="ccl", op="train", precision="highest", b=256, c=1000)
    for d in dims:
        pairs = CCL_PAIRS if d in full else (("fp32", "fp32"), ("bf16", "fp32"), ("bf16", "bf16"))
        out += [dict(ccl, d=d, x=x, bank=w) for x, w in pairs]
        if d == full[-1]:
            out += [dict(ccl, d=d, x="fp32", bank="fp32", precision=p) for p in PRECISIONS[1:]]
    for d in dims:
        pairs = (("bf16", "fp32"), ("fp32", "fp32")) + ((("bf16", "bf16"),) if d in full else ())
        out += [dict(ccl, op="fused", d=d, x=x, bank=w, b=32768) for x, w in pairs]
    out += [dict(ccl, op="eval", d=d, x="bf16", bank="fp32") for d in dims if d == full[-1]]
    soft = dict(ccl, sub_centers=10, gamma=0.1)
    for d in dims:
        pairs = (("fp32", "fp32"), ("bf16", "fp32")) + ((("bf16", "bf16"),) if d in full else ())
        out += [dict(soft, d=d, x=x, bank=w) for x, w in pairs]
        out.append(dict(soft, op="fused", d=d, x="bf16", bank="fp32", b=32768))
    for d in dims:
        pairs = (("fp32", "fp32"), ("bf16", "fp32")) + ((("bf16", "bf16"),) if d in full else ())
        out += [dict(ccl, op="sharded", d=d, x=x, bank=w) for x, w in pairs]
    cbml = dict(loss="cbml", op="train", precision="highest", top_k=0, b=256, m=4096, include_self=True,
                center="class_means", phi="log")
    for d in dims:
        pairs = CBML_PAIRS if d in modes else (("fp32", "fp32"), ("bf16", "bf16"))
        out += [dict(cbml, d=d, x=x, bank=r) for x, r in pairs]
    for d in modes:
        for top_k in (100, 1000):
            out += [dict(cbml, d=d, x=x, bank=r, top_k=top_k)
                    for x, r in (("bf16", "bf16"), ("fp32", "fp32"), ("bf16", "fp32"))]
        out.append(dict(cbml, op="ref-only", d=d, x="bf16", bank="bf16", top_k=100, include_self=False))
        out += [dict(cbml, d=d, x="bf16", bank="fp32", top_k=top_k, mask=True) for top_k in (0, 100)]
        out += [dict(cbml, d=d, x=x, bank=r, center="boundary")
                for x, r in (("fp32", "fp32"), ("bf16", "bf16"), ("bf16", "fp32"))]
        out.append(dict(cbml, d=d, x="bf16", bank="bf16", top_k=100, center="boundary"))
        out += [dict(cbml, d=d, x="bf16", bank="bf16", phi=phi) for phi in ("sqrt", "constant")]
    pa = dict(loss="proxy_anchor", op="train", precision="highest", b=256, c=1000)
    for d in dims:
        pairs = PA_PAIRS if d in full else PA_PAIRS[:2]
        out += [dict(pa, d=d, x=x, bank=p) for x, p in pairs]
    pair = dict(loss="pair", op="train", precision="highest", b=256, m=4096, kind=0, pairs="exclude")
    for d in dims:
        pairs = CBML_PAIRS if d in full else (("fp32", "fp32"), ("bf16", "bf16"))
        out += [dict(pair, d=d, x=x, bank=r) for x, r in pairs]
    for d in modes:
        out += [dict(pair, d=d, x=x, bank=r, kind=kind) for kind in (1, 2, 3) for x, r in CBML_PAIRS[:2]]
        out += [dict(pair, d=d, x="bf16", bank="bf16", pairs="counts"), dict(pair, d=d, x="fp32", bank="fp32",
                                                                             pairs="labels")]
    return out


def case_name(case: dict) -> str:
    extra = ""
    if case["loss"] == "cbml":
        extra = f" top_k={case['top_k']}" + (" masked" if case.get("mask") else "")
        extra += "".join(f" {k}={case[k]}" for k, default in (("center", "class_means"), ("phi", "log"))
                         if case.get(k, default) != default)
    if case["loss"] == "pair":
        extra = f" kind={case['kind']} {case['pairs']}"
    if case.get("margin_type") or case.get("sub_centers", 1) > 1:
        extra = f" margin_type={case.get('margin_type', 0)} K={case.get('sub_centers', 1)}"
        extra += f" gamma={case['gamma']}" if case.get("gamma") else ""
    prec = f" {case['precision']}" if case["x"] == case["bank"] == "fp32" else ""
    return f"{case['loss']} {case['op']} D={case['d']} {case['x']}/{case['bank']}{prec}{extra}"


# ---------------------------------------------------------------------------------------------- one target
class _Aborted(Exception):
    """A kernel failed to compile: the rest of this problem is skipped."""


def _add_problem(row: dict, problem: str) -> None:
    """Record that ``problem`` compiled (or failed on) ``row``'s kernel; kept sorted, so that a row does not depend
    on the order the problems ran in."""
    if problem not in row["problems"]:
        row["problems"] = sorted(row["problems"] + [problem])


_LOG = {"regs": r"Used (\d+) registers", "spill_stores": r"(\d+) bytes spill stores",
        "spill_loads": r"(\d+) bytes spill loads", "stack": r"(\d+) bytes stack frame"}


def _ptxas_figures(log: str, ptx: str, arch: str) -> dict:
    """Registers, spills and stack from ptxas's -v log (or from running ptxas -v on the PTX when the installed
    triton did not print it)."""
    if "Used" not in log:
        import subprocess

        from triton.backends.nvidia.compiler import get_ptxas

        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "k.ptx")
            with open(path, "w") as f:
                f.write(ptx)
            tool = get_ptxas(int(re.sub(r"\D", "", arch))).path
            log = subprocess.run([tool, "-v", f"--gpu-name={arch}", path, "-o", path + ".o"],
                                 capture_output=True, text=True).stderr
    return {k: int(m.group(1)) if (m := re.search(p, log)) else None for k, p in _LOG.items()}


_SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "int64": "i64", "int32": "i32", "uint8": "u8"}


def _spec(jit, args: tuple, kwargs: dict) -> dict:
    """What distinguishes a launch's compiled kernel, for the table, the JSON and ``OVER_BUDGET``: every constexpr
    in signature order (bools included: ``EPILOGUE``, ``COMPUTE_GRAD``, ``FOREIGN``, ``ANGULAR``, …), then the
    dtype of every tensor argument that is not fp32 (named without ``_ptr``), ``num_warps`` and ``num_stages``
    (as launched; a compiled row takes them from the kernel). Values are JSON scalars (a Triton dtype as its
    name). Triton's integer and alignment specialisations are not shown: two rows may share a spec."""
    bound = {p.name: v for p, v in zip(jit.params, args)} | kwargs
    spec = {}
    for p in jit.params:
        if p.is_constexpr:
            v = bound.get(p.name, p.default)
            spec[p.name] = v if isinstance(v, (bool, int, str)) else str(v)
    for p in jit.params:
        dtype = getattr(bound.get(p.name), "dtype", None)
        if dtype is not None and str(dtype) != "torch.float32":
            spec[p.name.removesuffix("_ptr")] = _SHORT.get(str(dtype).removeprefix("torch."), str(dtype))
    spec.update({k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs})
    return spec


def _spec_text(spec: dict) -> str:
    return " ".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in spec.items())


class _Session:
    """Compiles what the launchers launch for one target."""

    def __init__(self, target_name: str):
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.runtime import driver
        from triton.runtime.jit import JITFunction

        self.name = target_name
        self.target = TARGETS[target_name]
        self.kernels: dict[str, dict] = {}  # compiled kernel hash -> row
        self.failures: dict[str, dict] = {}  # spec text -> row
        self.case = ""
        self.pending_shrink: set[str] = set()
        gpu = GPUTarget("cuda", self.target.capability, 32)

        class OfflineDriver:  # just enough of a driver for JITFunction.run to pick the target
            def get_current_target(self):
                return gpu

            def get_current_device(self):
                return 0

            def get_current_stream(self, device=None):
                return 0

            def is_active(self):
                return True

        driver.set_active(OfflineDriver())
        with contextlib.suppress(AttributeError):
            triton.knobs.nvidia.dump_ptxas_log = True
        self._orig_run = JITFunction.run
        session = self

        def run(jit, *args, grid, warmup, **kwargs):
            return session.compile(jit, args, kwargs)

        JITFunction.run = run

        from fastcdml.kernels import _device

        t = self.target
        _device.limits = lambda device: _device.Limits(t.capability, t.sms, t.smem_per_block, t.smem_per_sm,
                                                       65536, t.threads_per_sm)
        _device.resources = lambda kernel: (self.kernels[kernel.hash]["regs"] or 255,
                                            kernel.metadata.shared)

    def compile(self, jit, args, kwargs):
        from triton.runtime.errors import OutOfResources

        name = jit.fn.__name__
        spec = _spec(jit, args, kwargs)
        log = io.StringIO()
        t0 = time.perf_counter()
        try:
            with contextlib.redirect_stdout(log):
                kernel = self._orig_run(jit, *args, grid=(1,), warmup=True, **kwargs)
        except Exception as exc:  # noqa: BLE001 - every compiler failure is a result to report
            msg = f"{type(exc).__name__}: {exc}".strip().splitlines()
            row = self.failures.setdefault(_spec_text(spec), dict(
                target=self.name, kernel=name, spec=spec, config=_spec_text(spec), problems=[],
                error=" | ".join(msg[:1] + msg[-3:])[:600], seconds=round(time.perf_counter() - t0, 1)))
            _add_problem(row, self.case)
            raise _Aborted from exc
        seconds = time.perf_counter() - t0
        if kernel.metadata.target.arch != self.target.capability:  # see check(): one target per process
            raise RuntimeError(f"{name} compiled for {kernel.metadata.target} in the {self.name} session")
        row = self.kernels.get(kernel.hash)
        if row is None:
            md = kernel.metadata
            ptx = kernel.asm.get("ptx", "")
            spec.update(num_warps=md.num_warps, num_stages=md.num_stages)
            row = dict(target=self.name, kernel=name, spec=spec, config=_spec_text(spec), problems=[],
                       num_warps=md.num_warps, num_stages=md.num_stages, smem=md.shared,
                       smem_limit=self.target.smem_per_block, fits=md.shared <= self.target.smem_per_block,
                       after_shrink=False, wgmma="wgmma.mma_async" in ptx, mma="mma.sync" in ptx,
                       seconds=round(seconds, 1), **_ptxas_figures(log.getvalue(), ptx, self.name))
            self.kernels[kernel.hash] = row
            print(f"[{self.name}]   {name} {row['config']}: {row['regs']} regs, {row['spill_stores']} B spilled, "
                  f"{row['smem'] // 1024} KB smem, {'wgmma' if row['wgmma'] else 'mma' if row['mma'] else '-'}, "
                  f"{row['seconds']} s", file=sys.stderr, flush=True)
        _add_problem(row, self.case)
        if name in self.pending_shrink:
            row["after_shrink"] = True
        if not row["fits"]:
            self.pending_shrink.add(name)
            raise OutOfResources(row["smem"], row["smem_limit"], "shared memory")
        self.pending_shrink.discard(name)
        return kernel

    def run_case(self, case: dict) -> None:
        import torch

        from fastcdml.kernels import cbml, ccl, pair, proxy_anchor

        self.case = case_name(case)
        self.pending_shrink.clear()
        ccl._OCCUPANCY.clear()  # a cache of compiled kernels' occupancy: each problem compiles its split kernel
        dt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
        b, d = case["b"], case["d"]
        x = torch.zeros(b, d, dtype=dt[case["x"]])
        y = torch.zeros(b, dtype=torch.int64)
        before = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision(case["precision"])
        try:
            if case["loss"] == "ccl":
                # the margin-softmax family: optional margin_type (0/1), sub_centers (K bank rows per class) and
                # gamma (SoftTriple's centre mean)
                k = case.get("sub_centers", 1)
                family = (case.get("margin_type", 0), k)
                gamma = case.get("gamma", 0.0)
                w = torch.zeros(case["c"] * k, d, dtype=dt[case["bank"]])
                hyper = (0.05, 0.1, 1.0)
                if case["op"] == "train":
                    _, _, lse, q = ccl.ccl_fwd(x, y, w, *hyper, True, *family, gamma)
                    ccl.ccl_bwd_centers(x, y, w, lse, torch.ones(b), *hyper, *family, q, gamma=gamma)
                    ccl.ccl_momentum_update_(w, x, y, 0.9, k)
                elif case["op"] == "sharded":
                    ccl.ccl_fwd_partials(x, y, w, *hyper[:2], True, *family)
                    lse = torch.zeros(b)
                    ccl.ccl_bwd_centers(x, y, w, lse, torch.ones(b), *hyper, *family, lse, True)
                else:
                    ccl.ccl_fwd(x, y, w, *hyper, case["op"] == "fused", *family, gamma)
            elif case["loss"] == "proxy_anchor":
                p = torch.zeros(case["c"], d, dtype=dt[case["bank"]])
                proxy_anchor.proxy_anchor_fwd(x, y, p, None, torch.tensor(1.0), 1e-3, 0.1, 32.0, True, True)
            elif case["loss"] == "pair":
                m = case["m"]
                r = torch.zeros(m, d, dtype=dt[case["bank"]])
                yr = torch.zeros(m, dtype=torch.int64)
                exclude = torch.zeros(b, dtype=torch.int64) if case["pairs"] == "exclude" else None
                counts = torch.zeros(b, m, dtype=torch.uint8) if case["pairs"] == "counts" else None
                pair.pair_fwd(x, y, r, yr, exclude, counts, case["kind"], 0.1, 1.0, 0.5, True, True)
            else:
                m = case["m"]
                r = torch.zeros(m, d, dtype=dt[case["bank"]])
                yr = torch.zeros(m, dtype=torch.int64)
                width = m + (b if case["include_self"] else 0)
                mask = torch.zeros(b, -(-width // 8), dtype=torch.uint8) if case.get("mask") else None
                phi = ("log", "sqrt", "constant").index(case.get("phi", "log"))
                cbml.cbml_fwd(x, y, r, yr, mask, case["include_self"], 0.5, 0.5, 1.0, 0.01, 0.1, 1.0, 0.2, phi,
                              0.25, 0.25, case.get("center", "class_means") == "class_means", case["top_k"], True,
                              not case["include_self"])
        except _Aborted:
            pass
        finally:
            torch.set_float32_matmul_precision(before)


def _check_target(target_name: str, problems: list[dict]) -> dict:
    """Worker: compile the problems for one target in this (fresh) process."""
    warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")
    with tempfile.TemporaryDirectory(prefix="fastcdml-compile-check-") as cache:
        os.environ["TRITON_CACHE_DIR"] = cache
        session = _Session(target_name)
        t0 = time.perf_counter()
        for case in problems:
            t = time.perf_counter()
            n = len(session.kernels) + len(session.failures)
            session.run_case(case)
            print(f"[{target_name}] {case_name(case)}: {len(session.kernels) + len(session.failures) - n} new "
                  f"kernels, {time.perf_counter() - t:.1f} s", file=sys.stderr, flush=True)
        return dict(target=target_name, kernels=sorted(session.kernels.values(), key=_row_order),
                    failures=sorted(session.failures.values(), key=_row_order),
                    seconds=round(time.perf_counter() - t0, 1))


def _row_order(row: dict) -> tuple:
    return row["kernel"], row["config"], row["problems"]


def check(targets=tuple(TARGETS), problems: list[dict] | None = None, jobs: int = 2) -> dict:
    """Compile ``problems`` (default: ``cases()``) for each target, ``jobs`` targets at a time, each in a fresh
    process. Returns {"targets": [per-target results], "triton": version, "seconds": wall time}."""
    import triton

    problems = cases() if problems is None else problems
    t0 = time.perf_counter()
    interpret = os.environ.pop("TRITON_INTERPRET", None)  # the workers, started now, must compile for real
    try:
        # maxtasksperchild=1: a fresh process per target. Triton's in-process kernel cache holds the target the
        # process compiled for first, so a reused worker would compile the next target's kernels for that one.
        with get_context("spawn").Pool(max(1, min(jobs, len(targets))), maxtasksperchild=1) as pool:
            results = pool.starmap(_check_target, [(t, problems) for t in targets], chunksize=1)
    finally:
        if interpret is not None:
            os.environ["TRITON_INTERPRET"] = interpret
    return dict(triton=triton.__version__, problems=len(problems), targets=results,
                seconds=round(time.perf_counter() - t0, 1))


# ---------------------------------------------------------------------------------------------- gates
def _spill_limit(row: dict) -> int:
    """0 B for the CCL forward with 16-bit queries and products at D ≤ 256, ``SPILL_BUDGET`` elsewhere."""
    spec = row["spec"]
    if (row["kernel"] == "_ccl_fwd_kernel" and spec["DOT"] != "fp32" and spec["BLOCK_D"] <= 256
            and spec.get("x") in ("bf16", "fp16")):
        return 0
    return SPILL_BUDGET


def _wgmma_expected(row: dict) -> bool:
    """A matrix-product loop of ``WGMMA_KERNELS`` on tensor cores (not fp32 FMA products, ``PREC=ieee``) with
    the 64 rows a wgmma needs (the CCL launchers go below 64 only where 64 rows of fp32 operands cannot fit)."""
    spec = row["spec"]
    if row["kernel"] not in WGMMA_KERNELS or spec.get("PREC") == "ieee" and spec.get("DOT") == "fp32":
        return False
    return spec.get("BLOCK_C" if row["kernel"] == "_ccl_bwd_centers_kernel" else "BLOCK_B", 64) >= 64


def gates(result: dict) -> list[str]:
    """The failed gates, one line each (empty: all pass)."""
    return [f"{line} ({_problems(row)})" for line, row in _verdicts(result)]


def _verdicts(result: dict) -> list[tuple[str, dict]]:
    """(failed gate, its row) in the rows' order; the line names the target, kernel, spec and what failed (not
    the problems, which depend on the Ds asked for when a kernel serves several)."""
    bad = []
    for t in result["targets"]:
        for f in t["failures"]:
            bad.append((f"{t['target']}: {f['kernel']} [{f['config']}] does not compile: {f['error']}", f))
        for row in t["kernels"]:
            where = f"{t['target']}: {row['kernel']} [{row['config']}]"
            if not row["fits"]:
                bad.append((f"{where}: shared memory {row['smem']} B > {row['smem_limit']} B (launcher shrinks)",
                            row))
            if t["target"] == "sm_90a" and _wgmma_expected(row) and not row["wgmma"]:
                bad.append((f"{where}: no wgmma", row))
            spill = row["spill_stores"] or 0
            if spill > _spill_limit(row) and not (_spill_limit(row) and _allowed_over_budget(t["target"], row)):
                bad.append((f"{where}: {spill} B spill stores > {_spill_limit(row)} B", row))
            if row["seconds"] > MAX_COMPILE_S:
                bad.append((f"{where}: {row['seconds']} s to compile > {MAX_COMPILE_S} s", row))
    return bad


def _problems(row: dict) -> str:
    n = len(row["problems"])
    return row["problems"][0] + (f" and {n - 1} more" if n > 1 else "")


def table(result: dict) -> str:
    head = ("target", "kernel", "spec", "problems", "regs", "spill B", "smem KB/limit", "fits", "shrunk",
            "wgmma", "s")
    lines = []
    for t in result["targets"]:
        for row in t["kernels"]:
            lines.append((t["target"], row["kernel"], row["config"], _problems(row), str(row["regs"]),
                          str(row["spill_stores"]), f"{row['smem'] / 1024:.0f}/{row['smem_limit'] // 1024}",
                          "yes" if row["fits"] else "NO", "yes" if row["after_shrink"] else "",
                          "yes" if row["wgmma"] else ("mma" if row["mma"] else ""), str(row["seconds"])))
        for f in t["failures"]:
            lines.append((t["target"], f["kernel"], f["config"], _problems(f), "", "", "", "ERROR", "", "",
                          str(f["seconds"])))
    widths = [max(len(h), *(len(r[i]) for r in lines)) if lines else len(h) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:{w}}}" for w in widths)
    out = [fmt.format(*head)] + [fmt.format(*r) for r in lines]
    for t in result["targets"]:
        out.append(f"{t['target']}: {len(t['kernels'])} kernels, {len(t['failures'])} failures, {t['seconds']} s")
    out.append(f"triton {result['triton']}, {result['problems']} problems, {result['seconds']} s wall")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastcdml compile-check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", default=",".join(TARGETS), help="comma-separated, from %(default)s")
    parser.add_argument("--dims", default=",".join(map(str, DIMS)), help="embedding sizes (%(default)s)")
    parser.add_argument("--loss", choices=("ccl", "cbml", "pair", "proxy_anchor", "all"), default="all")
    parser.add_argument("--jobs", type=int, default=min(3, os.cpu_count() or 1), help="targets compiled at once")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--gates", action="store_true", help="exit 1 when a gate fails")
    parser.add_argument("--match", default="", help="only the problems whose name contains this text")
    args = parser.parse_args(argv)
    targets = tuple(t for t in args.targets.split(",") if t)
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        parser.error(f"unknown target(s) {unknown}; known: {list(TARGETS)}")
    problems = [c for c in cases(tuple(int(v) for v in args.dims.split(",")))
                if args.loss in ("all", c["loss"]) and args.match in case_name(c)]
    result = check(targets, problems, args.jobs)
    failed = gates(result)
    result["gates_failed"] = failed
    print(table(result))
    print("\n".join(["gates: all pass"] if not failed else [f"gate failed: {f}" for f in failed]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 1 if (failed and args.gates) else 0


if __name__ == "__main__":
    sys.exit(main())

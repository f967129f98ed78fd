"""The offline GPU compile check (``fastcdml/tools/compile_check.py``): its gate logic on made-up results, the
problem matrix, the launchers' statelessness, two problems compiled for sm_90a through the launchers in both
orders, and — selected with ``-m compile_gates``, a CI step of several minutes — the gates over the whole problem
matrix on sm_90a, sm_80 and sm_86."""
from __future__ import annotations

import json

import pytest
from triton.runtime.errors import OutOfResources

from fastcdml.kernels import _tuning, ccl
from fastcdml.tools import compile_check as cc

pytest.importorskip("triton.backends.nvidia.compiler", reason="needs triton's NVIDIA backend (ptxas)")


def _row(**kw):
    spec = dict(BLOCK_D=64, PRECISION="tf32", TOPK=0, num_warps=8, num_stages=3)
    row = dict(kernel="_cbml_sums_kernel", spec=spec, problems=["cbml train"], regs=128, spill_stores=0,
               smem=48 * 1024, smem_limit=227 * 1024, fits=True, after_shrink=False, wgmma=True, mma=False,
               seconds=3.0)
    row = {**row, **kw}
    return {**row, "config": cc._spec_text(row["spec"])}


def _ccl_fwd(**spec):
    return dict(kernel="_ccl_fwd_kernel", spec=dict(dict(BLOCK_B=64, BLOCK_D=128, EPILOGUE=False, DOT="bf16",
                                                         PREC="tf32", x="bf16"), **spec))


def test_gates_name_every_failure_and_pass_good_kernels():
    fp32_queries = _ccl_fwd()
    del fp32_queries["spec"]["x"]
    result = {"targets": [
        {"target": "sm_90a", "failures": [dict(kernel="_cbml_stats_kernel", config="TOPK=2", problems=["cbml"],
                                               error="PassManager::run failed", seconds=1.0)],
         "kernels": [_row(), _row(fits=False, smem=300 * 1024), _row(wgmma=False), _row(spill_stores=600),
                     _row(**_ccl_fwd(), spill_stores=8), _row(**fp32_queries, spill_stores=8),
                     _row(seconds=61.0), _row(kernel="_sum_kernel", wgmma=False)]},
        {"target": "sm_86", "failures": [], "kernels": [_row(wgmma=False)]},  # no wgmma before sm_90a
    ]}
    failed = cc.gates(result)
    expected = ("does not compile", "launcher shrinks", "no wgmma", "600 B spill stores > 512",
                "8 B spill stores > 0 B", "61.0 s to compile")
    assert len(failed) == len(expected), failed
    for line, what in zip(failed, expected):
        assert line.startswith("sm_90a") and what in line, (line, what)


def test_an_over_budget_entry_excuses_only_the_variant_it_names(monkeypatch):
    """Two specialisations that differ only in EPILOGUE are judged apart: an exception for the split-C variant
    does not cover the fused-epilogue one."""
    monkeypatch.setattr(cc, "OVER_BUDGET", [("_ccl_fwd_kernel", dict(BLOCK_D="512", EPILOGUE="False"),
                                             ("sm_90a",), "test")])
    rows = [_row(**_ccl_fwd(BLOCK_D=512, DOT="fp32", EPILOGUE=e), spill_stores=2000) for e in (False, True)]
    failed = cc.gates({"targets": [{"target": "sm_90a", "failures": [], "kernels": rows}]})
    assert len(failed) == 1 and "EPILOGUE=1" in failed[0] and "2000 B spill stores" in failed[0], failed
    assert cc.gates({"targets": [{"target": "sm_80", "failures": [], "kernels": rows[:1]}]})  # not its target


def test_the_problems_of_one_dim_do_not_depend_on_the_other_dims():
    """``--dims 512`` checks exactly the D = 512 problems of the full run (the papers' fp32 fused step among them)."""
    key = lambda case: json.dumps(case, sort_keys=True)  # noqa: E731
    full = sorted(map(key, cc.cases()))
    assert full == sorted(key(c) for d in cc.DIMS for c in cc.cases((d,)))
    assert len(set(full)) == len(full)
    fused = {(c["d"], c["x"], c["bank"]) for c in cc.cases() if c["op"] == "fused"}
    assert {(d, "fp32", "fp32") for d in cc.DIMS} | {(d, "bf16", "fp32") for d in cc.DIMS} <= fused


def test_the_launch_config_does_not_depend_on_earlier_launches():
    """A config shrunk after ``OutOfResources`` is not carried into the next launch of the same shapes."""
    first = _tuning.Config(64, 64, 1, 8, 3)
    used = []

    def tight(cfg):  # a launch whose variant does not fit the requested config
        used.append(cfg)
        if cfg == first:
            raise OutOfResources(300 * 1024, 227 * 1024, "shared memory")

    ccl._launch(first, tight)
    assert used == [first, _tuning.shrink(first)]
    used.clear()
    ccl._launch(first, used.append)
    assert used == [first]


def test_problems_compile_through_the_launchers_in_any_order():
    """The CCL training step and the fused-epilogue forward for bf16 queries and the fp32 bank at D=64 on sm_90a:
    the launchers' kernels are found by launching them (no list of kernels in the check), with ptxas figures;
    the training step takes the split path (B=256 rows do not fill 132 SMs), the fused problem the epilogue,
    so two forward specialisations differ only in EPILOGUE. Both are recorded and judged, and the rows and
    verdicts are the same whichever problem runs first — and whichever target ran first with one job (each
    target needs a fresh process: Triton's in-process cache keeps the first target it compiled for)."""
    ccl_case = dict(loss="ccl", d=64, x="bf16", bank="fp32", precision="highest", c=1000)
    problems = [dict(ccl_case, op="train", b=256), dict(ccl_case, op="fused", b=32768)]
    runs = [cc.check(("sm_90a",), problems, jobs=1), cc.check(("sm_86", "sm_90a"), problems[::-1], jobs=1)]
    sm86 = runs[1]["targets"].pop(0)["kernels"]
    assert sm86 and all(r["target"] == "sm_86" and not r["wgmma"] for r in sm86)
    assert any(r["mma"] for r in sm86)
    tables = [[{k: v for k, v in r.items() if k != "seconds"} for r in run["targets"][0]["kernels"]]
              for run in runs]
    assert tables[0] == tables[1]
    assert cc.gates(runs[0]) == cc.gates(runs[1]) == []

    rows = runs[0]["targets"][0]["kernels"]
    assert {r["kernel"] for r in rows} == {"_ccl_fwd_kernel", "_ccl_combine_kernel", "_ccl_bwd_centers_kernel",
                                           "_ccl_update_kernel"}
    fwd = {r["spec"]["EPILOGUE"]: r for r in rows if r["kernel"] == "_ccl_fwd_kernel"}
    assert set(fwd) == {False, True}
    for epilogue, row in fwd.items():
        assert row["regs"] > 0 and row["smem"] > 0 and row["fits"] and row["wgmma"]
        assert row["spec"]["COMPUTE_GRAD"] is True and f"EPILOGUE={int(epilogue)}" in row["config"]
    assert fwd[True]["problems"] == ["ccl fused D=64 bf16/fp32"]
    assert not next(r for r in rows if r["kernel"] == "_ccl_update_kernel")["wgmma"]

    runs[0]["targets"][0]["kernels"] = [dict(r, spill_stores=64) if r is fwd[True] else r for r in rows]
    failed = cc.gates(runs[0])  # each variant is judged on its own figures
    assert len(failed) == 1 and "EPILOGUE=1" in failed[0] and "64 B spill stores > 0 B" in failed[0], failed


@pytest.mark.compile_gates
def test_every_kernel_passes_the_gates_on_every_target():
    result = cc.check(tuple(cc.TARGETS), cc.cases(), jobs=2)
    failed = cc.gates(result)
    assert not failed, cc.table(result) + "\n" + "\n".join(failed)

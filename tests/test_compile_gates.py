"""The offline GPU compile check (``fastcdml/tools/compile_check.py``): its gate logic on made-up results, the
launchers' statelessness, one real problem compiled for sm_90a through the launchers, and — selected with ``-m compile_gates``, a CI step of
several minutes — the gates over the whole problem matrix on sm_90a, sm_80 and sm_86."""
from __future__ import annotations

import pytest
from triton.runtime.errors import OutOfResources

from fastcdml.kernels import ccl
from fastcdml.tools import compile_check as cc

pytest.importorskip("triton.backends.nvidia.compiler", reason="needs triton's NVIDIA backend (ptxas)")


def _row(**kw):
    row = dict(kernel="_cbml_sums_kernel", config="BLOCK_D=64", case="cbml train", x="bf16", regs=128,
               spill_stores=0, smem=48 * 1024, smem_limit=227 * 1024, fits=True, after_shrink=False, wgmma=True,
               mma=False, seconds=3.0)
    return {**row, **kw}


def test_gates_name_every_failure_and_pass_good_kernels():
    ccl_fwd = dict(kernel="_ccl_fwd_kernel", config="BLOCK_D=128 DOT=bf16")
    result = {"targets": [
        {"target": "sm_90a", "failures": [dict(kernel="_cbml_stats_kernel", case="cbml top_k=1000",
                                               error="PassManager::run failed", seconds=1.0)],
         "kernels": [_row(), _row(fits=False, smem=300 * 1024), _row(wgmma=False), _row(spill_stores=600),
                     _row(**ccl_fwd, spill_stores=8), _row(**ccl_fwd, spill_stores=8, x="fp32"),
                     _row(seconds=61.0), _row(kernel="_sum_kernel", wgmma=False)]},
        {"target": "sm_86", "failures": [], "kernels": [_row(wgmma=False)]},  # no wgmma before sm_90a
    ]}
    failed = cc.gates(result)
    expected = ("does not compile", "launcher shrinks", "no wgmma", "600 B spill stores > 512",
                "8 B spill stores > 0 B", "61.0 s to compile")
    assert len(failed) == len(expected), failed
    for line, what in zip(failed, expected):
        assert line.startswith("sm_90a") and what in line, (line, what)


def test_the_launch_config_does_not_depend_on_earlier_launches():
    """A config shrunk after ``OutOfResources`` is not carried into the next launch of the same shapes."""
    first = ccl.Config(64, 64, 1, 8, 3)
    used = []

    def tight(cfg):  # a launch whose variant does not fit the requested config
        used.append(cfg)
        if cfg == first:
            raise OutOfResources(300 * 1024, 227 * 1024, "shared memory")

    ccl._launch(first, tight)
    assert used == [first, ccl._shrink(first)]
    used.clear()
    ccl._launch(first, used.append)
    assert used == [first]


def test_one_problem_compiles_through_the_launchers():
    """The CCL training step for bf16 queries and the fp32 bank at D=64 on sm_90a: the launchers' kernels are
    found by launching them (no list of kernels in the check), with ptxas figures, and the split path is taken
    (B=256 rows do not fill 132 SMs)."""
    case = dict(loss="ccl", op="train", d=64, x="bf16", bank="fp32", precision="highest", b=256, c=1000)
    result = cc.check(("sm_90a",), [case], jobs=1)
    rows = {r["kernel"]: r for r in result["targets"][0]["kernels"]}
    assert set(rows) == {"_ccl_fwd_kernel", "_ccl_combine_kernel", "_ccl_bwd_centers_kernel", "_ccl_update_kernel"}
    fwd = rows["_ccl_fwd_kernel"]
    assert fwd["regs"] > 0 and fwd["smem"] > 0 and fwd["fits"] and fwd["wgmma"]
    assert "EPILOGUE" not in fwd["flags"] and "COMPUTE_GRAD" in fwd["flags"]
    assert not rows["_ccl_update_kernel"]["wgmma"]
    assert cc.gates(result) == []


@pytest.mark.compile_gates
def test_every_kernel_passes_the_gates_on_every_target():
    result = cc.check(tuple(cc.TARGETS), cc.cases(), jobs=2)
    failed = cc.gates(result)
    assert not failed, cc.table(result) + "\n" + "\n".join(failed)

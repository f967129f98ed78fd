"""The bench machinery (``python -m bench`` and ``bench/report.py``) at tiny sizes."""
import importlib.util
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bench import impls
from bench import run as bench

ROOT = Path(__file__).resolve().parent.parent
HAS_MPL = importlib.util.find_spec("matplotlib") is not None
HAS_PML = importlib.util.find_spec("pytorch_metric_learning") is not None


def _results(out: Path) -> dict:
    (path,) = out.glob("*.json")
    return json.loads(path.read_text())


def test_sweep_writes_rows_plots_and_merges(tmp_path, capsys):
    args = ["--loss", "ccl", "--impl", "fastcdml,reference", "--quick", "--no-isolate", "--device", "cpu",
            "--out", str(tmp_path)]
    assert bench.main(args + ["--sizes", "16x40x8,16x80x8"]) == 0
    printed = capsys.readouterr().out
    assert "× ref" in printed and "× floor" in printed and "wrote" in printed
    data = _results(tmp_path)
    assert len(data["rows"]) == 4
    for row in data["rows"]:
        assert tuple(row) == bench.ROW_FIELDS
        assert row["floor_ms"] > 0
        assert row["loss"] == "ccl" and row["mode"] == "step" and row["dtype"] == "float32"
        assert 0 < row["p20_ms"] <= row["p50_ms"] <= row["p80_ms"]
        assert row["peak_extra_mb"] is None or row["peak_extra_mb"] >= 0
        assert row["torch"] == torch.__version__
    assert {r["backend"] for r in data["rows"] if r["impl"] == "reference"} == {"reference"}
    if HAS_MPL:
        assert data["meta"]["plots"] and all((tmp_path / p).stat().st_size > 0 for p in data["meta"]["plots"])
    # a second run the same day replaces its own cases and keeps the others
    assert bench.main(args[:2] + ["--impl", "reference", "--quick", "--no-isolate", "--device", "cpu",
                                  "--out", str(tmp_path), "--sizes", "16x80x8,16x160x8"]) == 0
    data = _results(tmp_path)
    assert sorted((r["impl"], r["C"]) for r in data["rows"]) == [
        ("fastcdml", 40), ("fastcdml", 80), ("reference", 40), ("reference", 80), ("reference", 160)]
    assert len(data["meta"]["runs"]) == 2


def test_products_are_the_loss_contracts_gemms():
    """The floor and the TFLOP/s count the same products: (m, n, k) per step, for each loss family."""
    def case(loss, impl, variant, c):
        return impls.Case(loss, impl, variant, 4, c, 8, "float32")
    assert impls.products(case("ccl", "fastcdml", "momentum", 6)) == [(4, 6, 8), (4, 8, 6)]
    assert impls.products(case("margin", "pml_subcenter", "gradient", 6)) == [(4, 18, 8), (4, 8, 18), (18, 8, 4)]
    assert impls.products(case("proxy_anchor", "fastcdml", "gradient", 6)) == [(4, 6, 8), (4, 8, 6), (6, 8, 4)]
    assert impls.products(case("cbml", "fastcdml", "memory", 6)) == [(4, 10, 8), (4, 8, 10), (4, 8, 4)]
    assert impls.products(case("cbml", "fastcdml", "self", 4)) == [(4, 4, 8), (4, 8, 4), (4, 8, 4)]
    assert impls.nominal_gflop(case("ccl", "fastcdml", "momentum", 6)) == 4 * 4 * 6 * 8 / 1e9


def test_isolated_case_reports_memory(tmp_path):
    assert bench.main(["--loss", "cbml", "--impl", "reference", "--sizes", "12xselfx8", "--quick", "--device", "cpu",
                       "--out", str(tmp_path)]) == 0
    (row,) = _results(tmp_path)["rows"]
    assert (row["variant"], row["B"], row["C"]) == ("self", 12, 12)
    assert row["peak_extra_mb"] is not None and row["peak_extra_mb"] >= 0


def test_peak_extra_memory_sees_a_known_allocation():
    mib = 48

    def run():
        torch.empty(mib * 2**20 // 4).fill_(1.0)  # touched, so resident

    run()
    peak = bench._peak_extra_mb(run, torch.device("cpu"))
    if peak is None:
        pytest.skip("no /proc/self/clear_refs or glibc here")
    assert mib - 1 <= peak <= mib + 8


def test_cpu_timing_measures_the_step():
    p50, p20, p80, reps = bench._times_ms(lambda: time.sleep(0.005), torch.device("cpu"), quick=True)
    assert reps >= 3 and 5 <= p20 <= p50 <= p80 < 100


@pytest.mark.parametrize("impl", ["fastcdml", "reference"] + (["pml_normsoftmax", "pml_proxyanchor"] if HAS_PML else []))
def test_ccl_step_computes_gradient_and_update(impl):
    case = impls.Case("ccl", impl, "momentum", 10, 30, 8, "float32")
    inputs = impls.make_inputs(case, torch.device("cpu"))
    bank0, x, y = inputs["bank"].clone(), inputs["x"], inputs["y"]
    impls.build(case, inputs).run()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    if not impl.startswith("pml"):  # the momentum step moves exactly the classes in the batch
        moved = (inputs["bank"] != bank0).any(dim=1)
        assert torch.equal(moved, torch.isin(torch.arange(30), y))


@pytest.mark.parametrize("impl", ["fastcdml", "reference"] + (["pml_multisimilarity", "pml_contrastive"] if HAS_PML else []))
@pytest.mark.parametrize("variant", ["self", "memory"])
def test_cbml_step_computes_gradient(impl, variant):
    case = impls.Case("cbml", impl, variant, 16, 16 if variant == "self" else 40, 8, "float32")
    inputs = impls.make_inputs(case, torch.device("cpu"))
    bank0 = inputs["bank"].clone() if variant == "memory" else None
    impls.build(case, inputs).run()
    x = inputs["x"]
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    if variant == "memory":  # the batch was enqueued (normalised) into the FIFO
        assert not torch.equal(inputs["bank"], bank0)


@pytest.mark.parametrize("loss,impl", [(loss, i) for loss in ("margin", "proxy_anchor") for i in impls.IMPLS[loss]
                                         if HAS_PML or not i.startswith("pml")])
def test_proxy_step_computes_both_gradients(loss, impl):
    case = impls.Case(loss, impl, "gradient", 10, 30, 8, "float32")
    inputs = impls.make_inputs(case, torch.device("cpu"))
    step = impls.build(case, inputs)
    step.run()
    x = inputs["x"]
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert impls.nominal_gflop(case) > 0 and step.backend


def test_proxy_anchor_sizes_beyond_the_machine_are_recorded_not_run():
    cpu = torch.device("cpu")
    huge = impls.Case("proxy_anchor", "pml", "gradient", 1024, 1_000_000, 512, "float32")
    assert "GiB of B×C temporaries" in impls.over_budget(huge, cpu, 600)
    slow = impls.Case("proxy_anchor", "fastcdml", "gradient", 1024, 1_000_000, 512, "float32")
    assert "s estimated" in impls.over_budget(slow, cpu, 600)
    small = impls.Case("proxy_anchor", "fastcdml", "gradient", 256, 1000, 128, "float32")
    assert impls.over_budget(small, cpu, 600) is None
    args = bench._parser().parse_args(["--preset", "proxy-anchor", "--max-case-s", "600"])
    cases, skipped = bench.plan(args, cpu)
    assert {c.loss for c in cases} == {"proxy_anchor"} and len(cases) + len(
        [s for s in skipped if s.get("loss") == "proxy_anchor"]) == 2 * 12


def test_sizes_and_impls_are_validated():
    assert bench.parse_size("512xselfx64", "cbml", "reference", "float32") == impls.Case(
        "cbml", "reference", "self", 512, 512, 64, "float32")
    with pytest.raises(ValueError, match="BxCxD"):
        bench.parse_size("512x64", "ccl", "reference", "float32")
    with pytest.raises(ValueError, match="self"):
        bench.parse_size("8xselfx8", "ccl", "reference", "float32")
    with pytest.raises(SystemExit):
        bench.main(["--impl", "nope", "--device", "cpu"])


def test_gpu_only_peers_are_skipped_on_cpu():
    assert "CUDA" in impls.unavailable("cce", torch.device("cpu")) or "not installed" in impls.unavailable(
        "cce", torch.device("cpu"))
    assert impls.unavailable("reference", torch.device("cpu")) is None


def test_report_regenerates_readmes(tmp_path):
    results = tmp_path / "results"
    assert bench.main(["--loss", "ccl", "--impl", "fastcdml,reference", "--sizes", "8x20x8,8x40x8", "--quick",
                       "--no-isolate", "--device", "cpu", "--out", str(results)]) == 0
    top = tmp_path / "README.md"
    top.write_text("intro\n<!-- bench:start -->\nold\n<!-- bench:end -->\nrest\n")
    cmd = [sys.executable, str(ROOT / "bench" / "report.py"), "--results", str(results),
           "--readme", str(tmp_path / "bench.md"), "--top-readme", str(top)]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    page = (tmp_path / "bench.md").read_text()
    assert "| ccl | momentum | 8 | 40 | 8 | float32 | reference |" in page
    text = top.read_text()
    assert text.startswith("intro\n<!-- bench:start -->\n") and text.endswith("<!-- bench:end -->\nrest\n")
    # the headline: one row per loss variant at its largest size, ours against the GEMM floor and the reference
    assert "old" not in text and "| ccl momentum | 8×40×8 float32 |" in text and "8×20×8" not in text
    row = next(line for line in text.splitlines() if "| ccl momentum |" in line)
    assert re.search(r"\| [\d.,]+ ms \([\d.]+×\) \|", row), row  # the floor and our time over it
    if HAS_MPL:
        assert "](results/" in page
    top.write_text("no markers\n")
    proc = subprocess.run(cmd, check=True, capture_output=True, text=True)
    assert top.read_text() == "no markers\n" and "markers" in proc.stderr


def _sweep(tmp_path, *extra):
    return bench.main(["--loss", "ccl", "--impl", "reference", "--sizes", "8x16x8", "--quick", "--device", "cpu",
                       "--out", str(tmp_path), *extra])


def test_a_loaded_machine_is_warned_recorded_and_marked(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(bench.os, "getloadavg", lambda: (99.0, 99.0, 99.0))
    assert _sweep(tmp_path) == 0
    err = capsys.readouterr().err
    assert "warning: the 1-minute load average is 99.0, more than the" in err and "marked *" in err
    data = _results(tmp_path)
    (row,) = data["rows"]
    assert row["loaded"] is True and row["load_1min"] == 99.0
    assert data["meta"]["runs"][0]["loaded_rows"] == 1
    assert data["meta"]["runs"][0]["cores_used"] == torch.get_num_threads()
    text, markdown = bench.table(data["rows"]), bench.table(data["rows"], markdown=True)
    assert " *" in text and bench.LOADED_NOTE in text and bench.LOADED_NOTE in markdown
    # the generated pages carry the mark and the note
    page = tmp_path / "bench.md"
    subprocess.run([sys.executable, str(ROOT / "bench" / "report.py"), "--results", str(tmp_path),
                    "--readme", str(page), "--top-readme", str(tmp_path / "none.md")], check=True,
                   capture_output=True, text=True)
    assert " * |" in page.read_text() and bench.LOADED_NOTE in page.read_text()
    assert "1 rows measured while it exceeded the" in page.read_text()


def test_an_idle_machine_marks_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(bench.os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    assert _sweep(tmp_path) == 0
    assert "load average" not in capsys.readouterr().err
    (row,) = _results(tmp_path)["rows"]
    assert row["loaded"] is False and row["load_1min"] == 0.0
    assert bench.LOADED_NOTE not in bench.table([row])


def test_quick_runs_the_smallest_size_per_loss_in_process(tmp_path, monkeypatch):
    args = bench._parser().parse_args(["--quick", "--impl", "fastcdml,reference", "--device", "cpu"])
    args.preset = "cpu"
    cases, _ = bench.plan(args, torch.device("cpu"))
    assert {(c.loss, c.impl) for c in cases} == {(l, i) for l in ("ccl", "cbml") for i in ("fastcdml", "reference")
                                                 } | {("proxy_anchor", "fastcdml")}
    assert len(cases) == 5  # one size each
    args = bench._parser().parse_args(["--quick", "--device", "cpu"])
    args.preset = "cpu"
    assert "torch_compile" not in {c.impl for c in bench.plan(args, torch.device("cpu"))[0]}
    monkeypatch.setattr(bench, "measure_isolated", lambda *a, **k: pytest.fail("--quick must not start workers"))
    assert _sweep(tmp_path) == 0
    assert _results(tmp_path)["meta"]["runs"][0]["isolated"] is False


def test_cpu_floor_measures_and_writes(tmp_path, monkeypatch):
    """bench.cpu_floor times the C++ ops and the torch.mm floor of the same shapes and writes its results file."""
    from bench import cpu_floor
    from fastcdml._backend import unavailable_reason

    if unavailable_reason("cpp", "ccl", "cpu") is not None:
        pytest.skip("the C++ backend is not available")
    monkeypatch.setattr(cpu_floor, "SIZES", ((9, 70, 12),))
    threads = torch.get_num_threads()
    try:
        assert cpu_floor.main(["--reps", "1", "--out", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)
    (path,) = tmp_path.glob("*-cpu-floor-*.json")
    data = json.loads(path.read_text())
    assert data["meta"]["isa"] in ("avx512", "avx2", "generic") and data["meta"]["torch"] == torch.__version__
    (row,) = data["rows"]
    assert (row["B"], row["C"], row["D"]) == (9, 70, 12)
    assert row["fwd_ms"] > 0 and row["fwd_over_floor"] > 0 and row["fwd_proxy_over_floor"] > 0


def test_pair_vs_pml_measures_and_writes(tmp_path):
    """bench.pair_vs_pml runs each case in its own process, records PML cases it skips, and writes its file."""
    pytest.importorskip("pytorch_metric_learning")
    from bench import pair_vs_pml

    assert pair_vs_pml.main(["--batches", "8", "--memories", "16", "--dims", "4", "--losses", "SupConLoss",
                             "--impls", "fastcdml,pml,compiled", "--reps", "1", "--out", str(tmp_path)]) == 0
    assert pair_vs_pml.main(["--batches", "8", "--memories", "16", "--dims", "4", "--losses", "NTXentLoss",
                             "--impls", "pml", "--mem-cap-gib", "0", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("*-pair-vs-pml-*.json")
    rows = {(r["loss"], r["impl"]): r for r in json.loads(path.read_text())["rows"]}
    assert set(rows) == {("SupConLoss", "fastcdml"), ("SupConLoss", "pml"), ("SupConLoss", "compiled"),
                         ("NTXentLoss", "pml")}
    for key in (("SupConLoss", "fastcdml"), ("SupConLoss", "pml"), ("SupConLoss", "compiled")):
        assert rows[key]["status"] == "ok" and rows[key]["p50_ms"] > 0 and rows[key]["peak_extra_mb"] >= 0
    assert rows[("NTXentLoss", "pml")]["status"].startswith("skipped: predicted")

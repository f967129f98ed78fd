"""``python -m bench.interleaved`` at a tiny size: every pair runs, the rows carry both sides' times and the ratio,
and the results file keeps the rows of other cases."""
import importlib.util
import json

import pytest
import torch

from bench import interleaved

pytestmark = pytest.mark.skipif(importlib.util.find_spec("pytorch_metric_learning") is None,
                                reason="pytorch-metric-learning is not installed")


def test_interleaved_writes_rows(tmp_path):
    threads = torch.get_num_threads()
    try:
        args = ["--size", "9x30x8", "--reps", "3", "--warmup", "1", "--threads", "1", "--no-memory",
                "--out", str(tmp_path)]
        assert interleaved.main(args) == 0
        assert interleaved.main(args[:-2] + ["--losses", "ccl", "--no-check", "--out", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)
    (path,) = tmp_path.glob("*-interleaved-*.json")
    data = json.loads(path.read_text())
    assert data["meta"]["threads"] == 1 and "pytorch-metric-learning" in data["meta"]["pml"]
    rows = {(r["loss"], r["check_inputs"]): r for r in data["rows"]}
    assert set(rows) == {(name, True) for name in interleaved.PAIRS} | {("ccl", False)}
    for r in rows.values():
        assert r["ours_p20_ms"] <= r["ours_p50_ms"] <= r["ours_p80_ms"] and r["pml_p50_ms"] > 0
        assert r["ratio"] == pytest.approx(r["ours_p50_ms"] / r["pml_p50_ms"])


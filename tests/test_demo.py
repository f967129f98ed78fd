"""The embedded demo trains (seeded, on scikit-learn's bundled digits), the fused and reference CCL agree on it,
the command writes its artefacts, and the real-benchmark recipe runs a few iterations on a generated fixture."""
from __future__ import annotations

import importlib.util
import json
import math
import sys
import warnings
from pathlib import Path

import pytest
import torch


from .test_datasets import make_cub

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("demo", ROOT / "examples" / "demo.py")
demo = sys.modules["demo"] = importlib.util.module_from_spec(_spec)  # dataclasses look their module up
_spec.loader.exec_module(demo)

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_retrieval.py"


@pytest.fixture(scope="module")
def digits():
    pytest.importorskip("sklearn")  # the demo's data ships with scikit-learn
    return demo.load_digits_split()


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what the demo uses; tiny networks are slower with more threads
    yield
    torch.set_num_threads(threads)


def test_digits_split_is_class_disjoint(digits):
    train, test = digits
    assert train.x.shape[1] == test.x.shape[1] == 64 and len(train.x) + len(test.x) == 1797
    assert train.y.unique().tolist() == test.y.unique().tolist() == [0, 1, 2, 3, 4]
    assert 0 <= float(train.x.min()) and float(train.x.max()) <= 1


def test_ccl_training_beats_the_untrained_network_and_fused_matches_reference(digits):
    train, test = digits
    torch.manual_seed(0)
    untrained = demo.evaluate(demo.embedding_net(8), test)["R@1"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "auto" may warn that it falls back to the reference
        runs = {backend: demo.train("ccl", train, epochs=5, seed=0, backend=backend)
                for backend in ("auto", "reference")}
    recall = {backend: demo.evaluate(run.model, test)["R@1"] for backend, run in runs.items()}
    assert recall["reference"] >= untrained + 0.05, (untrained, recall)
    assert abs(recall["auto"] - recall["reference"]) <= 0.01, recall
    assert runs["reference"].losses[-1] < runs["reference"].losses[0]


def test_demo_command_writes_results(tmp_path, digits):
    out = tmp_path / "demo"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert demo.main(["--out", str(out), "--epochs", "1", "--quiet", "--no-plots"]) == 0
    results = json.loads((out / "results.json").read_text())
    names = [row["model"] for row in results["results"]]
    assert names[:2] == ["raw pixels (64-d, no network)", "untrained network"]
    assert names[2].startswith("CCL, backend=auto") and names[-1] == "CCL, backend=reference" and "CBML" in names
    assert all(0 <= row["R@1"] <= 1 and 0 <= row["MAP@R"] <= 1 for row in results["results"])
    assert results["fused_vs_reference"]["R@1_auto"] == results["results"][2]["R@1"]
    assert "| model | R@1 |" in (out / "results.md").read_text()


def test_demo_without_pytorch_metric_learning_notes_the_skipped_baseline(tmp_path, digits, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "pytorch_metric_learning.losses", None)  # import now raises ImportError
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert demo.main(["--out", str(tmp_path), "--epochs", "1", "--quiet", "--no-plots"]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert not any("NormalizedSoftmax" in row["model"] for row in results["results"])
    assert any("pytorch-metric-learning is not installed" in note for note in results["notes"])
    assert "pytorch-metric-learning is not installed" in capsys.readouterr().out


def test_demo_plots(tmp_path, digits):
    pytest.importorskip("matplotlib")
    train, test = digits
    runs = {"CCL": demo.train("ccl", train, test, epochs=2, backend="reference")}
    torch.manual_seed(0)
    assert demo.plot(tmp_path, runs, demo.embedding_net(8), test) == ["loss_curves.png", "embeddings.png"]
    for name in ("loss_curves.png", "embeddings.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("loss, extra", [("ccl", ["--amp"]), ("cbml", [])])
def test_train_retrieval_recipe_smoke(tmp_path, loss, extra):
    pytest.importorskip("PIL")
    make_cub(tmp_path / "data")
    spec = importlib.util.spec_from_file_location("train_retrieval", EXAMPLE)
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    common = ["--dataset", "cub", "--root", str(tmp_path / "data"), "--loss", loss, "--arch", "small",
              "--image-size", "16", "--dim", "8", "--batch-size", "4", "--m", "2", "--workers", "0",
              "--eval-every", "2", "--out", str(tmp_path / "run"), "--backend", "reference", *extra]
    best = recipe.main(common + ["--iters", "3"])
    assert best["iteration"] in (2, 3) and math.isfinite(best["loss"]) and 0 <= best["R@1"] <= 1
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in log] == [2, 3]
    assert {p.name for p in (tmp_path / "run").iterdir()} >= {"best.pt", "last.pt", "config.json", "log.jsonl"}
    recipe.main(common + ["--iters", "4", "--resume", str(tmp_path / "run" / "last.pt")])
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in log] == [2, 3, 4]  # resumed at iteration 3, evaluated at the end
    if loss == "ccl":  # the center bank is part of the checkpoint
        state = torch.load(tmp_path / "run" / "last.pt", weights_only=False)
        assert state["loss"]["centers"].shape == (4, 8)

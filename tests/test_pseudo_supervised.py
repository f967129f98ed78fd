"""The pseudo-supervised setting end to end: the demo's row (CBML on re-clustered embeddings) never reads a
training label and beats the untrained network on the unseen digits, and ``examples/pseudo_supervised.py``
runs on a generated fixture."""
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


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = sys.modules[name] = importlib.util.module_from_spec(spec)  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def demo():
    pytest.importorskip("sklearn")  # the demo's data ships with scikit-learn
    return sys.modules.get("demo") or _load("demo")


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what the demo uses
    yield
    torch.set_num_threads(threads)


def test_demo_pseudo_row_reads_no_training_label(demo):
    train, test = demo.load_digits_split()
    train = demo.Split(train.x[:300], train.y[:300])
    test = demo.Split(demo.make_test_split(test).x[:200], test.y[:200])
    shuffled = demo.Split(train.x, train.y[torch.randperm(300)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        runs = [demo.train_pseudo(split, test, epochs=1, clusters=8) for split in (train, shuffled)]
    assert runs[0].losses == runs[1].losses and runs[0].recall1 == runs[1].recall1


def test_demo_pseudo_row_beats_the_untrained_network(demo):
    """The demo's pseudo-supervised row at its default settings: R@1 on the unseen digits above the untrained
    network's, with no training label used."""
    train, test = demo.load_digits_split()
    test = demo.make_test_split(test)
    torch.manual_seed(0)
    untrained = demo.evaluate(demo.embedding_net(), test)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trained = demo.evaluate(demo.train_pseudo(train, seed=0).model, test)
    assert trained["R@1"] > untrained["R@1"] + 0.03, (untrained, trained)


def test_pseudo_supervised_recipe_smoke(tmp_path):
    pytest.importorskip("PIL")
    make_cub(tmp_path / "data")
    recipe = _load("pseudo_supervised")
    out = tmp_path / "run"
    record = recipe.main(["--dataset", "cub", "--root", str(tmp_path / "data"), "--arch", "small",
                          "--image-size", "16", "--dim", "8", "--batch-size", "4", "--m", "2", "--workers", "0",
                          "--clusters", "4", "--epochs", "2", "--eval-epochs", "1", "--out", str(out),
                          "--backend", "reference"])
    assert record["epoch"] == 2 and math.isfinite(record["loss"]) and 0 <= record["R@1"] <= 1
    assert record["clusters_used"] <= 4 and {"R@1", "R@2", "R@4", "R@8"} <= set(record)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2]
    assert {p.name for p in out.iterdir()} >= {"last.pt", "config.json", "log.jsonl"}

"""The embedded demo trains through PML's trainer (seeded, on views of scikit-learn's bundled digits), the trained CCL
embedding beats raw pixels on unseen digits, the fused and reference CCL train identically, the command writes its
artefacts, and the real-benchmark recipe runs a few iterations on a generated fixture."""
from __future__ import annotations

import importlib.util
import json
import math
import sys
import warnings
from pathlib import Path

import numpy as np
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
    pytest.importorskip("pytorch_metric_learning")  # it trains through PML's trainer
    train, test = demo.load_digits_split()
    return train, demo.make_test_split(test)


@pytest.fixture(scope="module")
def small_train(digits):
    """300 training digits (about 60 per class, 3 steps an epoch): enough to check the mechanics quickly (as
    ``small_test``, 300 test views, is for evaluating)."""
    train, _ = digits
    return demo.Split(train.x[:300], train.y[:300])


@pytest.fixture(scope="module")
def small_test(digits):
    _, test = digits
    return demo.Split(test.x[:300], test.y[:300])


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what the demo uses; tiny networks are slower with more threads
    yield
    torch.set_num_threads(threads)


def test_digits_split_is_class_disjoint_and_views_are_seeded(digits):
    train, test = digits
    assert train.x.shape[1:] == (8, 8) and test.x.shape[1:] == (1, demo.CANVAS, demo.CANVAS)
    assert len(train.x) + len(test.x) == 1797
    assert train.y.unique().tolist() == test.y.unique().tolist() == [0, 1, 2, 3, 4]
    assert 0 <= float(test.x.min()) and float(test.x.max()) <= 1
    views = demo.make_views(train.x[:50], seed=3)
    assert torch.equal(views, demo.make_views(train.x[:50], seed=3))
    assert not torch.equal(views, demo.make_views(train.x[:50], seed=4))


def test_ccl_fused_and_reference_agree_at_every_training_step(small_train):
    """The demo's fused and reference CCL rows differ only by rounding. Along one training trajectory (the fused
    backend's: the demo's network, views, batches and Adam), the reference evaluated on the same embeddings and the
    same bank gives, at every step, the same loss, embedding gradient and updated bank within bounds derived from
    fp32 rounding (below). Two separate trainings are not compared: their states drift apart by amounts no
    rounding argument bounds (Adam divides tiny gradients by their own running size), so an R@1 after training is
    not a quantity defined to agree; the demo's table may differ in the third digit between its two CCL rows.

    Bounds, with u = 2⁻²⁴: a cosine of two fp32-normalised D-vectors is off by δs ≤ (2D + 4)u (each product and
    sum rounds once, the norms add 2D); a logit by δz = δs/τ. The row loss lse(z) − z_y − 2λs_y is then off by at
    most 2δz + 2λδs plus (C + 2)u·(1 + |L_i|) for the exponentials, sum and logarithm, and so is the mean. The
    gradient with respect to x̂_i is (Σ_j p_ij W_j − W_y)/τ − 2λW_y over B: p_ij moves by at most p_ij·2δz, so the
    row moves by at most (4δz + (C + D)u)/τ/B + 2λ(D·u)/B before the normalisation's backward, which multiplies it
    by at most 2/‖x_i‖. A class's new center averages at most B unit rows and renormalises: (B + 2D + 8)u per
    element."""
    from pytorch_metric_learning import samplers

    u, steps = 2.0**-24, 6
    torch.manual_seed(0)
    np.random.seed(0)
    model = demo.embedding_net()
    fused = demo.make_loss("ccl", backend="auto")
    reference = demo.make_loss("ccl", backend="reference")
    tau, lam, C, D = fused.params.temperature, fused.params.center_weight, fused.num_classes, demo.DIM
    optimizer = torch.optim.Adam(model.parameters(), lr=demo.LR)
    dataset = demo.AugmentedDigits(small_train, 0)
    sampler = samplers.MPerClassSampler(small_train.y, m=demo.M_PER_CLASS, batch_size=demo.BATCH_SIZE,
                                        length_before_new_iter=len(dataset))
    loader = torch.utils.data.DataLoader(dataset, batch_size=demo.BATCH_SIZE, sampler=sampler)
    ds = (2 * D + 4) * u
    dz = ds / tau
    seen = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "auto" may warn that it falls back to the reference
        for epoch in range(2):
            dataset.set_epoch(epoch)
            for x, y in loader:
                emb = model(x)
                B = emb.shape[0]
                reference.centers.copy_(fused.centers)
                e_ref = emb.detach().clone().requires_grad_()
                loss = fused(emb, y)
                loss_ref = reference(e_ref, y)
                (g,) = torch.autograd.grad(loss, emb, retain_graph=True)
                loss_ref.backward()
                assert abs(float(loss) - float(loss_ref)) <= 2 * dz + 2 * lam * ds + (C + 2) * u * (1 + abs(float(loss)))
                row_bound = ((4 * dz + (C + D) * u) / tau + 2 * lam * D * u) / B
                norms = emb.detach().norm(dim=1, keepdim=True)
                assert ((g - e_ref.grad).abs() <= 2 * row_bound / norms).all(), float((g - e_ref.grad).abs().max())
                torch.testing.assert_close(fused.centers, reference.centers, rtol=0, atol=(B + 2 * D + 8) * u)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                seen += 1
    assert seen == steps


def test_trained_ccl_beats_raw_pixels_on_the_default_task(digits):
    """The demo's claim, at its default settings: the learned embedding retrieves unseen digits better than the
    raw pixels it is computed from (and better than the untrained network)."""
    train, test = digits
    raw = demo.retrieval_metrics(test.x.flatten(1), test.y, ks=demo.REPORT_KS)
    torch.manual_seed(0)
    untrained = demo.evaluate(demo.embedding_net(), test)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trained = demo.evaluate(demo.train("ccl", train, seed=0).model, test)
    for metric in ("R@1", "MAP@R"):
        assert trained[metric] > max(raw[metric], untrained[metric]) + 0.03, (metric, raw, untrained, trained)


def test_demo_command_writes_results(tmp_path, digits, small_train, monkeypatch):
    out = tmp_path / "demo"
    clean_test = demo.load_digits_split()[1]
    small_clean_test = demo.Split(clean_test.x[:300], clean_test.y[:300])
    monkeypatch.setattr(demo, "load_digits_split", lambda: (small_train, small_clean_test))  # 1 epoch = 3 steps
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert demo.main(["--out", str(out), "--epochs", "1", "--quiet", "--no-plots"]) == 0
    results = json.loads((out / "results.json").read_text())
    names = [row["model"] for row in results["results"]]
    assert names[:2] == [f"raw pixels ({demo.CANVAS ** 2}-d, no network)", "untrained network"]
    assert names[2].startswith("CCL, backend=auto") and names[-1] == "CCL, backend=reference"
    assert {"CBML + MS miner", "PML NormalizedSoftmax", "PML MultiSimilarity + MS miner"} <= set(names)
    assert all(0 <= row["R@1"] <= 1 and 0 <= row["MAP@R"] <= 1 for row in results["results"])
    assert results["fused_vs_reference"]["R@1_auto"] == results["results"][2]["R@1"]
    assert "| model | R@1 |" in (out / "results.md").read_text()


def test_demo_without_pytorch_metric_learning_says_what_to_install(tmp_path, digits, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "pytorch_metric_learning", None)  # import now raises ImportError
    assert demo.main(["--out", str(tmp_path), "--epochs", "1", "--quiet", "--no-plots"]) == 2
    assert "pip install 'fastcdml[demo]'" in capsys.readouterr().out


def test_demo_plots(tmp_path, small_train, small_test):
    pytest.importorskip("matplotlib")
    test = small_test
    runs = {"CCL": demo.train("ccl", small_train, test, epochs=1, backend="reference")}
    torch.manual_seed(0)
    assert demo.plot(tmp_path, runs, demo.embedding_net(), test, 0.5) == ["loss_curves.png", "embeddings.png"]
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

"""``python examples/demo.py`` (``make demo``): metric learning on unseen classes, on data that ships with scikit-learn.

Task: scikit-learn's bundled handwritten digits (1,797 8×8 images, no download) under nuisances that a learned
embedding can discount and raw pixels cannot: each digit is placed on a 24×24 canvas with a random shift of up
to ±8 pixels, rotated by up to ±30°, scaled by up to ±15 %, with Gaussian pixel noise (σ 0.05). Every view is
generated from a seed. Class-disjoint as in metric-learning benchmarks: train on digits 0–4 (fresh random views
each epoch), retrieve among one fixed view of each unseen digit 5–9 (every test image is a query against all
other test images, cosine similarity). On clean 8×8 digits raw pixels are nearly perfect (R@1 0.99), so no
network could show what training does; here raw pixels fall to R@1 0.43 and every trained network beats them.

A small conv net (three 3×3 conv + batch-norm + ReLU blocks of 16, 32 and 64 channels, max-pooled to one vector,
then a linear layer to ``--dim``, 32 by default) is trained by pytorch-metric-learning's (PML's) trainer
``trainers.MetricLossOnly`` with PML's ``MPerClassSampler`` (batches of 5 classes × 20), using fastcdml's CCL
and CBML and, as baselines, PML's NormalizedSoftmaxLoss (the closest published relative of CCL) and
MultiSimilarityLoss. The pair losses (CBML, MultiSimilarity) get PML's ``MultiSimilarityMiner``; the center and
proxy losses use every sample (PML would only re-weight them by the mined tuples). Each loss has its library
defaults and starts from the same seeded network. Fused drop-ins with PML's names (such as
``fastcdml.NormalizedSoftmaxLoss``) are trained too when this fastcdml has them.

The pseudo-supervised row trains CBML on cluster ids instead of labels (``train_pseudo``: the training
digits' embeddings are re-clustered by ``fastcdml.pseudo_labels`` every epoch; no training label is read).

Reports Recall@1/2/4 and MAP@R for raw pixels, the untrained network and each trained one, trains CCL once more
with ``backend="reference"`` next to ``backend="auto"`` (the fused op when this installation has one), and
writes ``results.json``, ``results.md``, ``loss_curves.png`` and ``embeddings.png`` (a PCA projection of the
test embeddings) to ``--out``. ``--sweep`` adds a CCL sweep of ``center_weight`` × ``margin`` over three seeds
(about three more minutes of CPU).

Needs scikit-learn and pytorch-metric-learning (``pip install 'fastcdml[demo]'``); the plots need matplotlib and
are skipped without it. Deterministic for a given ``--seed`` and ``--threads`` (default 1: faster than several
threads for a network this small, and the same numbers on every machine with the same torch build). PML's
sampler draws from numpy's global generator, which is therefore seeded before each run.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import platform
import time
import types
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import fastcdml
from fastcdml import __version__
from fastcdml._backend import resolve, unavailable_reason
from fastcdml.evaluation import compute_embeddings, retrieval_metrics
from fastcdml.losses import CenterContrastiveLoss, ContrastiveBayesianLoss

TRAIN_DIGITS, TEST_DIGITS = range(0, 5), range(5, 10)
REPORT_KS = (1, 2, 4)
CANVAS, MAX_SHIFT, MAX_ROTATION, MAX_SCALE, NOISE = 24, 8, 30.0, 0.15, 0.05
EPOCHS, DIM, BATCH_SIZE, M_PER_CLASS, LR = 8, 32, 100, 20, 3e-3
TEST_VIEWS_SEED = 1_000_003  # the test views depend on --seed through this offset, never on a training seed
SWEEP_CENTER_WEIGHTS = (0.0, 0.1, 0.3, 1.0)
SWEEP_MARGINS = (0.0, 0.1, 0.3)
SWEEP_SEEDS = (0, 1, 2)
NAMES = {  # loss key -> table label; "fastcdml-normsoftmax" only where fastcdml has the drop-in
    "ccl": "CCL",
    "cbml": "CBML + MS miner",
    "fastcdml-normsoftmax": "fastcdml NormalizedSoftmax",
    "pml-normsoftmax": "PML NormalizedSoftmax",
    "pml-multisimilarity": "PML MultiSimilarity + MS miner",
}
PAIR_LOSSES = ("cbml", "pml-multisimilarity")  # trained with PML's MultiSimilarityMiner
PSEUDO_NAME = "CBML, pseudo labels (no labels used)"
PSEUDO_CLUSTERS = 40  # k-means clusters of the training embeddings (the 5 digit classes are not told)


@dataclass
class Split:
    """Images (N, 8, 8) float32 in [0, 1] and labels (N,) int64, 0-based within the split."""

    x: torch.Tensor
    y: torch.Tensor


def load_digits_split() -> tuple[Split, Split]:
    """Digits 0–4 (train, labels 0–4) and 5–9 (test, labels 0–4) as clean 8×8 images scaled to [0, 1]."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise ImportError("the demo needs scikit-learn for its bundled digits: pip install 'fastcdml[demo]'") from err
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.int64)
    train, test = y < 5, y >= 5
    return Split(x[train], y[train]), Split(x[test], y[test] - 5)


def make_views(images: torch.Tensor, seed: int) -> torch.Tensor:
    """One random view (N, 1, CANVAS, CANVAS) of each 8×8 image, a function of ``seed`` only.

    The digit is centred on the canvas, then one affine warp per image (rotation up to ±MAX_ROTATION degrees,
    scale up to ±MAX_SCALE, shift up to ±MAX_SHIFT pixels per axis, bilinear) and Gaussian noise of std NOISE.
    """
    gen = torch.Generator().manual_seed(seed)
    n, pad = len(images), (CANVAS - 8) // 2
    canvas = F.pad(images, (pad, CANVAS - 8 - pad, pad, CANVAS - 8 - pad))[:, None]
    angle = (torch.rand(n, generator=gen) * 2 - 1) * math.radians(MAX_ROTATION)
    scale = 1 + (torch.rand(n, generator=gen) * 2 - 1) * MAX_SCALE
    shift = (torch.rand(n, 2, generator=gen) * 2 - 1) * (2 * MAX_SHIFT / CANVAS)  # affine_grid's [-1, 1] units
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(canvas.shape), align_corners=False)
    views = F.grid_sample(canvas, grid, align_corners=False)
    return (views + NOISE * torch.randn(views.shape, generator=gen)).clamp(0, 1)


def make_test_split(test: Split, seed: int = 0) -> Split:
    """The fixed test set: one view of each unseen digit (the same for every loss and training seed)."""
    return Split(make_views(test.x, TEST_VIEWS_SEED + seed), test.y)


class AugmentedDigits(torch.utils.data.Dataset):
    """The training set as PML's trainer reads it, ``(view, label)`` pairs; :meth:`set_epoch` draws fresh views
    (seeded by ``seed`` and the epoch)."""

    def __init__(self, split: Split, seed: int = 0):
        self.split, self.seed, self.labels = split, seed, split.y
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.views = make_views(self.split.x, self.seed * 1000 + epoch)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return self.views[i], self.labels[i]


def embedding_net(dim: int = DIM) -> nn.Sequential:
    """PML's trunk and embedder in one module: three conv blocks (16, 32, 64 channels; the global max-pool makes the
    features shift-tolerant), then a linear embedder to ``dim``."""
    def block(cin, cout):
        return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]

    trunk = nn.Sequential(*block(1, 16), nn.MaxPool2d(2), *block(16, 32), nn.MaxPool2d(2), *block(32, 64),
                          nn.AdaptiveMaxPool2d(1), nn.Flatten())
    return nn.Sequential(trunk, nn.Linear(64, dim))


def available_losses() -> list[str]:
    """The loss keys of :data:`NAMES` this installation can train (PML's trainer is needed for all of them)."""
    return [name for name in NAMES if name != "fastcdml-normsoftmax" or hasattr(fastcdml, "NormalizedSoftmaxLoss")]


def make_loss(name: str, dim: int = DIM, backend: str = "auto", **hyper) -> nn.Module:
    """The loss ``name`` (a key of :data:`NAMES`) with library defaults unless overridden by ``hyper``."""
    num_classes = len(TRAIN_DIGITS)
    if name == "ccl":
        return CenterContrastiveLoss(num_classes, dim, backend=backend, **hyper)
    if name == "cbml":
        return ContrastiveBayesianLoss(backend=backend, **hyper)
    if name == "fastcdml-normsoftmax":
        return fastcdml.NormalizedSoftmaxLoss(num_classes, dim, **({} if backend == "auto" else {"backend": backend}),
                                              **hyper)
    from pytorch_metric_learning import losses

    if name == "pml-normsoftmax":
        return losses.NormalizedSoftmaxLoss(num_classes, dim, **hyper)
    if name == "pml-multisimilarity":
        return losses.MultiSimilarityLoss(**hyper)
    raise ValueError(f"unknown loss {name!r}")


def evaluate(model: nn.Module, split: Split) -> dict[str, float]:
    """Self-mode retrieval metrics of a test split (each image queries all the others)."""
    emb, _ = compute_embeddings(model, split.x)
    return retrieval_metrics(emb, split.y, ks=REPORT_KS)


@dataclass
class Run:
    """A trained model, its training time in seconds (evaluation excluded) and per-epoch curves."""

    model: nn.Module
    seconds: float
    losses: list[float] = field(default_factory=list)  # mean training loss per epoch
    recall1: list[float] = field(default_factory=list)  # test R@1 after each epoch (when tracked)


@contextlib.contextmanager
def _without_pml_bars():
    """PML's trainer draws a progress bar per epoch and has no switch for it; the demo draws one per loss."""
    from pytorch_metric_learning.trainers import base_trainer

    quiet = types.SimpleNamespace(tqdm=functools.partial(base_trainer.tqdm.tqdm, disable=True))
    saved, base_trainer.tqdm = base_trainer.tqdm, quiet
    try:
        yield
    finally:
        base_trainer.tqdm = saved


def train(loss_name: str, train_split: Split, test_split: Split | None = None, *, epochs: int = EPOCHS,
          dim: int = DIM, lr: float = LR, seed: int = 0, backend: str = "auto", progress: bool = False,
          **hyper) -> Run:
    """Train a fresh seeded :func:`embedding_net` with one loss through PML's ``MetricLossOnly``; ``test_split``
    given (views, see :func:`make_test_split`): track test R@1 per epoch.

    The network initialisation depends only on ``seed`` (the same for every loss); the loss's own state (CCL
    centers, NormalizedSoftmax proxies) is drawn afterwards. One Adam with ``lr`` per part, as PML's trainers
    expect: trunk, embedder and the loss's parameters where it has any. The pair losses get a ``MultiSimilarityMiner``.
    """
    from pytorch_metric_learning import miners, samplers, trainers
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    np.random.seed(seed)  # PML's MPerClassSampler draws from numpy's global generator
    model = embedding_net(dim)
    loss_fn = make_loss(loss_name, dim, backend, **hyper)
    trunk, embedder = model
    optimizers = {"trunk_optimizer": torch.optim.Adam(trunk.parameters(), lr=lr),
                  "embedder_optimizer": torch.optim.Adam(embedder.parameters(), lr=lr)}
    if list(loss_fn.parameters()):
        optimizers["metric_loss_optimizer"] = torch.optim.Adam(loss_fn.parameters(), lr=lr)
    dataset = AugmentedDigits(train_split, seed)
    sampler = samplers.MPerClassSampler(train_split.y, m=M_PER_CLASS, batch_size=BATCH_SIZE,
                                        length_before_new_iter=len(dataset))
    run, step_losses, eval_seconds = Run(model, 0.0), [], [0.0]
    bar = tqdm(total=epochs, desc=f"{loss_name} seed {seed}", disable=not progress, leave=False)

    def end_of_iteration(trainer):
        step_losses.append(float(trainer.losses["total_loss"].detach()))

    def end_of_epoch(trainer):
        run.losses.append(sum(step_losses) / len(step_losses))
        step_losses.clear()
        dataset.set_epoch(trainer.epoch)  # fresh views for the next epoch
        if test_split is not None:
            start = time.perf_counter()
            run.recall1.append(evaluate(model, test_split)["R@1"])
            eval_seconds[0] += time.perf_counter() - start
        bar.update()
        return True

    trainer = trainers.MetricLossOnly(
        models={"trunk": trunk, "embedder": embedder}, optimizers=optimizers, batch_size=BATCH_SIZE,
        loss_funcs={"metric_loss": loss_fn},
        mining_funcs={"tuple_miner": miners.MultiSimilarityMiner()} if loss_name in PAIR_LOSSES else {},
        dataset=dataset, sampler=sampler, dataloader_num_workers=0, data_device=torch.device("cpu"),
        end_of_iteration_hook=end_of_iteration, end_of_epoch_hook=end_of_epoch)
    start = time.perf_counter()
    with _without_pml_bars(), warnings.catch_warnings():
        # PML formats the loss tensor (with its graph) for the bar it draws: torch warns about the conversion
        warnings.filterwarnings("ignore", message="Converting a tensor with requires_grad", category=UserWarning)
        trainer.train(num_epochs=epochs)
    run.seconds = time.perf_counter() - start - eval_seconds[0]
    bar.close()
    return run


def train_pseudo(train_split: Split, test_split: Split | None = None, *, epochs: int = EPOCHS, dim: int = DIM,
                 lr: float = LR, seed: int = 0, clusters: int = PSEUDO_CLUSTERS, progress: bool = False) -> Run:
    """The pseudo-supervised setting: CBML (defaults, ``backend="auto"``) on cluster ids instead of labels. Each
    epoch embeds a second random view of every training digit with the current network, clusters those
    embeddings with :func:`fastcdml.pseudo_labels` (``clusters`` centres) and trains one pass of batches of
    5 clusters × 20 on the epoch's views (the ones :func:`train` uses) with the cluster ids, so the network learns
    what the two views share; ``train_split.y`` is never read. The same seeded network start as :func:`train`,
    one Adam over the whole network."""
    from tqdm.auto import tqdm

    from fastcdml.datasets import MPerClassSampler

    torch.manual_seed(seed)
    model = embedding_net(dim)
    loss_fn = make_loss("cbml", dim)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    run, eval_seconds = Run(model, 0.0), 0.0
    start = time.perf_counter()
    for epoch in tqdm(range(epochs), desc=f"pseudo-cbml seed {seed}", disable=not progress, leave=False):
        views = make_views(train_split.x, seed * 1000 + epoch)  # the views train() draws for this epoch
        other = make_views(train_split.x, seed * 1000 + epoch + 500)  # the same digits seen otherwise
        emb, _ = compute_embeddings(model, other)
        labels = fastcdml.pseudo_labels(emb, clusters, seed=seed * 1000 + epoch)
        sampler = MPerClassSampler(labels, M_PER_CLASS, BATCH_SIZE, seed=seed)
        sampler.set_epoch(epoch)
        model.train()
        losses = []
        for batch in sampler:
            loss = loss_fn(model(views[batch]), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss))
        run.losses.append(sum(losses) / len(losses))
        if test_split is not None:
            t = time.perf_counter()
            run.recall1.append(evaluate(model, test_split)["R@1"])
            eval_seconds += time.perf_counter() - t
    run.seconds = time.perf_counter() - start - eval_seconds
    return run


def _row(name: str, metrics: dict, seconds: float | None = None) -> dict:
    row = {"model": name} | {k: round(metrics[k], 4) for k in [f"R@{k}" for k in REPORT_KS] + ["MAP@R"]}
    row["train_s"] = None if seconds is None else round(seconds, 2)
    return row


def _backend_note(loss: str) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        name = resolve("auto", loss, torch.device("cpu")).name
    if name != "reference":
        return name
    return f"reference ({unavailable_reason('cpp', loss, 'cpu')})"


def sweep(train_split: Split, test_split: Split, epochs: int, dim: int, progress: bool) -> list[dict]:
    """CCL test R@1 and MAP@R (mean over :data:`SWEEP_SEEDS`) for each center_weight × margin."""
    rows = []
    for lam in SWEEP_CENTER_WEIGHTS:
        for margin in SWEEP_MARGINS:
            r1, mapr = [], []
            for seed in SWEEP_SEEDS:
                run = train("ccl", train_split, epochs=epochs, dim=dim, seed=seed, progress=progress,
                            center_weight=lam, margin=margin)
                metrics = evaluate(run.model, test_split)
                r1.append(metrics["R@1"])
                mapr.append(metrics["MAP@R"])
            rows.append({"center_weight": lam, "margin": margin, "R@1": round(sum(r1) / len(r1), 4),
                         "R@1_per_seed": [round(v, 4) for v in r1], "MAP@R": round(sum(mapr) / len(mapr), 4),
                         "MAP@R_per_seed": [round(v, 4) for v in mapr]})
    return rows


def markdown(results: dict) -> str:
    """The results as the Markdown tables the README shows."""
    cfg = results["config"]
    cols = ["model"] + [f"R@{k}" for k in REPORT_KS] + ["MAP@R", "train_s"]
    lines = [f"{results['task']}; {cfg['network']}, {cfg['epochs']} epochs through PML's MetricLossOnly, Adam lr "
             f"{cfg['lr']}, batches of {cfg['batch_size'] // cfg['m']} classes × {cfg['m']}, seed {cfg['seed']}, "
             f"{cfg['threads']} CPU thread(s); train_s = training seconds (evaluation excluded).", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in results["results"]:
        lines.append("| " + " | ".join("–" if row[c] is None else f"{row[c]}" for c in cols) + " |")
    side = results["fused_vs_reference"]
    lines += ["", f"CCL `backend=\"auto\"` ({side['auto_backend']}): R@1 {side['R@1_auto']}, "
              f"`backend=\"reference\"`: R@1 {side['R@1_reference']}."]
    for note in results["notes"]:
        lines.append(f"\n{note}")
    if results.get("sweep"):
        lines += ["", "CCL sweep (test R@1 / MAP@R, mean of seeds " + ", ".join(map(str, SWEEP_SEEDS)) + "):", "",
                  "| center_weight \\ margin | " + " | ".join(map(str, SWEEP_MARGINS)) + " |",
                  "|---|" + "---|" * len(SWEEP_MARGINS)]
        for lam in SWEEP_CENTER_WEIGHTS:
            cells = [f"{r['R@1']:.4f} / {r['MAP@R']:.4f}" for r in results["sweep"] if r["center_weight"] == lam]
            lines.append(f"| {lam} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(out: Path, runs: dict[str, Run], untrained: nn.Module, test_split: Split,
         raw_recall1: float | None = None) -> list[str]:
    """loss_curves.png (training loss per loss; test R@1 per epoch against the untrained network's and the raw
    pixels') and embeddings.png (2-D PCA of the L2-normalised test embeddings, one colour per digit)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(runs) + 1, figsize=(3.3 * (len(runs) + 1), 3.3))
    for ax, (name, run) in zip(axes, runs.items()):
        ax.plot(range(1, len(run.losses) + 1), run.losses)
        ax.set_title(f"{name}: training loss", fontsize=9)
        ax.set(xlabel="epoch")
    for name, run in runs.items():
        axes[-1].plot(range(1, len(run.recall1) + 1), run.recall1, label=name)
    axes[-1].axhline(evaluate(untrained, test_split)["R@1"], color="gray", linestyle="--", label="untrained")
    if raw_recall1 is not None:
        axes[-1].axhline(raw_recall1, color="black", linestyle=":", label="raw pixels")
    axes[-1].set_title("test R@1 (unseen digits 5–9)", fontsize=9)
    axes[-1].set(xlabel="epoch")
    axes[-1].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "loss_curves.png", dpi=110)
    plt.close(fig)

    embeddings = {"raw pixels": test_split.x.flatten(1),
                  "untrained": compute_embeddings(untrained, test_split.x)[0]}
    embeddings |= {name: compute_embeddings(run.model, test_split.x)[0] for name, run in runs.items()}
    fig, axes = plt.subplots(1, len(embeddings), figsize=(3.2 * len(embeddings), 3.6))
    for ax, (name, emb) in zip(axes, embeddings.items()):
        emb = emb / emb.norm(dim=1, keepdim=True).clamp_min(1e-12)
        centred = emb - emb.mean(dim=0)
        xy = centred @ torch.linalg.svd(centred, full_matrices=False).Vh[:2].T
        for label in range(len(TEST_DIGITS)):
            pts = xy[test_split.y == label]
            ax.scatter(pts[:, 0], pts[:, 1], s=3, color=f"C{label}", label=f"digit {TEST_DIGITS[label]}")
        ax.set_title(name, fontsize=9)
        ax.set(xticks=[], yticks=[])
    axes[-1].legend(loc="center left", bbox_to_anchor=(1.0, 0.5), markerscale=3)
    fig.suptitle("test embeddings (unseen digits), PCA of the normalised embeddings")
    fig.tight_layout()
    fig.savefig(out / "embeddings.png", dpi=110)
    plt.close(fig)
    return ["loss_curves.png", "embeddings.png"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python examples/demo.py", description=__doc__.replace("``", ""),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("fastcdml-demo"), help="output folder (created)")
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--dim", type=int, default=DIM, help="embedding size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--sweep", action="store_true", help="also sweep CCL center_weight x margin (3 seeds)")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace) -> int:
    progress = not args.quiet
    try:
        train_split, test_clean = load_digits_split()
        import pytorch_metric_learning  # noqa: F401  (the trainer, sampler, miner and baselines)
    except ImportError as err:
        print(f"demo: {err}" if "scikit-learn" in str(err) else
              "demo: the demo trains through pytorch-metric-learning: pip install 'fastcdml[demo]'")
        return 2
    test_split = make_test_split(test_clean, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    notes = []
    common = dict(epochs=args.epochs, dim=args.dim, seed=args.seed, progress=progress)

    pixels = retrieval_metrics(test_split.x.flatten(1), test_split.y, ks=REPORT_KS)
    torch.manual_seed(args.seed)
    untrained = embedding_net(args.dim)
    rows = [_row(f"raw pixels ({CANVAS * CANVAS}-d, no network)", pixels),
            _row("untrained network", evaluate(untrained, test_split))]
    auto_backend = _backend_note("ccl")
    runs = {}
    for loss_name in available_losses():
        label = NAMES[loss_name]
        run = train(loss_name, train_split, test_split, **common)
        runs[label] = run
        rows.append(_row(label, evaluate(run.model, test_split), run.seconds))
        if loss_name == "ccl":
            ccl_auto = rows[-1]
    if "fastcdml-normsoftmax" not in available_losses():
        notes.append("fastcdml.NormalizedSoftmaxLoss is not in this fastcdml version: its row is left out.")
    pseudo_run = train_pseudo(train_split, test_split, **common)
    runs[PSEUDO_NAME] = pseudo_run
    rows.append(_row(PSEUDO_NAME, evaluate(pseudo_run.model, test_split), pseudo_run.seconds))
    notes.append(f"{PSEUDO_NAME}: the training digits are clustered into {PSEUDO_CLUSTERS} groups by "
                 "fastcdml.pseudo_labels (spherical k-means of the current embeddings) every epoch and CBML trains "
                 "on the cluster ids; no training label is read (the pseudo-supervised setting).")
    reference_run = train("ccl", train_split, test_split, backend="reference", **common)
    rows.append(_row("CCL, backend=reference", evaluate(reference_run.model, test_split), reference_run.seconds))
    ccl_auto["model"] = f"CCL, backend=auto ({auto_backend.split(' ')[0]})"
    if auto_backend.startswith("reference"):
        notes.append("No fused CPU op in this installation: backend=\"auto\" ran the reference too, so the two CCL "
                     "rows are the same computation.")
    results = {
        "task": (f"sklearn digits on a {CANVAS}x{CANVAS} canvas, random shift ±{MAX_SHIFT} px, rotation "
                 f"±{MAX_ROTATION:g}°, scale ±{MAX_SCALE:.0%}, noise σ {NOISE}; train on 0-4, retrieve among "
                 "unseen 5-9 (one view each, self mode, cosine)"),
        "config": vars(args) | {"out": str(args.out), "batch_size": BATCH_SIZE, "m": M_PER_CLASS, "lr": LR,
                                "optimizer": "Adam", "trainer": "pytorch_metric_learning.trainers.MetricLossOnly",
                                "miner": f"MultiSimilarityMiner for {', '.join(PAIR_LOSSES)}",
                                "network": f"conv 16-32-64 + max-pool + linear to {args.dim}",
                                "losses": "library defaults"},
        "environment": {"fastcdml": __version__, "torch": torch.__version__, "python": platform.python_version(),
                        "pytorch_metric_learning": pytorch_metric_learning.__version__,
                        "machine": platform.machine(), "threads": torch.get_num_threads(),
                        "ccl_auto_backend": auto_backend, "cbml_auto_backend": _backend_note("cbml")},
        "results": rows,
        "fused_vs_reference": {"auto_backend": auto_backend, "R@1_auto": ccl_auto["R@1"],
                               "R@1_reference": rows[-1]["R@1"]},
        "notes": notes,
        "history": {label: {"loss": run.losses, "R@1": run.recall1} for label, run in runs.items()},
        "sweep": sweep(train_split, test_split, args.epochs, args.dim, progress) if args.sweep else [],
    }
    written = ["results.json", "results.md"]
    (args.out / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    table = markdown(results)
    (args.out / "results.md").write_text(table)
    if not args.no_plots:
        try:
            written += plot(args.out, runs, untrained, test_split, pixels["R@1"])
        except ImportError:
            print("demo: matplotlib is not installed, plots skipped (pip install 'fastcdml[demo]')")
    print(table)
    print(f"wrote {', '.join(str(args.out / name) for name in written)}")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())

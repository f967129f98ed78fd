"""``python examples/demo.py`` (``make demo``): proof that the losses train, on data that ships with scikit-learn.

Task: scikit-learn's bundled handwritten digits (1,797 8×8 images, no download), class-disjoint as in metric
learning benchmarks: train on digits 0–4, retrieve among the unseen digits 5–9 (every test image is a query
against all other test images). A 3-layer MLP (64 → 128 → 128 → ``--dim``, 8 by default: small enough that the
untrained network is a weak retriever) is trained with m-per-class batches
by CCL, CBML and pytorch-metric-learning's NormalizedSoftmaxLoss (the closest published relative of CCL; skipped
with a note when pytorch-metric-learning is absent), each with its library defaults, from the same seeded
initialisation. It reports Recall@1/2/4 and MAP@R before and after training, trains CCL once more with
``backend="reference"`` next to ``backend="auto"`` (the fused op when this installation has one), and writes
``results.json``, ``results.md``, ``loss_curves.png`` and ``embeddings.png`` (a PCA projection of the test
embeddings) to ``--out``. ``--sweep`` adds a CCL sweep of ``center_weight`` × ``margin`` over three seeds.

Needs scikit-learn (``pip install 'fastcdml[demo]'``); the plots need matplotlib and are skipped without it.
Deterministic for a given ``--seed`` and ``--threads`` (default 1: faster than several threads for a network
this small, and the same numbers on every machine with the same torch build).
"""
from __future__ import annotations

import argparse
import json
import platform
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from fastcdml import __version__
from fastcdml._backend import resolve, unavailable_reason
from fastcdml.datasets import MPerClassSampler
from fastcdml.evaluation import compute_embeddings, retrieval_metrics
from fastcdml.losses import CenterContrastiveLoss, ContrastiveBayesianLoss

TRAIN_DIGITS, TEST_DIGITS = range(0, 5), range(5, 10)
REPORT_KS = (1, 2, 4)
SWEEP_CENTER_WEIGHTS = (0.0, 0.1, 0.3, 1.0)
SWEEP_MARGINS = (0.0, 0.1, 0.3)
SWEEP_SEEDS = (0, 1, 2)


@dataclass
class Split:
    """Digit images (N, 64) float32 in [0, 1] and labels (N,) int64, 0-based within the split."""

    x: torch.Tensor
    y: torch.Tensor


def load_digits_split() -> tuple[Split, Split]:
    """Digits 0–4 (train, labels 0–4) and 5–9 (test, labels 0–4), pixels scaled to [0, 1]."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise ImportError("the demo needs scikit-learn for its bundled digits: pip install 'fastcdml[demo]'") from err
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.int64)
    train, test = y < 5, y >= 5
    return Split(x[train], y[train]), Split(x[test], y[test] - 5)


def embedding_net(dim: int) -> nn.Module:
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, dim))


def make_loss(name: str, dim: int, backend: str = "auto", **hyper) -> nn.Module:
    """``"ccl"``, ``"cbml"`` or ``"pml-normsoftmax"`` with library defaults unless overridden by ``hyper``."""
    if name == "ccl":
        return CenterContrastiveLoss(len(TRAIN_DIGITS), dim, backend=backend, **hyper)
    if name == "cbml":
        return ContrastiveBayesianLoss(backend=backend, **hyper)
    if name == "pml-normsoftmax":
        from pytorch_metric_learning.losses import NormalizedSoftmaxLoss

        return NormalizedSoftmaxLoss(len(TRAIN_DIGITS), dim, **hyper)
    raise ValueError(f"unknown loss {name!r}")


def evaluate(model: nn.Module, split: Split) -> dict[str, float]:
    """Self-mode retrieval metrics of the test split (each image queries all the others)."""
    emb, _ = compute_embeddings(model, split.x)
    return retrieval_metrics(emb, split.y, ks=REPORT_KS)


@dataclass
class Run:
    """A trained model, its training time in seconds (evaluation excluded) and per-epoch curves."""

    model: nn.Module
    seconds: float
    losses: list[float] = field(default_factory=list)  # mean training loss per epoch
    recall1: list[float] = field(default_factory=list)  # test R@1 after each epoch (when tracked)


def train(loss_name: str, train_split: Split, test_split: Split | None = None, *, epochs: int = 10,
          dim: int = 8, batch_size: int = 100, m: int = 20, lr: float = 1e-3, seed: int = 0,
          backend: str = "auto", progress: bool = False, **hyper) -> Run:
    """Train a fresh seeded :func:`embedding_net` with one loss; ``test_split`` given: track test R@1 per epoch.

    The network initialisation depends only on ``seed`` (the same for every loss); the loss's own state (CCL
    centers, NormalizedSoftmax proxies) is drawn afterwards. Adam on the network and any loss parameters.
    """
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    model = embedding_net(dim)
    loss_fn = make_loss(loss_name, dim, backend, **hyper)
    optimizer = torch.optim.Adam(list(model.parameters()) + list(loss_fn.parameters()), lr=lr)
    sampler = MPerClassSampler(train_split.y, m=m, batch_size=batch_size, seed=seed)
    run = Run(model, 0.0)
    for epoch in tqdm(range(epochs), desc=f"{loss_name} seed {seed}", disable=not progress, leave=False):
        start = time.perf_counter()
        sampler.set_epoch(epoch)
        total = 0.0
        for batch in sampler:
            loss = loss_fn(model(train_split.x[batch]), train_split.y[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item()
        run.seconds += time.perf_counter() - start
        run.losses.append(total / len(sampler))
        if test_split is not None:
            run.recall1.append(evaluate(model, test_split)["R@1"])
    return run


def _row(name: str, metrics: dict, seconds: float | None = None) -> dict:
    row = {"model": name} | {k: round(metrics[k], 4) for k in [f"R@{k}" for k in REPORT_KS] + ["MAP@R"]}
    row["train_s"] = None if seconds is None else round(seconds, 2)
    return row


def _backend_note(loss: str) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        name, _ = resolve("auto", loss, torch.device("cpu"))
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
                         "R@1_per_seed": [round(v, 4) for v in r1], "MAP@R": round(sum(mapr) / len(mapr), 4)})
    return rows


def markdown(results: dict) -> str:
    """The results as the Markdown tables the README shows."""
    cfg = results["config"]
    cols = ["model"] + [f"R@{k}" for k in REPORT_KS] + ["MAP@R", "train_s"]
    lines = [f"{results['task']}; {cfg['network']}, {cfg['epochs']} epochs, Adam lr {cfg['lr']}, batches of "
             f"{cfg['batch_size'] // cfg['m']} classes × {cfg['m']}, seed {cfg['seed']}, {cfg['threads']} CPU "
             "thread(s); train_s = training seconds (evaluation excluded).", "",
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


def plot(out: Path, runs: dict[str, Run], untrained: nn.Module, test_split: Split) -> list[str]:
    """loss_curves.png (training loss per loss; test R@1 per epoch against the untrained network's) and
    embeddings.png (2-D PCA of the L2-normalised test embeddings, one colour per digit)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(runs) + 1, figsize=(4 * (len(runs) + 1), 3.4))
    for ax, (name, run) in zip(axes, runs.items()):
        ax.plot(range(1, len(run.losses) + 1), run.losses)
        ax.set(title=f"{name}: training loss", xlabel="epoch")
    for name, run in runs.items():
        axes[-1].plot(range(1, len(run.recall1) + 1), run.recall1, label=name)
    axes[-1].axhline(evaluate(untrained, test_split)["R@1"], color="gray", linestyle="--", label="untrained")
    axes[-1].set(title="test R@1 (unseen digits 5–9)", xlabel="epoch")
    axes[-1].legend()
    fig.tight_layout()
    fig.savefig(out / "loss_curves.png", dpi=110)
    plt.close(fig)

    models = {"untrained": untrained} | {name: run.model for name, run in runs.items()}
    fig, axes = plt.subplots(1, len(models), figsize=(3.4 * len(models), 3.6))
    for ax, (name, model) in zip(axes, models.items()):
        emb, _ = compute_embeddings(model, test_split.x)
        emb = emb / emb.norm(dim=1, keepdim=True).clamp_min(1e-12)
        centred = emb - emb.mean(dim=0)
        xy = centred @ torch.linalg.svd(centred, full_matrices=False).Vh[:2].T
        for label in range(len(TEST_DIGITS)):
            pts = xy[test_split.y == label]
            ax.scatter(pts[:, 0], pts[:, 1], s=4, color=f"C{label}", label=f"digit {TEST_DIGITS[label]}")
        ax.set(title=name, xticks=[], yticks=[])
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
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--dim", type=int, default=8, help="embedding size")
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
        train_split, test_split = load_digits_split()
    except ImportError as err:
        print(f"demo: {err}")
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    notes = []
    common = dict(epochs=args.epochs, dim=args.dim, seed=args.seed, progress=progress)

    pixels = retrieval_metrics(test_split.x, test_split.y, ks=REPORT_KS)
    torch.manual_seed(args.seed)
    untrained = embedding_net(args.dim)
    rows = [_row("raw pixels (64-d, no network)", pixels), _row("untrained network", evaluate(untrained, test_split))]
    auto_backend = _backend_note("ccl")
    names = {"ccl": "CCL", "cbml": "CBML", "pml-normsoftmax": "PML NormalizedSoftmax"}
    runs = {}
    for loss_name, label in names.items():
        try:
            run = train(loss_name, train_split, test_split, **common)
        except ImportError:
            notes.append(f"{label} skipped: pytorch-metric-learning is not installed (pip install "
                         "'fastcdml[demo]').")
            continue
        runs[label] = run
        rows.append(_row(label, evaluate(run.model, test_split), run.seconds))
        if loss_name == "ccl":
            ccl_auto = rows[-1]
    reference_run = train("ccl", train_split, test_split, backend="reference", **common)
    rows.append(_row("CCL, backend=reference", evaluate(reference_run.model, test_split), reference_run.seconds))
    ccl_auto["model"] = f"CCL, backend=auto ({auto_backend.split(' ')[0]})"
    if auto_backend.startswith("reference"):
        notes.append("No fused CPU op in this installation: backend=\"auto\" ran the reference too, so the two CCL "
                     "rows are the same computation.")
    results = {
        "task": "sklearn digits, train on 0-4, retrieve among unseen 5-9 (self mode, cosine)",
        "config": vars(args) | {"out": str(args.out), "batch_size": 100, "m": 20, "lr": 1e-3, "optimizer": "Adam",
                                "network": f"MLP 64-128-128-{args.dim}", "losses": "library defaults"},
        "environment": {"fastcdml": __version__, "torch": torch.__version__, "python": platform.python_version(),
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
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    table = markdown(results)
    (args.out / "results.md").write_text(table)
    if not args.no_plots:
        try:
            written += plot(args.out, runs, untrained, test_split)
        except ImportError:
            print("demo: matplotlib is not installed, plots skipped (pip install 'fastcdml[demo]')")
    print(table)
    print(f"wrote {', '.join(str(args.out / name) for name in written)}")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())

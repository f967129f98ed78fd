"""Pseudo-supervised CBML: train an image-retrieval embedding on cluster ids, without a ground-truth label.

    python examples/pseudo_supervised.py --dataset cub --root /data/CUB_200_2011 --clusters 100 --out runs/cub-pseudo

Every epoch (one pass over the training set): embed every training image with the current network (test-time
transform), cluster the embeddings with :func:`fastcdml.pseudo_labels` (spherical k-means, ``--clusters``
centres, on the training device), then train on batches of ``batch_size / m`` clusters × ``m`` images
(:class:`fastcdml.datasets.MPerClassSampler` over the cluster ids) with training augmentations and the CBML loss
(its defaults, the authors' code's; ``ignore_negative_labels=True``, so a clusterer that marks outliers with a
negative id can replace k-means). The training split's labels are never read: its images are wrapped in a
dataset that yields the current cluster ids instead. Only the evaluation on the class-disjoint test split (every
``--eval-epochs`` epochs and at the end) uses labels, at the dataset's customary K.

Network, optimiser, schedule and augmentation are ``train_retrieval.py``'s CBML recipe (the authors' ResNet-50
config: Adam lr 3e-5, weight decay 5e-4, batch 120 = 15 × 8, lr × 0.1 after 1,200 iterations). ``--clusters``
(default 100) and re-clustering every epoch are choices of this recipe: the CBML paper reports the
pseudo-supervised setting without fixing them. One JSON line per evaluation goes to stdout and
``<out>/log.jsonl``; the values used are written to ``<out>/config.json``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

import fastcdml
from fastcdml import datasets
from fastcdml.evaluation import compute_embeddings

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_retrieval as recipe  # noqa: E402  (the sibling script: model, transforms, evaluation)


class WithLabels(Dataset):
    """``dataset``'s images with ``labels`` (N,) in place of its own (which are not read)."""

    def __init__(self, dataset: Dataset, labels: torch.Tensor):
        self.dataset, self.labels = dataset, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.dataset[i][0], self.labels[i]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=sorted(datasets.LOADERS), required=True)
    p.add_argument("--root", type=Path, required=True, help="local dataset folder (see fastcdml.datasets)")
    p.add_argument("--out", type=Path, default=Path("runs/pseudo"))
    p.add_argument("--clusters", type=int, default=100, help="k-means centres (pseudo classes)")
    p.add_argument("--kmeans-iters", type=int, default=20)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--eval-epochs", type=int, default=5, help="evaluate every this many epochs")
    p.add_argument("--arch", choices=("resnet50", "small"), default="resnet50" if recipe.has_torchvision() else "small")
    p.add_argument("--no-pretrained", action="store_true")
    p.add_argument("--image-size", type=int, default=227)
    cbml = recipe.RECIPES["cbml"]
    p.add_argument("--lr", type=float, default=cbml["lr"])
    p.add_argument("--weight-decay", type=float, default=cbml["weight_decay"])
    p.add_argument("--batch-size", type=int, default=cbml["batch_size"])
    p.add_argument("--m", type=int, default=cbml["m"])
    p.add_argument("--lr-steps", type=int, nargs="+", default=cbml["lr_steps"], help="in iterations")
    p.add_argument("--lr-gamma", type=float, default=0.1)
    p.add_argument("--dim", type=int, default=cbml["dim"])
    p.add_argument("--pooling", choices=recipe.POOLINGS, default=cbml["pooling"])
    p.add_argument("--eval-batch-size", type=int, default=128)
    p.add_argument("--ks", type=int, nargs="+", default=None, help="default: the dataset's customary K")
    p.add_argument("--amp", action="store_true")
    p.add_argument("--backend", default="auto", choices=("auto", "triton", "cpp", "reference"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.ks is None:
        args.ks = recipe.KS[args.dataset]
    return args


def main(argv=None) -> dict:
    """Train for ``epochs`` epochs; returns the last evaluation."""
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    recipe.write_config(args)
    train_images = datasets.load(args.dataset, args.root, "train", recipe.transforms(args.image_size, train=True))
    plain_images = datasets.load(args.dataset, args.root, "train", recipe.transforms(args.image_size, train=False))
    unlabelled = WithLabels(plain_images, torch.zeros(len(plain_images), dtype=torch.int64))  # ids unknown yet
    model = recipe.build_model(args.arch, args.dim, not args.no_pretrained, args.pooling).to(device)
    loss_fn = fastcdml.ContrastiveBayesianLoss(backend=args.backend, ignore_negative_labels=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, args.lr_steps, args.lr_gamma)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp and device.type == "cuda")
    start, record = time.perf_counter(), {}
    with open(args.out / "log.jsonl", "a") as log:
        for epoch in range(args.epochs):
            loader = DataLoader(unlabelled, batch_size=args.eval_batch_size, num_workers=args.workers)
            with torch.autocast(device.type, dtype=recipe.amp_dtype(device), enabled=args.amp):
                embeddings, _ = compute_embeddings(model, loader, device=device)
            pseudo = fastcdml.pseudo_labels(embeddings, args.clusters, seed=args.seed * 1000 + epoch,
                                            iters=args.kmeans_iters).cpu()
            sampler = datasets.MPerClassSampler(pseudo, args.m, args.batch_size, seed=args.seed)
            sampler.set_epoch(epoch)
            train_loader = DataLoader(WithLabels(train_images, pseudo), batch_sampler=sampler,
                                      num_workers=args.workers, pin_memory=device.type == "cuda")
            model.train()
            losses = []
            for images, labels in train_loader:
                losses.append(recipe.train_step(model, loss_fn, optimizer, scaler, scheduler, images, labels, device,
                                                args.amp))
            if (epoch + 1) % args.eval_epochs == 0 or epoch + 1 == args.epochs:
                record = {"epoch": epoch + 1, "loss": sum(losses) / len(losses),
                          "clusters_used": int(pseudo.unique().numel()),
                          "seconds": round(time.perf_counter() - start, 1)} | recipe.evaluate(model, args, device)
                print(json.dumps(record), flush=True)
                log.write(json.dumps(record) + "\n")
    torch.save({"model": model.state_dict(), "args": vars(args)}, args.out / "last.pt")
    return record


if __name__ == "__main__":
    main()

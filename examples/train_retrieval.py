"""Train an image-retrieval embedding with CCL or CBML on CUB-200-2011, Cars196, SOP or In-Shop (local copies).

    python examples/train_retrieval.py --dataset cub --root /data/CUB_200_2011 --loss ccl --out runs/cub-ccl

Recipe: an ImageNet-pretrained ResNet-50 (torchvision; ``--arch small`` or no torchvision: a small conv net from
scratch) with frozen BatchNorm statistics, global average pooling (``--pooling avgmax`` adds max pooling) and a
linear head to ``--dim``; batches of ``batch_size / m`` classes × ``m`` images
(:class:`fastcdml.datasets.MPerClassSampler`); Adam with weight decay and step decay of the learning rate; optional
mixed precision (``--amp``: fp16 with a grad scaler on CUDA, bf16 on CPU); Recall@K / MAP@R on the class-disjoint
test split every ``--eval-every`` iterations (In-Shop: query against gallery) at each dataset's customary K
(:data:`KS`: 1/2/4/8 on CUB and Cars196, 1/10/100/1000 on SOP, 1/10/20/30/40 on In-Shop); ``last.pt`` and
``best.pt`` (by R@1) checkpoints holding the model, the loss state (the CCL center bank), optimizer, scheduler and
scaler; ``--resume`` continues from one. One JSON line per evaluation goes to stdout and ``<out>/log.jsonl``.

Hyper-parameters (:data:`RECIPES`). CBML's follow its authors' current code for ResNet-50 on CUB
(kanshichao/CBML, ``configs/example_resnet50.yaml`` as of 2022-06, with ``cbml_benchmark/config/defaults.py``):
Adam, lr 3e-5 for every parameter, weight decay 5e-4, batch 120 with 8 images per class, 5,000 iterations, lr ×
0.1 at 1,200, no warm-up, average pooling, a 512-d head, resize to 256 then a random resized crop of 227 (scale
0.16–1) with flips, and the loss's defaults, which are their code's (``variance_center="class_means"``, h = 0.2,
φ = log). CCL's are fastcdml's choices, not the paper's; ``docs/spec.md`` (section 1, "Defaults and where they
come from") states them with the loss's defaults. Every value can be overridden on the command line; the values
used are written to ``<out>/config.json``.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

import fastcdml
from fastcdml import datasets
from fastcdml.evaluation import compute_embeddings, retrieval_metrics

RECIPES = {
    "cbml": dict(lr=3e-5, weight_decay=5e-4, batch_size=120, m=8, iters=5000, lr_steps=[1200], dim=512,
                 pooling="avg"),
    "ccl": dict(lr=1e-4, weight_decay=5e-4, batch_size=120, m=4, iters=6000, lr_steps=[3000, 5000], dim=512,
                pooling="avg"),
}
KS = {"cub": [1, 2, 4, 8], "cars": [1, 2, 4, 8], "sop": [1, 10, 100, 1000], "inshop": [1, 10, 20, 30, 40]}
POOLINGS = ("avg", "avgmax")


def has_torchvision() -> bool:
    try:
        import torchvision  # noqa: F401
    except ImportError:
        return False
    return True


class Embedder(nn.Module):
    """``backbone`` feature map (B, C, H, W) → average (``"avg"``) or average + max (``"avgmax"``) pooled (B, C)
    → linear (B, dim)."""

    def __init__(self, backbone: nn.Module, channels: int, dim: int, freeze_bn: bool, pooling: str = "avg"):
        super().__init__()
        self.backbone, self.head, self.freeze_bn, self.pooling = backbone, nn.Linear(channels, dim), freeze_bn, pooling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.backbone(x)
        pooled = f.mean(dim=(2, 3))
        return self.head(pooled + f.amax(dim=(2, 3)) if self.pooling == "avgmax" else pooled)

    def train(self, mode: bool = True):
        super().train(mode)
        if mode and self.freeze_bn:  # keep the pretrained BatchNorm statistics, as DML recipes usually do
            for module in self.backbone.modules():
                if isinstance(module, nn.BatchNorm2d):
                    module.eval()
        return self


def build_model(arch: str, dim: int, pretrained: bool, pooling: str = "avg") -> Embedder:
    if arch == "resnet50":
        import torchvision

        weights = torchvision.models.ResNet50_Weights.IMAGENET1K_V1 if pretrained else None
        net = torchvision.models.resnet50(weights=weights)
        return Embedder(nn.Sequential(*list(net.children())[:-2]), 2048, dim, freeze_bn=pretrained, pooling=pooling)
    width = 32
    backbone = nn.Sequential(
        nn.Conv2d(3, width, 3, stride=2, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
        nn.Conv2d(2 * width, 4 * width, 3, stride=2, padding=1), nn.BatchNorm2d(4 * width), nn.ReLU(),
    )
    return Embedder(backbone, 4 * width, dim, freeze_bn=False, pooling=pooling)


def transforms(size: int, train: bool):
    """torchvision's usual DML augmentation when installed, else :func:`fastcdml.datasets.simple_transform`."""
    if not has_torchvision():
        return datasets.simple_transform(size, train)
    from torchvision import transforms as T

    normalize = [T.ToTensor(), T.Normalize(datasets.IMAGENET_MEAN, datasets.IMAGENET_STD)]
    if train:  # as the CBML authors' code: resize to 256 (for 227), then a random resized crop
        return T.Compose([T.Resize(round(size * 256 / 227)), T.RandomResizedCrop(size, scale=(0.16, 1.0)),
                          T.RandomHorizontalFlip(), *normalize])
    return T.Compose([T.Resize(round(size * 256 / 227)), T.CenterCrop(size), *normalize])


def build_loss(name: str, num_classes: int, dim: int, backend: str) -> nn.Module:
    if name == "ccl":
        return fastcdml.CenterContrastiveLoss(num_classes, dim, backend=backend)
    return fastcdml.ContrastiveBayesianLoss(backend=backend)


def evaluate(model, args, device) -> dict[str, float]:
    def embed(split):
        ds = datasets.load(args.dataset, args.root, split, transforms(args.image_size, train=False))
        loader = DataLoader(ds, batch_size=args.eval_batch_size, num_workers=args.workers)
        with torch.autocast(device.type, dtype=amp_dtype(device), enabled=args.amp):
            return compute_embeddings(model, loader, device=device)

    if args.dataset == "inshop":
        (q, ql), (g, gl) = embed("query"), embed("gallery")
        return retrieval_metrics(q, ql, g, gl, ks=args.ks)
    emb, labels = embed("test")
    return retrieval_metrics(emb, labels, ks=args.ks)


def amp_dtype(device: torch.device) -> torch.dtype:
    return torch.float16 if device.type == "cuda" else torch.bfloat16


def train_step(model, loss_fn, optimizer, scaler, scheduler, images, labels, device, amp: bool) -> float:
    """One optimiser step on a batch (autocast forward, scaled backward, schedule step); returns the loss."""
    images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
    with torch.autocast(device.type, dtype=amp_dtype(device), enabled=amp):
        embeddings = model(images)
    loss = loss_fn(embeddings, labels)  # the losses accumulate in fp32 whatever the embedding dtype
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    return loss.item()


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=sorted(datasets.LOADERS), required=True)
    p.add_argument("--root", type=Path, required=True, help="local dataset folder (see fastcdml.datasets)")
    p.add_argument("--loss", choices=sorted(RECIPES), default="ccl")
    p.add_argument("--out", type=Path, default=Path("runs/retrieval"))
    p.add_argument("--arch", choices=("resnet50", "small"), default="resnet50" if has_torchvision() else "small")
    p.add_argument("--no-pretrained", action="store_true", help="ResNet-50 from scratch (no ImageNet weights)")
    p.add_argument("--image-size", type=int, default=227)
    for key, value in RECIPES["ccl"].items():  # defaults filled from the loss's recipe below
        p.add_argument(f"--{key.replace('_', '-')}", type=type(value) if key != "lr_steps" else int,
                       nargs="+" if key == "lr_steps" else None, default=None, help="default: the --loss recipe",
                       choices=POOLINGS if key == "pooling" else None)
    p.add_argument("--lr-gamma", type=float, default=0.1)
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--eval-batch-size", type=int, default=128)
    p.add_argument("--ks", type=int, nargs="+", default=None, help="default: the dataset's customary K (KS)")
    p.add_argument("--amp", action="store_true", help="mixed precision (fp16 + GradScaler on CUDA, bf16 on CPU)")
    p.add_argument("--backend", default="auto", choices=("auto", "triton", "cpp", "reference"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", type=Path, help="a last.pt / best.pt checkpoint to continue from")
    args = p.parse_args(argv)
    for key, value in RECIPES[args.loss].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.ks is None:
        args.ks = KS[args.dataset]
    return args


def write_config(args: argparse.Namespace) -> None:
    """The run's arguments as ``<out>/config.json`` (paths as strings), creating the folder."""
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "config.json").write_text(json.dumps({k: str(v) if isinstance(v, Path) else v
                                                      for k, v in vars(args).items()}, indent=2))


def main(argv=None) -> dict:
    """Train, evaluating every ``eval_every`` iterations and at the end; returns the best evaluation."""
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    write_config(args)
    train_set = datasets.load(args.dataset, args.root, "train", transforms(args.image_size, train=True))
    sampler = datasets.MPerClassSampler(train_set.labels, args.m, args.batch_size, seed=args.seed)
    loader = DataLoader(train_set, batch_sampler=sampler, num_workers=args.workers, pin_memory=device.type == "cuda")

    model = build_model(args.arch, args.dim, pretrained=not args.no_pretrained, pooling=args.pooling).to(device)
    loss_fn = build_loss(args.loss, train_set.num_classes, args.dim, args.backend).to(device)
    optimizer = torch.optim.Adam([*model.parameters(), *loss_fn.parameters()], lr=args.lr,
                                 weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, args.lr_steps, args.lr_gamma)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp and device.type == "cuda")
    it, best = 0, {"R@1": -math.inf}
    if args.resume:
        state = torch.load(args.resume, map_location=device, weights_only=False)
        for obj, key in ((model, "model"), (loss_fn, "loss"), (optimizer, "optimizer"), (scheduler, "scheduler"),
                         (scaler, "scaler")):
            obj.load_state_dict(state[key])
        it, best = state["iteration"], state["best"]

    def checkpoint(name: str) -> None:
        torch.save({"model": model.state_dict(), "loss": loss_fn.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "iteration": it,
                    "best": best, "args": vars(args)}, args.out / name)

    model.train()
    start, running = time.perf_counter(), []
    with open(args.out / "log.jsonl", "a") as log:
        while it < args.iters:
            sampler.set_epoch(it // len(sampler))
            for images, labels in loader:
                running.append(train_step(model, loss_fn, optimizer, scaler, scheduler, images, labels, device,
                                          args.amp))
                it += 1
                if it % args.eval_every == 0 or it == args.iters:
                    record = {"iteration": it, "loss": sum(running) / len(running), "lr": scheduler.get_last_lr()[0],
                              "seconds": round(time.perf_counter() - start, 1)} | evaluate(model, args, device)
                    running = []
                    print(json.dumps(record), flush=True)
                    log.write(json.dumps(record) + "\n")
                    if record["R@1"] > best["R@1"]:
                        best = record
                        checkpoint("best.pt")
                    checkpoint("last.pt")
                if it >= args.iters:
                    break
    return best


if __name__ == "__main__":
    main()

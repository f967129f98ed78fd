"""Class-disjoint retrieval benchmarks read from a local folder (nothing is downloaded), and an m-per-class
batch sampler.

Layouts (``root`` is the folder named below, or its parent):

* **CUB-200-2011** (``CUB_200_2011/``): ``images.txt`` (``<id> <relative path>``), ``image_class_labels.txt``
  (``<id> <class 1..200>``), images under ``images/``. Train: classes 1–100, test: 101–200.
* **Cars196**, the Kaggle "stanford-car-dataset-by-classes-folder" layout (the one pytorch-metric-learning
  uses; not the devkit ``.mat`` files): ``names.csv`` (one class name per line, line k = class k),
  ``anno_train.csv`` / ``anno_test.csv`` (``<file>,x1,y1,x2,y2,<class 1..196>``, no header) and images at
  ``car_data/car_data/{train,test}/<class name with "/" replaced by "-">/<file>``. Official train and test
  images are pooled; train: classes 1–98, test: 99–196.
* **Stanford Online Products** (``Stanford_Online_Products/``): ``Ebay_train.txt`` and ``Ebay_test.txt``
  (header ``image_id class_id super_class_id path``), paths relative to ``root``. Train: 11,318 classes, test:
  11,316.
* **In-Shop Clothes Retrieval** (DeepFashion): ``list_eval_partition.txt`` (line 1: the count, line 2: the header
  ``image_name item_id evaluation_status``, then ``<img/...jpg> <id_XXXXXXXX> <train|query|gallery>``) next to
  the ``img/`` folder, paths relative to ``root`` (the official archive ships them as ``Eval/`` and ``Img/img/``:
  put the list file beside ``img/``). Splits ``train``, ``query`` and ``gallery``; query and gallery share one
  label map.

Every split's labels are remapped to ``0..C−1`` in increasing order of the original class id (so a loss with
``num_classes=C`` can use them directly); the original ids are in ``dataset.class_ids``.

Images are decoded with Pillow (imported when an image is read). ``transform`` maps the RGB ``PIL.Image`` to
what the model eats; the default :func:`to_tensor` gives a float32 (3, H, W) tensor in [0, 1], so torchvision
is optional (pass its transforms if you have it, or :func:`simple_transform` if not).
"""
from __future__ import annotations

import csv
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

SPLITS = {"cub": ("train", "test"), "cars": ("train", "test"), "sop": ("train", "test"),
          "inshop": ("train", "query", "gallery")}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def to_tensor(image) -> torch.Tensor:
    """A ``PIL.Image`` as a float32 (3, H, W) RGB tensor in [0, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)


def simple_transform(size: int, train: bool = False, generator: torch.Generator | None = None) -> Callable:
    """torchvision-free preprocessing: resize to ``size × size`` (bilinear), a random horizontal flip when
    ``train``, then ImageNet mean/std normalisation. Returns a callable ``PIL.Image -> (3, size, size) float32``."""
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def transform(image):
        from PIL import Image

        x = to_tensor(image.convert("RGB").resize((size, size), Image.BILINEAR))
        if train and torch.rand((), generator=generator) < 0.5:
            x = x.flip(-1)
        return (x - mean) / std

    return transform


class ImageRetrievalDataset(Dataset):
    """``(transform(image), label)`` pairs; ``paths`` (list of Path), ``labels`` (int64 tensor, 0..C−1) and
    ``class_ids`` (original class id of each label) are public."""

    def __init__(self, paths: Sequence[Path], raw_labels: Sequence, transform: Callable | None = None,
                 class_ids: Sequence | None = None):
        if len(paths) != len(raw_labels):
            raise ValueError(f"{len(paths)} paths but {len(raw_labels)} labels")
        self.paths = [Path(p) for p in paths]
        self.class_ids = sorted(set(raw_labels)) if class_ids is None else list(class_ids)
        index = {c: i for i, c in enumerate(self.class_ids)}
        self.labels = torch.tensor([index[c] for c in raw_labels], dtype=torch.int64)
        self.transform = to_tensor if transform is None else transform

    @property
    def num_classes(self) -> int:
        return len(self.class_ids)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from PIL import Image

        with Image.open(self.paths[i]) as image:
            return self.transform(image.convert("RGB")), self.labels[i]


def _find_root(root, marker: str, subfolder: str | None = None) -> Path:
    """``root`` or ``root/subfolder``, whichever holds ``marker``."""
    root = Path(root).expanduser()
    candidates = [root] + ([root / subfolder] if subfolder else [])
    for candidate in candidates:
        if (candidate / marker).is_file():
            return candidate
    raise FileNotFoundError(f"{marker} not found in {' or '.join(map(str, candidates))}; see fastcdml.datasets for "
                            "the expected layout (nothing is downloaded)")


def _check_split(name: str, split: str) -> None:
    if split not in SPLITS[name]:
        raise ValueError(f"split must be one of {SPLITS[name]} for {name}, got {split!r}")


def _rows(path: Path) -> list[list[str]]:
    return [line.split() for line in path.read_text().splitlines() if line.strip()]


def cub200(root, split: str = "train", transform: Callable | None = None) -> ImageRetrievalDataset:
    """CUB-200-2011: train = classes 1–100 (5,864 images), test = classes 101–200 (5,924 images)."""
    _check_split("cub", split)
    root = _find_root(root, "images.txt", "CUB_200_2011")
    paths = dict(_rows(root / "images.txt"))
    labels = {i: int(c) for i, c in _rows(root / "image_class_labels.txt")}
    wanted = range(1, 101) if split == "train" else range(101, 201)
    ids = [i for i in paths if labels[i] in wanted]
    return ImageRetrievalDataset([root / "images" / paths[i] for i in ids], [labels[i] for i in ids], transform)


def cars196(root, split: str = "train", transform: Callable | None = None) -> ImageRetrievalDataset:
    """Cars196 (Kaggle folder layout): train = classes 1–98 (8,054 images), test = classes 99–196 (8,131)."""
    _check_split("cars", split)
    root = _find_root(root, "names.csv", "stanford-car-dataset-by-classes-folder")
    names = [n.strip() for n in (root / "names.csv").read_text().splitlines() if n.strip()]
    wanted = range(1, 99) if split == "train" else range(99, 197)
    paths, labels = [], []
    for official in ("train", "test"):
        with open(root / f"anno_{official}.csv", newline="") as f:
            for row in csv.reader(f):
                if not row:
                    continue
                label = int(row[-1])
                if label in wanted:
                    folder = names[label - 1].replace("/", "-")
                    paths.append(root / "car_data" / "car_data" / official / folder / row[0])
                    labels.append(label)
    return ImageRetrievalDataset(paths, labels, transform)


def stanford_online_products(root, split: str = "train", transform: Callable | None = None) -> ImageRetrievalDataset:
    """Stanford Online Products: train = 59,551 images of 11,318 products, test = 60,502 of 11,316."""
    _check_split("sop", split)
    root = _find_root(root, "Ebay_train.txt", "Stanford_Online_Products")
    rows = _rows(root / f"Ebay_{split}.txt")[1:]
    return ImageRetrievalDataset([root / r[3] for r in rows], [int(r[1]) for r in rows], transform)


def inshop(root, split: str = "train", transform: Callable | None = None) -> ImageRetrievalDataset:
    """In-Shop: train = 25,882 images of 3,997 items; query = 14,218 and gallery = 12,612 images of 3,985 items
    (query and gallery share the label map, so evaluate with ``retrieval_metrics(query, ql, gallery, gl)``)."""
    _check_split("inshop", split)
    root = _find_root(root, "list_eval_partition.txt")
    rows = [r for r in _rows(root / "list_eval_partition.txt")[2:] if len(r) == 3]
    class_ids = None
    if split != "train":
        class_ids = sorted({item for _, item, status in rows if status in ("query", "gallery")})
    rows = [r for r in rows if r[2] == split]
    return ImageRetrievalDataset([root / r[0] for r in rows], [r[1] for r in rows], transform, class_ids)


LOADERS = {"cub": cub200, "cars": cars196, "sop": stanford_online_products, "inshop": inshop}


def load(name: str, root, split: str, transform: Callable | None = None) -> ImageRetrievalDataset:
    """``LOADERS[name](root, split, transform)`` with a clear error for an unknown name."""
    if name not in LOADERS:
        raise ValueError(f"dataset must be one of {sorted(LOADERS)}, got {name!r}")
    return LOADERS[name](root, split, transform)


class MPerClassSampler(Sampler[list[int]]):
    """Batch sampler: each batch holds ``batch_size // m`` distinct classes with ``m`` indices each.

    ``labels``: (N,) int tensor or sequence. Classes are drawn without replacement within a batch; a class with
    fewer than ``m`` samples contributes all of them plus random repeats. An epoch has ``len(labels) //
    batch_size`` batches (at least 1). Deterministic for a given ``seed`` and epoch: call ``set_epoch(e)`` each
    epoch (as with ``DistributedSampler``) to get a new order. Use as ``DataLoader(ds, batch_sampler=sampler)``.
    """

    def __init__(self, labels, m: int, batch_size: int, seed: int = 0):
        labels = torch.as_tensor(labels, dtype=torch.int64)
        if m < 1 or batch_size < m or batch_size % m:
            raise ValueError(f"batch_size must be a positive multiple of m >= 1, got batch_size={batch_size}, m={m}")
        classes, inverse = torch.unique(labels, return_inverse=True)
        self.classes_per_batch = batch_size // m
        if self.classes_per_batch > len(classes):
            raise ValueError(f"batch_size // m = {self.classes_per_batch} classes per batch, but the labels have "
                             f"only {len(classes)} classes")
        order = torch.argsort(inverse, stable=True)
        self.members = list(torch.split(order, torch.bincount(inverse).tolist()))
        self.m, self.batch_size, self.seed, self.epoch = m, batch_size, seed, 0
        self.num_batches = max(1, len(labels) // batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        for _ in range(self.num_batches):
            batch = []
            for c in torch.randperm(len(self.members), generator=g)[: self.classes_per_batch].tolist():
                members = self.members[c]
                if len(members) >= self.m:
                    picked = members[torch.randperm(len(members), generator=g)[: self.m]]
                else:
                    extra = members[torch.randint(len(members), (self.m - len(members),), generator=g)]
                    picked = torch.cat([members, extra])
                batch += picked.tolist()
            yield batch

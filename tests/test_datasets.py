"""Loaders on miniature fixtures written in each benchmark's on-disk layout, and the m-per-class sampler.

Images are tiny PNG/JPEG files written with Pillow; without Pillow the files are empty placeholders and only
the image-decoding tests are skipped (parsing needs no Pillow)."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch

from fastcdml import datasets
from fastcdml.datasets import MPerClassSampler

try:
    from PIL import Image
except ImportError:  # pragma: no cover - depends on the environment
    Image = None

needs_pil = pytest.mark.skipif(Image is None, reason="Pillow is not installed")


def write_image(path: Path, label, size=(6, 5)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if Image is None:
        path.touch()
        return
    shade = (hash(str(label)) % 200, 40, 90)
    Image.new("RGB", size, shade).save(path)  # format from the suffix (.jpg / .png)


def make_cub(root: Path) -> dict[int, int]:
    """Classes at the split boundary (1, 100 | 101, 200) and a few inside; class k has k % 3 + 1 images."""
    base = root / "CUB_200_2011"
    per_class = {c: c % 3 + 1 for c in (1, 2, 57, 100, 101, 150, 200)}
    images, labels, i = [], [], 0
    for c, n in per_class.items():
        for j in range(n):
            i += 1
            rel = f"{c:03d}.Bird_{c}/Bird_{c}_{j}.jpg"
            write_image(base / "images" / rel, c)
            images.append(f"{i} {rel}")
            labels.append(f"{i} {c}")
    (base / "images.txt").write_text("\n".join(images) + "\n")
    (base / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    return per_class


def make_cars(root: Path) -> Counter:
    names = [f"Make{k} Model {2000 + k % 13}" for k in range(1, 197)]
    names[175] = "Ram C/V Cargo Van Minivan 2012"  # class 176 really has a "/" in its name
    (root / "names.csv").write_text("\n".join(names) + "\n")
    counts = Counter()
    for official, classes in (("train", (1, 98, 99, 176)), ("test", (1, 99, 196, 176))):
        rows = []
        for c in classes:
            for j in range(2 if c in (1, 176) else 1):
                name = f"{official}{c:03d}{j}.jpg"
                write_image(root / "car_data" / "car_data" / official / names[c - 1].replace("/", "-") / name, c)
                rows.append(f"{name},1,2,30,40,{c}")
                counts[c] += 1
        (root / f"anno_{official}.csv").write_text("\n".join(rows) + "\n")
    return counts


def make_sop(root: Path) -> None:
    base = root / "Stanford_Online_Products"
    splits = {"train": [(1, 1), (1, 1), (2, 1), (3, 4), (3, 4), (3, 4)], "test": [(11319, 2), (11320, 5), (11320, 5)]}
    image_id = 0
    for split, items in splits.items():
        lines = ["image_id class_id super_class_id path"]
        for class_id, super_id in items:
            image_id += 1
            rel = f"cat{super_id}_final/{class_id}_{image_id}.JPG"
            write_image(base / rel, class_id)
            lines.append(f"{image_id} {class_id} {super_id} {rel}")
        (base / f"Ebay_{split}.txt").write_text("\n".join(lines) + "\n")


def make_inshop(root: Path) -> None:
    rows = [("id_00000001", "train"), ("id_00000001", "train"), ("id_00000002", "train"),
            ("id_00000007", "query"), ("id_00000007", "gallery"), ("id_00000005", "gallery"),
            ("id_00000005", "query"), ("id_00000005", "gallery"), ("id_00000009", "gallery")]
    lines = [str(len(rows)), "image_name item_id evaluation_status"]
    for k, (item, status) in enumerate(rows):
        rel = f"img/WOMEN/Dresses/{item}/{k:02d}_1_front.jpg"
        write_image(root / rel, item)
        lines.append(f"{rel}      {item}      {status}")  # the real file pads with runs of spaces
    (root / "list_eval_partition.txt").write_text("\n".join(lines) + "\n")


def test_cub(tmp_path):
    per_class = make_cub(tmp_path)
    for root in (tmp_path, tmp_path / "CUB_200_2011"):
        train, test = datasets.cub200(root, "train"), datasets.cub200(root, "test")
        assert len(train) == sum(n for c, n in per_class.items() if c <= 100)
        assert len(test) == sum(n for c, n in per_class.items() if c > 100)
        assert train.class_ids == [1, 2, 57, 100] and test.class_ids == [101, 150, 200]
        assert sorted(set(train.labels.tolist())) == [0, 1, 2, 3] and sorted(set(test.labels.tolist())) == [0, 1, 2]
        assert Counter(test.labels.tolist()) == {0: per_class[101], 1: per_class[150], 2: per_class[200]}
        assert all(p.is_file() for p in train.paths + test.paths)


def test_cars_pools_official_splits_and_splits_by_class(tmp_path):
    counts = make_cars(tmp_path)
    train, test = datasets.cars196(tmp_path, "train"), datasets.cars196(tmp_path, "test")
    assert train.class_ids == [1, 98] and test.class_ids == [99, 176, 196]
    assert len(train) == counts[1] + counts[98] == 5 and len(test) == counts[99] + counts[176] + counts[196] == 7
    assert Counter(test.labels.tolist()) == {0: 2, 1: 4, 2: 1}
    assert all(p.is_file() for p in train.paths + test.paths)
    assert any("Ram C-V Cargo Van" in str(p) for p in test.paths)


def test_sop(tmp_path):
    make_sop(tmp_path)
    train = datasets.load("sop", tmp_path, "train")
    test = datasets.stanford_online_products(tmp_path / "Stanford_Online_Products", "test")
    assert len(train) == 6 and train.num_classes == 3 and train.labels.tolist() == [0, 0, 1, 2, 2, 2]
    assert len(test) == 3 and test.class_ids == [11319, 11320] and test.labels.tolist() == [0, 1, 1]
    assert all(p.is_file() for p in train.paths + test.paths)


def test_inshop_query_and_gallery_share_labels(tmp_path):
    make_inshop(tmp_path)
    train, query, gallery = (datasets.inshop(tmp_path, s) for s in ("train", "query", "gallery"))
    assert (len(train), len(query), len(gallery)) == (3, 2, 4)
    assert train.labels.tolist() == [0, 0, 1]
    assert query.class_ids == gallery.class_ids == ["id_00000005", "id_00000007", "id_00000009"]
    assert query.labels.tolist() == [1, 0] and gallery.labels.tolist() == [1, 0, 0, 2]
    assert all(p.is_file() for p in train.paths + query.paths + gallery.paths)


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="images.txt"):
        datasets.cub200(tmp_path)
    with pytest.raises(ValueError, match="split"):
        datasets.inshop(tmp_path, "test")
    with pytest.raises(ValueError, match="dataset must be one of"):
        datasets.load("mnist", tmp_path, "train")


@needs_pil
def test_images_decode_and_batch(tmp_path):
    make_sop(tmp_path)
    raw = datasets.stanford_online_products(tmp_path, "train")
    image, label = raw[3]
    assert image.shape == (3, 5, 6) and image.dtype == torch.float32 and 0 <= image.min() <= image.max() <= 1
    assert label.item() == 2
    ds = datasets.stanford_online_products(tmp_path, "train", transform=datasets.simple_transform(8, train=True))
    loader = torch.utils.data.DataLoader(ds, batch_sampler=MPerClassSampler(ds.labels, m=2, batch_size=4))
    (x, y), = list(loader)
    assert x.shape == (4, 3, 8, 8) and sorted(Counter(y.tolist()).values()) == [2, 2]


def test_sampler_gives_m_per_class_deterministically():
    labels = torch.tensor([0] * 7 + [1] * 3 + [2] * 5 + [3] * 1 + [4] * 9)
    sampler = MPerClassSampler(labels, m=4, batch_size=8, seed=3)
    assert len(sampler) == len(labels) // 8
    batches = list(sampler)
    assert batches == list(sampler)  # same epoch, same batches
    for batch in batches:
        per_class = Counter(labels[batch].tolist())
        assert len(batch) == 8 and len(per_class) == 2 and set(per_class.values()) == {4}
        for c in per_class:  # classes with >= m samples give distinct indices; smaller ones give all of theirs
            picked = [i for i in batch if labels[i] == c]
            assert len(set(picked)) == min(4, int((labels == c).sum()))
    sampler.set_epoch(1)
    assert list(sampler) != batches
    drawn = set()
    for epoch in range(20):
        sampler.set_epoch(epoch)
        for batch in sampler:
            drawn |= set(labels[batch].tolist())
    assert drawn == {0, 1, 2, 3, 4}  # every class gets drawn, the singleton class 3 included


def test_sampler_rejects_impossible_batches():
    with pytest.raises(ValueError, match="multiple of m"):
        MPerClassSampler(torch.zeros(10), m=3, batch_size=8)
    with pytest.raises(ValueError, match="only 2 classes"):
        MPerClassSampler(torch.tensor([0, 1, 1]), m=1, batch_size=3)

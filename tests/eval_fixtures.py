"""Generate tiny benchmark datasets in each standard on-disk layout, with known content.

Every image is a solid colour unique to its sample (so a test can tell which image it got) and every
label is four quadrants of chosen raw values, optionally inside a 1-pixel ring of 255 (VOC's object
boundary). ``FakeDataset`` records what was written, in the raw encoding stored on disk.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

H, W = 16, 24


@dataclass
class FakeDataset:
    root: Path  # what to hand to load_dataset
    ids: list[str] = field(default_factory=list)
    colors: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    raw_labels: dict[str, np.ndarray] = field(default_factory=dict)
    image_paths: dict[str, Path] = field(default_factory=dict)
    label_paths: dict[str, Path] = field(default_factory=dict)

    def add(
        self, sid: str, image_path: Path, label_path: Path, raw: np.ndarray, *, palette: bool = False
    ) -> None:
        color = color_for(len(self.ids))
        write_image(image_path, color)
        write_label(label_path, raw, palette=palette)
        self.ids.append(sid)
        self.colors[sid] = color
        self.raw_labels[sid] = raw
        self.image_paths[sid] = image_path
        self.label_paths[sid] = label_path


def color_for(index: int) -> tuple[int, int, int]:
    # Far apart in every channel so JPEG rounding cannot make two samples look alike.
    return (30 + 60 * index, 200 - 50 * index, 90 + 40 * (index % 2))


def quadrant_label(values: tuple[int, int, int, int], border: int | None = None) -> np.ndarray:
    """uint8 [H, W]: top-left, top-right, bottom-left, bottom-right quadrants, optional 1-px ring."""
    label = np.empty((H, W), dtype=np.uint8)
    label[: H // 2, : W // 2], label[: H // 2, W // 2 :] = values[0], values[1]
    label[H // 2 :, : W // 2], label[H // 2 :, W // 2 :] = values[2], values[3]
    if border is not None:
        label[[0, -1], :] = border
        label[:, [0, -1]] = border
    return label


def write_image(path: Path, color: tuple[int, int, int], size: tuple[int, int] = (W, H)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", size, color)
    if path.suffix == ".jpg":
        image.save(path, quality=95)
    else:
        image.save(path)


def write_label(path: Path, raw: np.ndarray, *, palette: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(raw)  # uint8 [H, W] -> mode L
    if palette:  # VOC ships indexed PNGs whose palette colours differ from their index values
        image.putpalette(voc_palette())  # L -> P, pixel values kept as palette indices
    image.save(path)


def voc_palette() -> list[int]:
    """The standard PASCAL VOC colour map (bit-interleaved), 256 RGB triples flattened."""
    palette = []
    for index in range(256):
        r = g = b = 0
        c = index
        for shift in range(7, -1, -1):
            r |= (c & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        palette += [r, g, b]
    return palette


def write_garbage(path: Path) -> None:
    path.write_bytes(b"this is not an image file\n" * 4)


def truncate(path: Path) -> None:
    """Keep the header but cut the pixel data: opens fine, fails to decode."""
    data = path.read_bytes()
    path.write_bytes(data[: max(len(data) // 2, 64)])


def make_voc(tmp: Path, *, n: int = 3, split: str = "val", point_at: str = "parent") -> FakeDataset:
    """VOCdevkit/VOC2012 with JPEGImages, palette SegmentationClass PNGs and a split file.

    ``point_at``: which folder ``root`` names: "parent" (holds VOCdevkit), "devkit" or "year".
    """
    year = tmp / "VOCdevkit" / "VOC2012"
    root = {"parent": tmp, "devkit": tmp / "VOCdevkit", "year": year}[point_at]
    ds = FakeDataset(root)
    for i in range(n):
        sid = f"2007_00{i:04d}"
        raw = quadrant_label((0, 1 + i, 20 - i, 15), border=255)
        ds.add(
            sid,
            year / "JPEGImages" / f"{sid}.jpg",
            year / "SegmentationClass" / f"{sid}.png",
            raw,
            palette=True,
        )
    _write_split(year / "ImageSets" / "Segmentation" / f"{split}.txt", ds.ids)
    _write_split(year / "ImageSets" / "Segmentation" / "train.txt", ["2008_999999"])  # never read
    return ds


def make_context(tmp: Path, *, n: int = 3, split: str = "val") -> FakeDataset:
    """mmseg-converted PASCAL Context: VOCdevkit/VOC2010 with SegmentationClassContext (0..59)."""
    year = tmp / "VOCdevkit" / "VOC2010"
    ds = FakeDataset(tmp / "VOCdevkit")
    for i in range(n):
        sid = f"2008_00{i:04d}"
        raw = quadrant_label((0, 1 + i, 59 - i, 30))
        ds.add(sid, year / "JPEGImages" / f"{sid}.jpg", year / "SegmentationClassContext" / f"{sid}.png", raw)
    _write_split(year / "ImageSets" / "SegmentationContext" / f"{split}.txt", ds.ids)
    return ds


def make_coco_object(tmp: Path, *, n: int = 3, container: str = "") -> FakeDataset:
    """GroupViT COCO-Object: images/val2017/<id>.jpg + annotations/val2017/<id>_instanceTrainIds.png.

    ``container`` nests the tree one folder down (e.g. "coco_stuff164k"); root stays ``tmp``.
    """
    base = tmp / container if container else tmp
    ds = FakeDataset(tmp)
    for i in range(n):
        sid = f"{139 + 100 * i:012d}"
        raw = quadrant_label((0, 1 + i, 80 - i, 40))
        ds.add(
            sid,
            base / "images" / "val2017" / f"{sid}.jpg",
            base / "annotations" / "val2017" / f"{sid}_instanceTrainIds.png",
            raw,
        )
    return ds


def make_ade20k(tmp: Path, *, n: int = 3, point_at_challenge_dir: bool = False) -> FakeDataset:
    """ADEChallengeData2016/{images,annotations}/validation with raw ids 0..150 (0 = other)."""
    base = tmp / "ADEChallengeData2016"
    ds = FakeDataset(base if point_at_challenge_dir else tmp)
    for i in range(n):
        sid = f"ADE_val_{i + 1:08d}"
        raw = quadrant_label((0, 1 + i, 150 - i, 75))
        ds.add(
            sid,
            base / "images" / "validation" / f"{sid}.jpg",
            base / "annotations" / "validation" / f"{sid}.png",
            raw,
        )
    return ds


def make_cityscapes(
    tmp: Path, *, cities: tuple[str, ...] = ("aachen", "bochum"), per_city: int = 1, split: str = "val"
) -> FakeDataset:
    """leftImg8bit/<split>/<city>/*_leftImg8bit.png + gtFine/.../*_gtFine_labelTrainIds.png (0..18, 255)."""
    ds = FakeDataset(tmp)
    for city in cities:
        for j in range(per_city):
            sid = f"{city}_000000_{19 + j:06d}"
            i = len(ds.ids)
            raw = quadrant_label((0, 1 + i, 18 - i, 255))
            ds.add(
                sid,
                tmp / "leftImg8bit" / split / city / f"{sid}_leftImg8bit.png",
                tmp / "gtFine" / split / city / f"{sid}_gtFine_labelTrainIds.png",
                raw,
            )
    return ds


def _write_split(path: Path, ids: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{i}\n" for i in ids))


SHAPES_CLASSES = ("background", "red square", "blue circle", "green triangle")


def shapes_folder(root: Path) -> Path:
    """A ``folder`` dataset in ``root``: 3 images of different sizes, labels with an ignore border."""
    (root / "images").mkdir()
    (root / "labels").mkdir()
    (root / "classes.txt").write_text("\n".join(SHAPES_CLASSES) + "\n")
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(24, 32), (20, 20), (28, 36)]):
        label = np.zeros((h, w), dtype=np.uint8)
        label[2:10, 3:12] = 1
        label[h - 10 : h - 2, w - 12 : w - 2] = 2 if i != 1 else 3
        label[0, :] = 255
        img = (rng.random((h, w, 3)) * 60).astype(np.uint8)
        img[label == 1] = (220, 30, 30)
        img[label == 2] = (30, 30, 220)
        img[label == 3] = (30, 220, 30)
        Image.fromarray(img).save(root / "images" / f"s{i}.png")
        Image.fromarray(label).save(root / "labels" / f"s{i}.png")
    return root


def recompute_miou(folder: Path, out: Path, num_classes: int = len(SHAPES_CLASSES)) -> float:
    """mIoU from the saved prediction PNGs against the label files, counted with numpy only."""
    conf = np.zeros((num_classes, num_classes), dtype=np.int64)
    preds = sorted((out / "predictions").glob("*.png"))
    assert preds
    for path in preds:
        pred = np.asarray(Image.open(path)).astype(np.int64)
        gt = np.asarray(Image.open(folder / "labels" / path.name)).astype(np.int64)
        keep = gt != 255
        np.add.at(conf, (gt[keep], pred[keep]), 1)
    tp = np.diag(conf)
    union = conf.sum(0) + conf.sum(1) - tp
    return float(np.mean(tp[union > 0] / union[union > 0]))


def one_and_two_processes(args: list[str], one: Path, two: Path, timeout: int = 300) -> None:
    """Run ``python ARGS --out ONE``, then the same under ``torchrun --standalone --nproc-per-node=2``
    with ``--out TWO``; each must exit 0. One thread per process, so both runs sum their floats in
    the same order."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    for cmd in ([sys.executable, *args, "--out", str(one)], [*torchrun, *args, "--out", str(two)]):
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        assert res.returncode == 0, res.stderr[-3000:]

"""Where each benchmark's files are on disk: the layouts ``load_dataset`` reads (``LAYOUTS``) and,
for each, the (sample id, image, label) of every sample of a split, checked to exist.

The layouts are those mmsegmentation's dataset preparation guide
(docs/en/user_guides/2_dataset_prepare.md) produces, plus GroupViT's COCO-Object conversion.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from lava.errors import LavaError

Pairs = list[tuple[str, Path, Path]]  # (sample id, image path, label path)

LAYOUTS: dict[str, str] = {
    "voc": "ROOT/JPEGImages/<id>.jpg, ROOT/SegmentationClass/<id>.png (palette PNG of ids 0..20, "
    "255 = ignore), ids in ROOT/ImageSets/Segmentation/<split>.txt; ROOT may be VOCdevkit/VOC2012, "
    "VOCdevkit/ or its parent",
    "context": "ROOT/JPEGImages/<id>.jpg, ROOT/SegmentationClassContext/<id>.png (mmseg's converted "
    "labels: 0 = background, 1..59 = classes), ids in ROOT/ImageSets/SegmentationContext/<split>.txt; "
    "ROOT may be VOCdevkit/VOC2010, VOCdevkit/ or its parent",
    "coco_object": "ROOT/images/val2017/<id>.jpg, ROOT/annotations/val2017/<id>_instanceTrainIds.png "
    "(GroupViT's convert_coco_object.py output: 0 = background, 1..80 = things); ROOT is the "
    "COCO-Stuff-164k root, or a folder holding it as coco_object/, coco_stuff164k/ or coco/",
    "ade20k": "ROOT/images/validation/<id>.jpg, ROOT/annotations/validation/<id>.png (0 = other, "
    "1..150 = classes); ROOT is ADEChallengeData2016 or a folder holding it (directly or as ade/...)",
    "folder": "ROOT/classes.txt (one class name per line, in label-id order; a class named "
    "'background' is scored as background), ROOT/images/<id>.png|.jpg, ROOT/labels/<id>.png (class "
    "ids, 255 = ignore; with more than 255 classes 16-bit PNGs, 65535 = ignore); optional "
    "ROOT/<split>.txt lists the ids (required when a split is named), else "
    "every image is used",
    "cityscapes": "ROOT/leftImg8bit/val/<city>/<id>_leftImg8bit.png, "
    "ROOT/gtFine/val/<city>/<id>_gtFine_labelTrainIds.png (train ids 0..18, 255 = ignore); ROOT is the "
    "Cityscapes root or a folder holding it as cityscapes/",
}


class DatasetError(LavaError):
    """A dataset is missing, incomplete, unreadable or not in the expected layout (a ValueError)."""


def _find_base(root: Path, candidates: Sequence[str], marker: str, layout: str) -> Path:
    """The first ``root/candidate`` that contains ``marker``, so users may point at any level."""
    if not root.exists():
        raise DatasetError(f"dataset root does not exist: {root}")
    for candidate in candidates:
        base = root / candidate if candidate else root
        if (base / marker).is_dir():
            return base
    tried = ", ".join(str((root / c if c else root) / marker) for c in candidates)
    raise DatasetError(
        f"no {marker}/ folder found under {root} (looked for {tried}); expected layout: {layout}"
    )


def ids_from_split_file(split_file: Path, layout: str) -> list[str]:
    if not split_file.is_file():
        available = sorted(p.stem for p in split_file.parent.glob("*.txt"))
        raise DatasetError(
            f"split file is missing: {split_file} (splits present: {available or 'none'}); "
            f"expected layout: {layout}"
        )
    ids = [line.strip() for line in split_file.read_text().splitlines() if line.strip()]
    if not ids:
        raise DatasetError(f"split file lists no ids: {split_file}")
    return ids


def check_all_exist(pairs: Pairs, layout: str, hint: Callable[[Path], str]) -> None:
    # Checked up front so a long evaluation cannot die (or silently shrink) half-way through.
    for kind, index in (("image", 1), ("label", 2)):
        missing = [pair[index] for pair in pairs if not pair[index].is_file()]
        if missing:
            extra = hint(missing[0]) if kind == "label" else ""
            raise DatasetError(
                f"{kind} file is missing: {missing[0]} ({len(missing)} of {len(pairs)} {kind}s missing)"
                f"{extra}; expected layout: {layout}"
            )


def no_hint(_: Path) -> str:
    return ""


def _split_dir(split: str, aliases: dict[str, str], dataset: str) -> str:
    if split not in aliases:
        raise DatasetError(f"{dataset}: unknown split {split!r}; expected one of {sorted(aliases)}")
    return aliases[split]


# Each Pascal layout: the folder of its year, its ImageSets/ subfolder and its label folder.
PASCAL = {
    "voc": ("VOC2012", "Segmentation", "SegmentationClass"),
    "context": ("VOC2010", "SegmentationContext", "SegmentationClassContext"),
}


def _list_pascal(name: str, root: Path, split: str) -> tuple[Path, Pairs]:
    year_dir, image_sets, label_dir = PASCAL[name]
    layout = LAYOUTS[name]
    base = _find_base(root, ("", year_dir, f"VOCdevkit/{year_dir}"), f"ImageSets/{image_sets}", layout)
    ids = ids_from_split_file(base / "ImageSets" / image_sets / f"{split}.txt", layout)
    pairs = [(i, base / "JPEGImages" / f"{i}.jpg", base / label_dir / f"{i}.png") for i in ids]
    check_all_exist(pairs, layout, no_hint)
    return base, pairs


def list_voc(root: Path, split: str) -> tuple[Path, Pairs]:
    return _list_pascal("voc", root, split)


def list_context(root: Path, split: str) -> tuple[Path, Pairs]:
    return _list_pascal("context", root, split)


def _jpg_images(
    name: str, root: Path, split: str, splits: dict[str, str], candidates: Sequence[str]
) -> tuple[Path, str, list[Path]]:
    """``(base, split folder, images)`` of a layout of ``base/images/<split folder>/*.jpg``
    (``splits``: the split names it accepts, each to its folder)."""
    layout = LAYOUTS[name]
    sub = _split_dir(split, splits, name)
    base = _find_base(root, candidates, f"images/{sub}", layout)
    images = sorted((base / "images" / sub).glob("*.jpg"))
    if not images:
        raise DatasetError(f"no .jpg images in {base / 'images' / sub}; expected layout: {layout}")
    return base, sub, images


def list_coco_object(root: Path, split: str) -> tuple[Path, Pairs]:
    splits = {"val": "val2017", "val2017": "val2017", "train": "train2017", "train2017": "train2017"}
    candidates = ("", "coco_object", "coco_stuff164k", "coco")
    base, sub, images = _jpg_images("coco_object", root, split, splits, candidates)
    labels = base / "annotations" / sub
    pairs = [(p.stem, p, labels / f"{p.stem}_instanceTrainIds.png") for p in images]

    def hint(missing: Path) -> str:
        stem = missing.name.removesuffix("_instanceTrainIds.png")
        stuff_labels = (missing.parent / f"{stem}_labelTrainIds.png", missing.parent / f"{stem}.png")
        if any(p.is_file() for p in stuff_labels):
            return (
                " (COCO-Stuff labels are present: convert them to COCO-Object with GroupViT's "
                "convert_dataset/convert_coco_object.py)"
            )
        return ""

    check_all_exist(pairs, LAYOUTS["coco_object"], hint)
    return base, pairs


def list_ade20k(root: Path, split: str) -> tuple[Path, Pairs]:
    splits = {"val": "validation", "validation": "validation", "train": "training", "training": "training"}
    candidates = ("", "ADEChallengeData2016", "ade/ADEChallengeData2016")
    base, sub, images = _jpg_images("ade20k", root, split, splits, candidates)
    pairs = [(p.stem, p, base / "annotations" / sub / f"{p.stem}.png") for p in images]
    check_all_exist(pairs, LAYOUTS["ade20k"], no_hint)
    return base, pairs


def list_cityscapes(root: Path, split: str) -> tuple[Path, Pairs]:
    layout = LAYOUTS["cityscapes"]
    base = _find_base(root, ("", "cityscapes"), f"leftImg8bit/{split}", layout)
    images = sorted((base / "leftImg8bit" / split).glob("*/*_leftImg8bit.png"))
    if not images:
        raise DatasetError(
            f"no <city>/*_leftImg8bit.png images in {base / 'leftImg8bit' / split}; expected layout: {layout}"
        )
    pairs: Pairs = []
    for path in images:
        stem = path.name.removesuffix("_leftImg8bit.png")
        label = base / "gtFine" / split / path.parent.name / f"{stem}_gtFine_labelTrainIds.png"
        pairs.append((stem, path, label))

    def hint(missing: Path) -> str:
        if missing.with_name(missing.name.replace("labelTrainIds", "labelIds")).is_file():
            return (
                " (only *_gtFine_labelIds.png found: create train-id labels with cityscapesScripts' "
                "createTrainIdLabelImgs or mmseg's tools/dataset_converters/cityscapes.py)"
            )
        return ""

    check_all_exist(pairs, layout, hint)
    return base, pairs

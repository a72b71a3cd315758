"""Readers for the on-disk layouts of the standard open-vocabulary segmentation benchmarks.

Nothing is downloaded or converted: each reader expects the layout that mmsegmentation's dataset
preparation guide (docs/en/user_guides/2_dataset_prepare.md) produces, plus GroupViT's COCO-Object
conversion. ``LAYOUTS`` spells out each one. Every missing, unreadable or inconsistent file raises
:class:`DatasetError` naming the file; no sample is ever skipped.

Labels come back as ``uint8`` arrays of shape ``[H, W]`` holding dataset label ids ``0..C-1``, with
``255`` meaning "ignore" (already mapped: e.g. reduce-zero-label is applied for ADE20K); a folder
dataset of more than 255 classes gives ``int32`` arrays with ``65535`` meaning "ignore".
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import overload

import numpy as np
from PIL import Image

from lava.evaluation import classnames as cn
from lava.evaluation.layouts import (
    LAYOUTS,
    DatasetError,
    Pairs,
    check_all_exist,
    ids_from_split_file,
    list_ade20k,
    list_cityscapes,
    list_coco_object,
    list_context,
    list_voc,
    no_hint,
)

IGNORE_INDEX = 255
# A folder dataset of more classes than ids 0..254 stores 16-bit label PNGs (as lava writes them):
WIDE_IGNORE_INDEX = 65535


@dataclass(frozen=True)
class DatasetInfo:
    """What an evaluation needs to know about a dataset, independent of where it lives on disk.

    ``classes[k]`` names label id ``k`` (the dataset's own spelling, used as metric keys);
    ``prompt_names[k]`` is the same class worded for a text model. ``background`` is the label id of
    the background class when the benchmark scores one, else ``None``.
    """

    name: str
    classes: tuple[str, ...]
    prompt_names: tuple[str, ...]
    ignore_index: int = IGNORE_INDEX
    background: int | None = None

    def __post_init__(self) -> None:
        if len(self.classes) != len(self.prompt_names):
            raise ValueError(
                f"{self.name}: {len(self.classes)} classes but {len(self.prompt_names)} prompt names"
            )
        if self.background is not None and not 0 <= self.background < len(self.classes):
            raise ValueError(f"{self.name}: background id {self.background} is not a class id")
        if 0 <= self.ignore_index < len(self.classes):
            raise ValueError(f"{self.name}: ignore_index {self.ignore_index} collides with a class id")

    @property
    def num_classes(self) -> int:
        return len(self.classes)


@dataclass(frozen=True)
class Sample:
    """One image/label pair. Nothing is read until ``image``, ``label`` or ``load()`` is used.

    ``raw_to_label`` is a table from the value stored in the label file to the dataset label id
    (or the ignore id); ``-1`` marks values the dataset's encoding never uses. It has 256 entries
    (8-bit labels) or, for a folder dataset of more than 255 classes, 65536 (16-bit labels).
    """

    id: str
    image_path: Path
    label_path: Path
    raw_to_label: np.ndarray = field(repr=False, compare=False)

    @property
    def image(self) -> Image.Image:
        """The image as PIL RGB; raises DatasetError if unreadable or sized unlike the label."""
        image = _read_image(self.image_path)
        self._check_sizes(image.size, _read_size(self.label_path, "label"))
        return image

    @property
    def label(self) -> np.ndarray:
        """Label ids ``[H, W]`` (uint8 with 255 = ignore; int32 with 65535 = ignore for a folder of
        more than 255 classes); checked against the image's size."""
        label = _read_label(self.label_path, self.raw_to_label)
        self._check_sizes(_read_size(self.image_path, "image"), (label.shape[1], label.shape[0]))
        return label

    def load(self) -> tuple[Image.Image, np.ndarray]:
        """Read both files once: (PIL RGB image of size (W, H), label ``[H, W]`` as ``label``)."""
        image = _read_image(self.image_path)
        label = _read_label(self.label_path, self.raw_to_label)
        self._check_sizes(image.size, (label.shape[1], label.shape[0]))
        return image, label

    def _check_sizes(self, image_size: tuple[int, int], label_size: tuple[int, int]) -> None:
        if image_size != label_size:
            raise DatasetError(
                f"sample {self.id!r}: image {self.image_path} is {image_size[0]}x{image_size[1]} (WxH) "
                f"but label {self.label_path} is {label_size[0]}x{label_size[1]}"
            )


class SegmentationDataset(Sequence[Sample]):
    """An ordered, indexable list of :class:`Sample` with the dataset's :class:`DatasetInfo`.

    Slicing returns a smaller ``SegmentationDataset`` (handy for evaluating a prefix).
    """

    def __init__(self, info: DatasetInfo, samples: Sequence[Sample], root: Path | None = None) -> None:
        self._info = info
        self._samples = tuple(samples)
        self.root = root

    @property
    def info(self) -> DatasetInfo:
        return self._info

    def __len__(self) -> int:
        return len(self._samples)

    @overload
    def __getitem__(self, index: int) -> Sample: ...

    @overload
    def __getitem__(self, index: slice) -> SegmentationDataset: ...

    def __getitem__(self, index: int | slice) -> Sample | SegmentationDataset:
        if isinstance(index, slice):
            return SegmentationDataset(self._info, self._samples[index], self.root)
        return self._samples[index]

    def __repr__(self) -> str:
        return f"SegmentationDataset({self._info.name!r}, {len(self)} samples, root={self.root})"


# ---------------------------------------------------------------------------------------------
# File reading


def _read_image(path: Path) -> Image.Image:
    # EXIF orientation is deliberately not applied: labels are drawn on the stored pixel grid.
    with _open(path, "image") as image:
        try:
            return image.convert("RGB")
        except (OSError, ValueError, SyntaxError) as exc:  # truncated / undecodable pixel data
            raise DatasetError(f"cannot decode image {path}: {exc}") from exc


def _read_size(path: Path, what: str) -> tuple[int, int]:
    with _open(path, what) as image:
        return image.size


def _open(path: Path, what: str) -> Image.Image:
    if not path.is_file():
        raise DatasetError(f"{what} file is missing: {path}")
    try:
        return Image.open(path)
    except (OSError, ValueError, SyntaxError) as exc:  # PIL raises all three for bad files
        raise DatasetError(f"cannot read {what} {path}: {exc}") from exc


def _read_label(path: Path, raw_to_label: np.ndarray) -> np.ndarray:
    with _open(path, "label") as image:
        # P (palette, e.g. VOC), L and 16-bit grayscale (I;16, lava's maps of more than 256
        # labels) hold ids directly; RGB/RGBA would be a colourised visualisation, which cannot be
        # turned back into ids safely.
        if image.mode not in ("P", "L", "I", "I;16", "I;16B", "I;16L"):
            raise DatasetError(
                f"label {path} has PIL mode {image.mode!r}; expected a single-channel PNG of class "
                "ids (mode P, L or 16-bit I;16), not a colour visualisation"
            )
        try:
            raw = np.asarray(image)
        except (OSError, ValueError, SyntaxError) as exc:
            raise DatasetError(f"cannot decode label {path}: {exc}") from exc
    if raw.ndim != 2:
        raise DatasetError(f"label {path} has shape {raw.shape}; expected [H, W]")
    top = len(raw_to_label) - 1
    if raw.dtype != np.uint8:
        if raw.size and (raw.min() < 0 or raw.max() > top):
            low, high = raw.min(), raw.max()
            raise DatasetError(f"label {path} holds values outside 0..{top} (min {low}, max {high})")
        raw = raw.astype(np.uint8 if top <= 255 else np.int64)
    mapped = raw_to_label[raw]
    unexpected = mapped < 0
    if unexpected.any():
        values = np.unique(raw[unexpected])
        raise DatasetError(
            f"label {path} holds values {values[:10].tolist()} that this dataset's encoding never uses "
            f"(expected {_describe_valid(raw_to_label)}); is it the right dataset or conversion?"
        )
    return mapped.astype(np.uint8 if top <= 255 else np.int32)


def _describe_valid(raw_to_label: np.ndarray) -> str:
    valid = np.flatnonzero(raw_to_label >= 0).tolist()
    runs: list[str] = []
    start = prev = valid[0]
    for value in [*valid[1:], None]:
        if value is not None and value == prev + 1:
            prev = value
            continue
        runs.append(str(start) if start == prev else f"{start}..{prev}")
        if value is not None:
            start = prev = value
    return ", ".join(runs)


# ---------------------------------------------------------------------------------------------
# Label encodings: raw value in the file -> dataset label id


def _identity_table(num_classes: int, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    table = np.full(ignore_index + 1, -1, dtype=np.int16 if ignore_index <= 255 else np.int32)
    table[:num_classes] = np.arange(num_classes)
    table[ignore_index] = ignore_index
    return table


def _reduce_zero_table(num_classes: int) -> np.ndarray:
    # mmseg's reduce_zero_label: 0 (unlabelled / background not scored) -> ignore, k -> k - 1.
    table = np.full(256, -1, dtype=np.int16)
    table[0] = IGNORE_INDEX
    table[1 : num_classes + 1] = np.arange(num_classes)
    table[IGNORE_INDEX] = IGNORE_INDEX
    return table


# ---------------------------------------------------------------------------------------------
# Registry


@dataclass(frozen=True)
class _Spec:
    info: DatasetInfo
    lister: Callable[[Path, str], tuple[Path, Pairs]]
    raw_to_label: np.ndarray = field(repr=False, compare=False)


def _info(name: str, classes: tuple[str, ...], background: int | None) -> DatasetInfo:
    return DatasetInfo(name, classes, cn.prompt_names(classes), IGNORE_INDEX, background)


_SPECS: dict[str, _Spec] = {
    "voc21": _Spec(_info("voc21", cn.VOC21_CLASSES, 0), list_voc, _identity_table(21)),
    # VOC20 scores the 20 objects only: background pixels are ignored, ids shift down by one.
    "voc20": _Spec(_info("voc20", cn.VOC20_CLASSES, None), list_voc, _reduce_zero_table(20)),
    "context59": _Spec(_info("context59", cn.CONTEXT59_CLASSES, None), list_context, _reduce_zero_table(59)),
    "context60": _Spec(_info("context60", cn.CONTEXT60_CLASSES, 0), list_context, _identity_table(60)),
    "coco_object": _Spec(
        _info("coco_object", cn.COCO_OBJECT_CLASSES, 0), list_coco_object, _identity_table(81)
    ),
    # COCO-Object without background (Seg4Diff's coco_2017_test_object_wo_bg): the 80 things only,
    # background pixels ignored, ids shift down by one (as voc20 is to voc21).
    "coco_object80": _Spec(
        _info("coco_object80", cn.COCO_OBJECT_CLASSES[1:], None), list_coco_object, _reduce_zero_table(80)
    ),
    # ADE20K's 0 is "other objects", never scored (mmseg fixes reduce_zero_label=True).
    "ade20k": _Spec(_info("ade20k", cn.ADE20K_CLASSES, None), list_ade20k, _reduce_zero_table(150)),
    "cityscapes": _Spec(
        _info("cityscapes", cn.CITYSCAPES_CLASSES, None), list_cityscapes, _identity_table(19)
    ),
}
_ALIASES = {"voc": "voc21", "ade": "ade20k", "ade150": "ade20k", "coco-object": "coco_object"}

DATASET_NAMES: tuple[str, ...] = tuple(sorted([*_SPECS, "voc", "folder"]))


def _spec(name: str) -> _Spec:
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in _SPECS:
        raise DatasetError(f"unknown dataset {name!r}; known: {', '.join(DATASET_NAMES)}")
    return _SPECS[key]


def dataset_info(name: str) -> DatasetInfo:
    """Class names, prompt names and ids of a dataset, without touching the disk."""
    return _spec(name).info


def load_dataset(name: str, root: str | Path, split: str | None = None) -> SegmentationDataset:
    """Index a dataset in its standard layout (see ``LAYOUTS``) without reading any pixels.

    ``split`` defaults to ``"val"``; for the ``folder`` layout, to ``ROOT/val.txt`` when it exists
    and every image otherwise, while a split named explicitly must have its ``ROOT/<split>.txt``.
    Every listed image and label must exist; a missing one raises :class:`DatasetError` naming it.
    """
    if name.lower() == "folder":
        return _load_folder(Path(root).expanduser(), split)
    if split is None:
        split = "val"
    spec = _spec(name)
    base, pairs = spec.lister(Path(root).expanduser(), split)
    samples = [Sample(sid, image, label, spec.raw_to_label) for sid, image, label in pairs]
    return SegmentationDataset(spec.info, samples, base)


def _load_folder(root: Path, split: str | None) -> SegmentationDataset:
    """A user's own dataset: ``classes.txt``, ``images/`` and ``labels/`` (see ``LAYOUTS["folder"]``)."""
    layout = LAYOUTS["folder"]
    names_file = root / "classes.txt"
    if not names_file.is_file():
        raise DatasetError(f"missing {names_file}; expected layout: {layout}")
    classes = tuple(line.strip() for line in names_file.read_text().splitlines() if line.strip())
    if not classes or len(classes) > WIDE_IGNORE_INDEX:
        raise DatasetError(
            f"{names_file} must name 1..{WIDE_IGNORE_INDEX} classes, one per line; it names {len(classes)}"
        )
    # ids 0..254 and 255 = ignore fit 8-bit label PNGs; more classes need 16-bit ones
    ignore = IGNORE_INDEX if len(classes) <= IGNORE_INDEX else WIDE_IGNORE_INDEX
    split_file = root / f"{split or 'val'}.txt"
    if split_file.is_file():
        ids = ids_from_split_file(split_file, layout)
    elif split is not None:
        # Asked for by name: falling back to every image would evaluate on the wrong images.
        present = sorted(p.stem for p in root.glob("*.txt") if p.name != "classes.txt")
        raise DatasetError(
            f"split {split!r} asked for, but {split_file} is missing (split files present: "
            f"{present or 'none'}); leave --split out to use every image, or list the ids in {split_file}"
        )
    else:
        ids = sorted(p.stem for p in (root / "labels").glob("*.png"))
        if not ids:
            raise DatasetError(f"no label PNGs in {root / 'labels'}; expected layout: {layout}")
    pairs: Pairs = []
    for sid in ids:
        found = [root / "images" / f"{sid}{ext}" for ext in (".png", ".jpg", ".jpeg")]
        image = next((p for p in found if p.is_file()), found[0])
        pairs.append((sid, image, root / "labels" / f"{sid}.png"))
    check_all_exist(pairs, layout, no_hint)
    background = classes.index("background") if "background" in classes else None
    info = DatasetInfo(f"folder:{root.name}", classes, cn.prompt_names(classes), ignore, background)
    table = _identity_table(len(classes), ignore)
    return SegmentationDataset(info, [Sample(sid, i, lab, table) for sid, i, lab in pairs], root)

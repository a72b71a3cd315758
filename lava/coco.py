"""Label maps as COCO instance annotations with RLE masks, written by lava itself (no pycocotools).

One category per class (ids ``1 … C`` in class order; the ``"background"`` label a background
threshold adds is no category), one annotation per class present in an image: its pixels as a
compressed RLE (the ``counts`` string ``pycocotools.mask.encode`` writes: run lengths over the
column-major mask starting with a run of zeros, each coded in 5-bit groups), ``area`` (pixels),
``bbox`` ``[x, y, w, h]`` and ``iscrowd`` 0: a class region is one annotation, as COCO-Stuff stores
its RLE masks (``iscrowd`` 1 would make COCO's evaluation ignore it). ``Segmentation.to_coco``
and ``lava segment --format coco`` use ``CocoBuilder``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .errors import LavaError


def rle_counts(mask: np.ndarray) -> list[int]:
    """Run lengths of a 2-D mask read column by column (Fortran order), the first run of zeros
    (0 when the first pixel is set)."""
    flat = np.asarray(mask, dtype=bool).ravel(order="F")
    if flat.size == 0:
        return []
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    counts = np.diff(np.concatenate([[0], change, [flat.size]])).tolist()
    return [0, *counts] if flat[0] else counts


def counts_string(counts: Sequence[int]) -> str:
    """COCO's compressed RLE string of run lengths (pycocotools' ``rleToString``): from the third
    run on, each is stored as its difference to the run two before, in 5-bit groups (6th bit: more
    groups follow) offset by 48 into printable characters."""
    out = []
    for i, count in enumerate(counts):
        x = int(count) - (int(counts[i - 2]) if i > 2 else 0)
        more = True
        while more:
            c = x & 0x1F
            x >>= 5  # Python shifts negative numbers arithmetically, as the C code does
            more = x != -1 if c & 0x10 else x != 0
            out.append(chr((c | 0x20 if more else c) + 48))
    return "".join(out)


def string_counts(text: str) -> list[int]:
    """The run lengths of a compressed RLE string (pycocotools' ``rleFrString``)."""
    counts: list[int] = []
    p = 0
    while p < len(text):
        x = k = 0
        more = True
        while more:
            c = ord(text[p]) - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def encode_rle(mask: np.ndarray) -> dict[str, Any]:
    """A ``[H, W]`` mask as COCO's compressed RLE: ``{"size": [H, W], "counts": str}``."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise LavaError(f"an RLE mask is 2-D [H, W], got shape {list(mask.shape)}")
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": counts_string(rle_counts(mask))}


def decode_rle(rle: dict[str, Any]) -> np.ndarray:
    """The ``[H, W]`` uint8 mask of a compressed (string) or uncompressed (list) COCO RLE."""
    h, w = (int(s) for s in rle["size"])
    counts = rle["counts"]
    if isinstance(counts, bytes):
        counts = counts.decode()
    if isinstance(counts, str):
        counts = string_counts(counts)
    if sum(counts) != h * w:
        raise LavaError(f"RLE runs cover {sum(counts)} pixels, not {h}x{w}")
    values = np.zeros(len(counts), dtype=np.uint8)
    values[1::2] = 1
    return np.repeat(values, counts).reshape((w, h)).T.copy()


def bbox(mask: np.ndarray) -> list[float]:
    """``[x, y, width, height]`` of the set pixels (zeros for an empty mask)."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if rows.size == 0:
        return [0.0, 0.0, 0.0, 0.0]
    return [float(cols[0]), float(rows[0]), float(cols[-1] - cols[0] + 1), float(rows[-1] - rows[0] + 1)]


class CocoBuilder:
    """One COCO dataset built image by image: ``add`` each image's label map, then ``dataset()``.

    ``classes``: what the label values index (``Segmentation.classes``); ``background`` says
    that label 0 is the background a threshold added (no category, no annotation).
    """

    def __init__(self, classes: Sequence[str], background: bool = False):
        self.classes = tuple(classes)
        self.background = background
        first = 1 if background else 0
        # label value -> category id (1 … C)
        self.category_of = {label: label - first + 1 for label in range(first, len(self.classes))}
        self.images: list[dict[str, Any]] = []
        self.annotations: list[dict[str, Any]] = []

    @property
    def categories(self) -> list[dict[str, Any]]:
        return [
            {"id": cid, "name": self.classes[label], "supercategory": "lava"}
            for label, cid in self.category_of.items()
        ]

    def add(self, labels, file_name: str, image_id: int | None = None, **extra: Any) -> int:
        """Add one image's ``[H, W]`` label map (numpy or torch); returns its image id. ``extra``
        fields go into the image's entry as they are (``lava generate``: its prompt and seed)."""
        labels = np.asarray(labels.cpu() if hasattr(labels, "cpu") else labels)
        if labels.ndim != 2:
            raise LavaError(f"a label map is 2-D [H, W], got shape {list(labels.shape)}")
        image_id = len(self.images) + 1 if image_id is None else int(image_id)
        if any(im["id"] == image_id for im in self.images):
            raise LavaError(f"image id {image_id} is given twice")
        h, w = labels.shape
        entry = {"id": image_id, "file_name": str(file_name), "height": int(h), "width": int(w)}
        self.images.append({**entry, **extra})
        for label in np.unique(labels).tolist():
            cid = self.category_of.get(int(label))
            if cid is None:
                continue  # the background label
            mask = labels == label
            self.annotations.append(
                {
                    "id": len(self.annotations) + 1,
                    "image_id": image_id,
                    "category_id": cid,
                    "segmentation": encode_rle(mask),
                    "area": int(mask.sum()),
                    "bbox": bbox(mask),
                    "iscrowd": 0,
                }
            )
        return image_id

    def dataset(self, description: str = "lava segmentation") -> dict[str, Any]:
        return {
            "info": {"description": description, "version": "1.0"},
            "licenses": [],
            "images": list(self.images),
            "annotations": list(self.annotations),
            "categories": self.categories,
        }

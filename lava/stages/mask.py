"""Stage 5: ``Heatmaps`` → ``Segmentation`` at each image's original size."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..errors import ClassNameError, LavaError
from ..types import Heatmaps, MaskConfig, Segmentation


def check_background_class(classes: Sequence[str], threshold: float | None, name: str = "background") -> None:
    """Refuse a class called ``name`` next to a background ``threshold``: both would label pixels
    ``name`` (the rule ``lava.config.recipe`` applies to a threshold the caller asked for)."""
    if threshold and name in classes:
        raise ClassNameError(
            f"a class is named {name!r} and a background threshold ({threshold:g}) is set: both would "
            f"label pixels {name!r}. Drop the class (the threshold labels weak pixels {name!r} itself), "
            "or drop the threshold (set it to 0) to let the named class compete"
        )


def upsample(scores: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of ``[C, h, w]`` grid scores to ``[C, H, W]`` pixels.

    The token grid covers the whole image (resized, not padded), so pixel centres map back
    with ``align_corners=False`` and no offset.
    """
    return F.interpolate(scores[None].float(), size=size, mode="bilinear", align_corners=False)[0]


def present_classes(heatmaps: Heatmaps, min_presence: float | None) -> torch.Tensor | None:
    """``[B, C]`` bool: the classes allowed to take pixels (``None`` when every class is)."""
    if min_presence is None:
        return None
    if heatmaps.presence is None:
        raise LavaError("min_presence needs Heatmaps.presence; build the heatmaps with lava.aggregate")
    keep = heatmaps.presence >= min_presence
    # An image where no class passes keeps its strongest one, so argmax stays defined.
    keep[torch.arange(keep.shape[0]), heatmaps.presence.argmax(-1)] = True
    return keep


def to_mask(
    heatmaps: Heatmaps,
    sizes: Sequence[tuple[int, int]] | tuple[int, int] | None = None,
    config: MaskConfig | None = None,
    *,
    background_threshold: float | None = None,
    min_presence: float | None = None,
    images=(),
) -> Segmentation:
    """Upsample each image's class scores to its size ``(H, W)`` and take the best class per pixel.

    ``sizes`` default to the sizes the images had when noised. With a background threshold,
    label 0 is background and class ``i`` becomes label ``i + 1``. With ``min_presence``, classes
    whose ``heatmaps.presence`` is below it in an image take no pixels there (the strongest class
    of an image always may). The keywords override ``config``'s fields; ``0`` turns either off.
    Without ``config``, the model's own settings (``Heatmaps.defaults``), as ``lava.segment``
    uses them.
    """
    config = config or MaskConfig.for_model(heatmaps.defaults, heatmaps.classes)
    if background_threshold is not None:
        config = dataclasses.replace(config, background_threshold=background_threshold or None)
    if min_presence is not None:
        config = dataclasses.replace(config, min_presence=min_presence or None)
    check_background_class(heatmaps.classes, config.background_threshold, config.background_name)
    b = heatmaps.scores.shape[0]
    if sizes is None:
        sizes = heatmaps.image_sizes
    elif len(sizes) == 2 and all(isinstance(s, int) for s in sizes):
        sizes = [tuple(sizes)] * b
    if len(sizes) != b:
        raise LavaError(f"got {len(sizes)} sizes for {b} images")
    classes = heatmaps.classes
    if config.background_threshold is not None:
        classes = (config.background_name, *classes)
    label_dtype = torch.uint8 if len(classes) <= 256 else torch.int32

    labels, scores = [], []
    keep = present_classes(heatmaps, config.min_presence)
    for i, size in enumerate(sizes):
        full = upsample(heatmaps.scores[i], tuple(int(s) for s in size))
        ranked = full if keep is None else full.masked_fill(~keep[i, :, None, None], float("-inf"))
        best, label = ranked.max(dim=0)
        if config.background_threshold is not None:
            label = torch.where(best < config.background_threshold, 0, label + 1)
        labels.append(label.to(label_dtype).cpu())
        scores.append(full.cpu())
    return Segmentation(labels=tuple(labels), scores=tuple(scores), classes=classes, images=tuple(images))

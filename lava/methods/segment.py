"""``lava.segment`` for a comparison-method segmenter: its heatmaps, then lava's own mask stage.

``lava.segment_iter(images, classes, backend=segmenter)`` lands here; the refinement, the
background and presence rules and the label maps are the same code lava's method runs.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from tqdm.auto import tqdm

from ..images import ImageInput, load_image
from ..stages.mask import to_mask
from ..stages.prompts import DEFAULT_SEPARATOR, DEFAULT_TEMPLATE, parse_classes
from ..stages.refine import refine as refine_heatmaps
from ..stages.refine import split_refine
from ..types import AggregateConfig, MaskConfig, Segmentation
from .base import Segmenter, refuse_lava_options


def segment_with(
    segmenter: Segmenter,
    inputs: Sequence[ImageInput],
    classes: str | Sequence[str],
    *,
    timestep: float | None = None,
    layers: Sequence[int] | None = None,
    seed: int = 0,
    resolution: int | str | None = None,
    template: str = DEFAULT_TEMPLATE,
    separator: str = DEFAULT_SEPARATOR,
    max_classes_per_prompt: int | None = None,
    normalize: str | None = None,
    background_threshold: float | None = None,
    min_presence: float | None = None,
    aggregate_config: AggregateConfig | None = None,
    mask_config: MaskConfig | None = None,
    refine: str | None = None,
    progress: bool = False,
    lava_only: dict | None = None,
) -> Iterator[tuple[int, Segmentation]]:
    """Yields ``(index, Segmentation of that image)`` in input order, one image at a time.

    ``lava_only``: the reading options of lava's own method the caller set (direction, softmax,
    heads, source, sigma, ...) with their defaults; any changed one is refused, since the
    segmenter would ignore it; ``aggregate_config.tokens`` likewise (its ``layers`` give way to
    ``layers``)."""
    from ..pipeline import _is_rgb, resolve_configs

    changed = [k for k, (value, default) in (lava_only or {}).items() if value != default]
    if aggregate_config is not None and aggregate_config.tokens != "all":
        changed.append("tokens")
    refuse_lava_options(segmenter.method, changed, refine)
    names = parse_classes(classes)
    layers = segmenter.check_layers(layers if layers is not None else segmenter.defaults.layers)
    timestep = segmenter.defaults.timestep if timestep is None else timestep
    segmenter.check_timestep(timestep)
    agg, mask = resolve_configs(
        segmenter,
        aggregate_config,
        mask_config,
        normalize=normalize,
        background_threshold=background_threshold,
        min_presence=min_presence,
        classes=names,
    )
    _, after = split_refine(refine)  # no propagation steps: refused above
    for i in tqdm(range(len(inputs)), desc="segment", unit="image", disable=not progress):
        # An RGB PIL image (as ``segment`` passes) is used as is: converting would copy it.
        image = inputs[i] if _is_rgb(inputs[i]) else load_image(inputs[i])
        (heat,) = segmenter.heatmaps(
            image,
            names,
            timestep=timestep,
            layer_groups=[layers],
            normalize=agg.normalize,
            seed=seed,
            resolution=resolution,
            template=template,
            separator=separator,
            max_classes_per_prompt=max_classes_per_prompt,
        )
        if after:
            heat = refine_heatmaps(heat, [image], method=after)
        yield i, to_mask(heat, config=mask, images=(image,))

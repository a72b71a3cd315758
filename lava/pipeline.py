"""``segment``: the five stages composed, over any number of images of any sizes."""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from .aggregate import aggregate
from .backends import Backend, load_backend
from .capture import capture
from .images import ImageInput, load_images
from .mask import to_mask
from .noise import noise
from .prompts import DEFAULT_SEPARATOR, DEFAULT_TEMPLATE, encode_prompt
from .types import AggregateConfig, MaskConfig, Segmentation


def _batches(images, batch_size: int) -> list[list[int]]:
    """Indices grouped by image size (one forward needs one token grid), then chunked."""
    by_size: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, im in enumerate(images):
        by_size[im.size].append(i)
    return [idx[s : s + batch_size] for idx in by_size.values() for s in range(0, len(idx), batch_size)]


def resolve_configs(
    backend: Backend,
    aggregate_config: AggregateConfig | None = None,
    mask_config: MaskConfig | None = None,
    *,
    normalize: str | None = None,
    background_threshold: float | None = None,
    min_presence: float | None = None,
) -> tuple[AggregateConfig, MaskConfig]:
    """The aggregate and mask settings of a call: keywords given, else the configs given, else the
    backend's defaults (``backend.defaults``). A background threshold or presence floor of ``0``
    means none."""
    d = backend.defaults
    agg = aggregate_config or AggregateConfig(normalize=d.normalize)
    if normalize is not None:
        agg = dataclasses.replace(agg, normalize=normalize)
    mask = mask_config or MaskConfig(background_threshold=d.background_threshold, min_presence=d.min_presence)
    if background_threshold is not None:
        mask = dataclasses.replace(mask, background_threshold=background_threshold or None)
    if min_presence is not None:
        mask = dataclasses.replace(mask, min_presence=min_presence or None)
    return agg, mask


def segment(
    images: ImageInput | Sequence[ImageInput],
    classes: str | Sequence[str],
    *,
    backend: Backend | str = "lava-shapes",
    timestep: float | None = None,
    sigma: float | None = None,
    layers: Sequence[int] | None = None,
    seed: int = 0,
    resolution: int | str | None = None,
    direction: str = "image_to_text",
    softmax: str = "joint",
    heads: str = "mean",
    impl: str = "auto",
    template: str = DEFAULT_TEMPLATE,
    separator: str = DEFAULT_SEPARATOR,
    max_classes_per_prompt: int | None = None,
    prompt_batch: int | None = None,
    normalize: str | None = None,
    background_threshold: float | None = None,
    min_presence: float | None = None,
    aggregate_config: AggregateConfig | None = None,
    mask_config: MaskConfig | None = None,
    batch_size: int = 1,
    progress: bool = False,
) -> Segmentation:
    """Segment ``images`` into ``classes``: noise → forward+capture → aggregate → mask.

    Args:
        images: paths, PIL images or uint8 arrays (any mode; converted to RGB).
        classes: class names, or one comma-separated string.
        backend: a loaded ``Backend`` or a name for ``load_backend``.
        timestep / sigma: when to read the attention (default: the backend's).
        layers: transformer blocks to read and average (default: the backend's).
        max_classes_per_prompt: split the classes into prompts of at most this many names
            (default: as many as fit one prompt window; longer lists are always split).
        prompt_batch: prompts per forward pass when the classes span several prompts
            (default: all of them in one batch; lower it to bound memory).
        normalize: how class maps are normalised (``AggregateConfig.normalize``; default: the
            backend's, see ``lava models``).
        background_threshold: pixels whose best score is below it are labelled background
            (default: the backend's; ``0`` labels no pixel background).
        min_presence: a class whose presence in an image (``Heatmaps.presence``) is below it takes
            no pixels there (default: the backend's; ``0`` lets every class compete).
        aggregate_config / mask_config: full configs instead of the keywords above (a keyword
            given as well overrides that field).

    Returns a ``Segmentation`` with one label map per image, in input order, at original size.
    """
    if isinstance(backend, str):
        backend = load_backend(backend)
    pil = load_images(images)
    prompt = encode_prompt(
        backend,
        classes,
        template=template,
        separator=separator,
        max_classes_per_prompt=max_classes_per_prompt,
    )
    layers = backend.check_layers(layers if layers is not None else backend.defaults.layers)
    aggregate_config, mask_config = resolve_configs(
        backend,
        aggregate_config,
        mask_config,
        normalize=normalize,
        background_threshold=background_threshold,
        min_presence=min_presence,
    )

    labels: list[torch.Tensor | None] = [None] * len(pil)
    scores: list[torch.Tensor | None] = [None] * len(pil)
    seg_classes: tuple[str, ...] = ()
    for idx in tqdm(_batches(pil, max(1, batch_size)), desc="segment", unit="batch", disable=not progress):
        batch = [pil[i] for i in idx]
        noisy = noise(backend, batch, timestep=timestep, sigma=sigma, seed=seed, resolution=resolution)
        slices = capture(
            backend,
            noisy,
            prompt,
            layers=layers,
            direction=direction,
            softmax=softmax,
            heads=heads,
            impl=impl,
            prompt_batch=prompt_batch,
        )
        seg = to_mask(aggregate(slices, prompt, aggregate_config), config=mask_config)
        seg_classes = seg.classes
        for j, i in enumerate(idx):
            labels[i], scores[i] = seg.labels[j], seg.scores[j]
    return Segmentation(labels=tuple(labels), scores=tuple(scores), classes=seg_classes, images=tuple(pil))

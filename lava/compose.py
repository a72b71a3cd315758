"""The stages composed, once: images + a resolved ``Recipe`` → ``Heatmaps`` → ``Segmentation``.

``read_heatmaps`` runs noise → forward+capture → aggregate → refine → mean for any number of
recipes over one batch of images, sharing every forward pass that recipes can share (one per
timestep and seed, capturing the union of their blocks and views). ``segmentation`` is the mask
stage with the recipe's mask settings. ``lava.segment``, ``lava eval``/``sweep``, the explorer,
the comparison methods and the measurement scripts all go through these two and keep only their
own bookkeeping (journal, cache, sharding), so every entry point computes the same thing the same
way. The two halves of ``read_heatmaps`` are public too, for a caller that keeps captures
(the explorer's cache): ``capture_forwards`` and ``maps_from_slices``.

A comparison method's segmenter (``lava.methods``) takes the place of noise, capture and
aggregate; refinement, the mean over runs and the mask stage are the same code.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from .config import PromptConfig, Recipe
from .methods.base import is_segmenter
from .stages.aggregate import aggregate, mean_heatmaps
from .stages.capture import capture_views
from .stages.mask import to_mask
from .stages.noise import noise
from .stages.prompts import encode_prompt
from .stages.refine import refine, split_refine
from .types import AttentionSlices, Heatmaps, PromptEncoding, Segmentation


@dataclass(frozen=True)
class ClassList:
    """The prompt of a comparison method: the names and how to word them (it encodes its own)."""

    classes: tuple[str, ...]
    config: PromptConfig


def prepare_prompt(backend, classes: Sequence[str], config: PromptConfig) -> PromptEncoding | ClassList:
    """``classes`` encoded for ``backend`` (a ``ClassList`` for a comparison method's segmenter)."""
    if is_segmenter(backend):
        return ClassList(tuple(classes), config)
    return encode_prompt(
        backend,
        list(classes),
        template=config.template,
        separator=config.separator,
        max_classes_per_prompt=config.max_classes_per_prompt,
    )


@dataclass(frozen=True)
class ForwardKey:
    """What one forward pass is: recipes whose runs agree on it share that forward."""

    timestep: float | None
    seed: int
    sigma: float | None
    resolution: int | str | None
    heads: str
    impl: str
    source: str
    prompt_batch: int | None
    normalize: str | None = None  # a segmenter normalises inside its forward


def forward_key(recipe: Recipe, timestep: float | None, seed: int, segmenter: bool = False) -> ForwardKey:
    r = recipe.reading
    return ForwardKey(
        timestep,
        seed,
        r.sigma,
        r.resolution,
        r.heads,
        r.impl,
        r.source,
        r.prompt_batch,
        recipe.aggregate.normalize if segmenter else None,
    )


def propagates(recipe: Recipe) -> bool:
    """Whether the recipe's refinement starts with propagation (it needs each run's image q/k)."""
    return bool(split_refine(recipe.refine)[0])


def capture_forwards(
    backend,
    images: Sequence[Image.Image],
    prompt: PromptEncoding,
    recipes: Sequence[Recipe],
) -> dict[ForwardKey, dict[tuple[str, str], AttentionSlices]]:
    """One noise + forward per distinct ``ForwardKey`` of ``recipes``' runs, capturing the union
    of the blocks, views and text keys those recipes read: ``{key: {view: AttentionSlices}}``."""
    needs: dict[ForwardKey, dict] = {}
    for rec in recipes:
        for t, seed in rec.reading.runs:
            need = needs.setdefault(
                forward_key(rec, t, seed), {"layers": set(), "views": [], "qk": False, "columns": set()}
            )
            need["layers"] |= set(rec.reading.layers or ())
            if rec.reading.view not in need["views"]:
                need["views"].append(rec.reading.view)
            need["qk"] |= propagates(rec)
            need["columns"] |= set(prompt.keys_for(rec.aggregate.presence, rec.reading.source))
    out = {}
    for key, need in needs.items():
        noisy = noise(
            backend, images, timestep=key.timestep, sigma=key.sigma, seed=key.seed, resolution=key.resolution
        )
        out[key] = capture_views(
            backend,
            noisy,
            prompt,
            views=need["views"],
            layers=sorted(need["layers"]),
            heads=key.heads,
            impl=key.impl,
            prompt_batch=key.prompt_batch,
            keep_image_qk=need["qk"],
            source=key.source,
            # The class keys, and the filler keys too where a recipe's presence rule reads them.
            columns=tuple(sorted(need["columns"])),
        )
        del noisy
    return out


def maps_from_slices(
    runs: Sequence[AttentionSlices], prompt: PromptEncoding, recipe: Recipe, images: Sequence[Image.Image]
) -> Heatmaps:
    """One recipe's class maps from its runs' captures: each run aggregated (and propagated by its
    own attention), the runs averaged, then the rest of the refinement chain on the images."""
    per_run, _ = split_refine(recipe.refine)  # propagation uses each run's own attention
    layers = recipe.reading.layers
    heats = []
    for slices in runs:
        heat = aggregate(slices, prompt, recipe.aggregate, layers=layers)
        if per_run:
            heat = refine(heat, images, method=per_run, slices=slices, layers=layers)
        heats.append(heat)
    return finish_maps(heats, recipe, images)


def finish_maps(runs: Sequence[Heatmaps], recipe: Recipe, images: Sequence[Image.Image]) -> Heatmaps:
    """The mean of a recipe's runs, refined by the steps after propagation (PAMR) on ``images``."""
    heat = mean_heatmaps(runs)
    _, after = split_refine(recipe.refine)
    return refine(heat, images, method=after) if after else heat


def read_heatmaps(
    backend,
    images: Sequence[Image.Image],
    prompt: PromptEncoding | ClassList,
    recipes: Sequence[Recipe],
) -> list[Heatmaps]:
    """Each recipe's ``Heatmaps`` ``[B, C, h, w]`` over ``images`` (RGB, one size), sharing forwards.

    ``prompt``: from ``prepare_prompt`` with the same backend. Recipes come from
    ``lava.config.recipe`` (complete: timesteps and layers named)."""
    if is_segmenter(backend):
        return _segmenter_heatmaps(backend, images, prompt, recipes)
    captured = capture_forwards(backend, images, prompt, recipes)
    out = []
    for rec in recipes:
        runs = [captured[forward_key(rec, t, s)][rec.reading.view] for t, s in rec.reading.runs]
        out.append(maps_from_slices(runs, prompt, rec, images))
    return out


def _segmenter_heatmaps(segmenter, images, prompt: ClassList, recipes: Sequence[Recipe]) -> list[Heatmaps]:
    """A comparison method's maps: one call per image and forward, every recipe's blocks at once."""
    groups: dict[ForwardKey, list[int]] = {}
    for i, rec in enumerate(recipes):
        for t, seed in rec.reading.runs:
            groups.setdefault(forward_key(rec, t, seed, segmenter=True), []).append(i)
    runs: dict[int, list[Heatmaps]] = {i: [] for i in range(len(recipes))}
    cfg = prompt.config
    for key, members in groups.items():
        per_image = [
            segmenter.heatmaps(
                image,
                prompt.classes,
                timestep=key.timestep,
                layer_groups=[recipes[i].reading.layers for i in members],
                normalize=key.normalize,
                seed=key.seed,
                resolution=key.resolution,
                template=cfg.template,
                separator=cfg.separator,
                max_classes_per_prompt=cfg.max_classes_per_prompt,
            )
            for image in images
        ]
        for j, i in enumerate(members):
            runs[i].append(stack_heatmaps([heats[j] for heats in per_image]))
    return [finish_maps(runs[i], rec, images) for i, rec in enumerate(recipes)]


def stack_heatmaps(heats: Sequence[Heatmaps]) -> Heatmaps:
    """Heatmaps of the same classes on one grid, joined into one batch in the order given."""
    if len(heats) == 1:
        return heats[0]
    first = heats[0]
    presence = None if first.presence is None else torch.cat([h.presence for h in heats])
    return dataclasses.replace(
        first,
        scores=torch.cat([h.scores for h in heats]),
        image_sizes=tuple(s for h in heats for s in h.image_sizes),
        presence=presence,
    )


def segmentation(heatmaps: Heatmaps, recipe: Recipe, images: Sequence[Image.Image] = ()) -> Segmentation:
    """The mask stage with ``recipe``'s mask settings: labels at each image's own size."""
    return to_mask(heatmaps, config=recipe.mask, images=tuple(images))

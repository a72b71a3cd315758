"""Stage 4: ``AttentionSlices`` → one ``Heatmaps`` score map per class on the token grid.

Each class's map is the mean over its text tokens (CLIP part, T5 part or both), over heads,
over the chosen blocks and over every timestep given, then normalised. Concept-view slices
(``source="concept"``, see ``lava.stages.concept``) hold logits rather than probabilities: their class
means are softmaxed over the classes at each image token (per capture, before the timesteps are
averaged), as ConceptAttention does, and then normalised like attention maps.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from einops import rearrange

from ..errors import LavaError
from ..options import NORMALIZATIONS, PRESENCE_RULES
from ..types import AggregateConfig, AttentionSlices, Heatmaps, PromptEncoding

__all__ = ["NORMALIZATIONS", "PRESENCE_RULES", "aggregate", "mean_heatmaps", "normalize_scores"]


def normalize_scores(scores: torch.Tensor, how: str) -> torch.Tensor:
    """Normalise ``[B, C, h, w]`` scores: per-class min-max, min-max over all classes of an image
    together, per-pixel sum over classes, or none."""
    if how == "none":
        return scores
    if how in ("minmax", "global"):
        flat = scores.flatten(2) if how == "minmax" else scores.flatten(1)
        lo, hi = flat.amin(-1, keepdim=True), flat.amax(-1, keepdim=True)
        return ((flat - lo) / (hi - lo).clamp_min(1e-12)).view_as(scores)
    if how == "classes":
        return scores / scores.sum(1, keepdim=True).clamp_min(1e-12)
    raise LavaError(f"normalize must be one of {NORMALIZATIONS}, got {how!r}")


def peak_presence(scores: torch.Tensor) -> torch.Tensor:
    """``[B, C]``: each class's peak over the image ``[B, C, h, w]`` relative to the largest peak."""
    peak = scores.flatten(2).amax(-1).clamp_min(0)
    return peak / peak.amax(-1, keepdim=True).clamp_min(1e-12)


def check_presence(rule: str) -> None:
    """Refuse a presence rule other than ``PRESENCE_RULES``."""
    if rule not in PRESENCE_RULES:
        raise LavaError(f"presence must be one of {PRESENCE_RULES}, got {rule!r}")


def keys_mean(slices: AttentionSlices, keys: Sequence[int], layers: Sequence[int]) -> torch.Tensor:
    """``[B, N_img]``: the mean probability over text ``keys``, heads and ``layers``."""
    idx = slices.column_indices(tuple(keys))
    return torch.stack([slices.maps[layer][..., idx].mean(dim=(1, 3)) for layer in layers]).mean(0)


def class_scores(
    slices: AttentionSlices, prompt: PromptEncoding, layers: Sequence[int], tokens: str
) -> torch.Tensor:
    """Mean probability per class over its tokens, heads and ``layers``: ``[B, C, N_img]``."""
    per_class = []
    for name in prompt.classes:
        positions = prompt.positions(name, tokens)
        if not positions:
            raise LavaError(
                f"class {name!r} has no {tokens!r} tokens to aggregate (is T5 dropped? Flux models have "
                "T5 tokens only: use tokens 'all' or 't5')"
            )
        per_class.append(keys_mean(slices, positions, layers))
    return torch.stack(per_class, dim=1)


def beats_filler(
    scores: torch.Tensor, slices: AttentionSlices, prompt: PromptEncoding, layers: Sequence[int]
) -> torch.Tensor:
    """``[B, C]``: the ``"null"`` presence rule (``lava.stages.presence.null_presence``) from class
    scores ``[B, C, N_img]`` already computed (``class_scores``): 1 where a class beats the mean of
    its prompt row's non-class keys somewhere, else 0."""
    named, t = set(prompt.columns()), prompt.text_len
    rows = range(prompt.num_prompts)
    rest = {row: [k for k in range(row * t, (row + 1) * t) if k not in named] for row in rows}
    missing = [k for keys in rest.values() for k in keys if k not in slices.columns]
    if missing:
        raise LavaError(
            f"null_presence needs the prompt's non-class text keys (e.g. {missing[:3]}) in the capture: "
            "pass columns=text_keys(prompt) to lava.capture"
        )
    filler = {row: keys_mean(slices, keys, layers) for row, keys in rest.items()}  # [B, N_img] each
    base = torch.stack([filler[prompt.row(c)] for c in prompt.classes], dim=1)  # [B, C, N_img]
    return ((scores - base).amax(-1) > 0).float()


def mean_heatmaps(runs: Sequence[Heatmaps]) -> Heatmaps:
    """The ensemble of several ``Heatmaps`` of the same images and classes (e.g. several timesteps
    or noise seeds): scores ``[B, C, h, w]`` and presence ``[B, C]`` averaged, each run with the
    same weight.

    Each run is averaged as normalised (unlike ``aggregate`` over several captures, which averages
    the raw maps and normalises once): a run whose attention is larger overall does not outweigh
    the others. Min-max and global maps stay in [0, 1] and class-sum maps sum to 1; presence is
    the mean of the runs' presence (``None`` when any run has none).
    """
    runs = list(runs)
    if not runs:
        raise LavaError("mean_heatmaps needs at least one Heatmaps")
    first = runs[0]
    for run in runs[1:]:
        same = (run.classes, run.image_sizes, run.normalize, tuple(run.scores.shape))
        want = (first.classes, first.image_sizes, first.normalize, tuple(first.scores.shape))
        if same != want:
            raise LavaError(
                "mean_heatmaps needs runs of the same classes, images, normalisation and grid: "
                f"got {same[2]!r} {list(same[3])} and {want[2]!r} {list(want[3])}"
            )
    if len(runs) == 1:
        return first
    presence = None
    if all(r.presence is not None for r in runs):
        presence = torch.stack([r.presence for r in runs]).mean(0)
    return dataclasses.replace(first, scores=torch.stack([r.scores for r in runs]).mean(0), presence=presence)


def aggregate(
    slices: AttentionSlices | Sequence[AttentionSlices],
    prompt: PromptEncoding,
    config: AggregateConfig | None = None,
    **overrides,
) -> Heatmaps:
    """Class heatmaps ``[B, C, h, w]`` from one capture, or several (e.g. several timesteps).

    ``config`` fields may also be given as keywords: ``aggregate(s, p, layers=(9,), tokens="clip")``.
    Without ``config``, the capturing model's own settings (``AttentionSlices.defaults``: its
    normalisation and presence rule), as ``lava.segment`` uses them.
    """
    first = slices if isinstance(slices, AttentionSlices) else next(iter(slices), None)
    config = config or AggregateConfig.for_model(getattr(first, "defaults", None))
    if overrides:
        config = AggregateConfig(**{**config.__dict__, **overrides})
    check_presence(config.presence)
    runs = [slices] if isinstance(slices, AttentionSlices) else list(slices)
    if not runs:
        raise LavaError("aggregate needs at least one AttentionSlices")
    grid = runs[0].grid
    if any(r.grid != grid for r in runs):
        raise LavaError(f"slices come from different token grids: {sorted({r.grid for r in runs})}")
    sources = sorted({r.source for r in runs})
    if len(sources) > 1:
        raise LavaError(f"cannot average slices of different sources {sources}: aggregate each on its own")

    per_run, nulls = [], []
    for run in runs:
        layers = tuple(config.layers) if config.layers is not None else run.layers
        missing = [layer for layer in layers if layer not in run.maps]
        if missing:
            raise LavaError(f"blocks {missing} were not captured; captured: {list(run.layers)}")
        scores = class_scores(run, prompt, layers, config.tokens)
        per_run.append(scores.softmax(dim=1) if run.source == "concept" else scores)
        if config.presence == "null" and run.source != "concept":
            nulls.append(beats_filler(scores, run, prompt, layers))
    scores = torch.stack(per_run).mean(0)
    scores = rearrange(scores, "b c (h w) -> b c h w", h=grid[0], w=grid[1])
    # With several runs, null presence is the share of runs in which the class beat the filler.
    presence = torch.stack(nulls).mean(0) if nulls else peak_presence(scores)
    return Heatmaps(
        scores=normalize_scores(scores, config.normalize).float(),
        classes=prompt.classes,
        image_sizes=runs[0].image_sizes,
        normalize=config.normalize,
        presence=presence.float(),
        defaults=runs[0].defaults,
    )

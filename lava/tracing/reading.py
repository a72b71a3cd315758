"""Reading a finished trace: its step means as lava's own ``AttentionSlices``, ``Heatmaps`` and
``Segmentation``, through the one composition (``stages.aggregate.aggregate``, or
``compose.maps_from_slices`` and ``compose.segmentation`` with a ``config.recipe``).

``TraceReading`` is the reading half of ``lava.tracing.Trace``; the recording half (hooks, running
sums) provides what it reads: ``backend``, ``layers``, ``words``, ``columns``, ``grid``,
``text_len``, ``timesteps``, ``images_per_prompt``, ``num_prompts``, ``num_images``, ``maps()``
and ``encoding()``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..backends.base import Backend
from ..compose import maps_from_slices, segmentation, stack_heatmaps
from ..config import Recipe
from ..config import recipe as make_recipe
from ..errors import ClassNameError, LavaError
from ..images import load_images
from ..options import IMAGE_TO_TEXT, JOINT, OPTIONS, PROMPT, READING
from ..stages.aggregate import aggregate
from ..stages.prompts import parse_classes
from ..stages.refine import Propagate
from ..types import AttentionSlices, Heatmaps, PromptEncoding, Segmentation

__all__ = ["TraceReading", "trace_recipe"]

_TRACE_READING = ("layers",)  # the other reading options (timestep, seed, ...) the pipeline decided


class TraceReading:
    """The results of a trace (mixed into ``lava.tracing.Trace``)."""

    def slices(self, prompt_index: int = 0, images: Sequence[int] | None = None) -> AttentionSlices:
        """The images of prompt ``prompt_index`` (or ``images`` of them, counted within it) as
        ``AttentionSlices``: the step means, with the model's defaults as ``lava.capture`` sets
        them; ``timestep``/``sigma`` are the mean over the traced steps."""
        n = self.images_per_prompt
        local = list(range(n)) if images is None else list(images)
        rows = torch.tensor([prompt_index * n + i for i in local])
        maps = {b: m.index_select(0, rows.to(m.device)) for b, m in self.maps().items()}
        t = sum(self.timesteps) / len(self.timesteps)
        size = (self.grid[0] * self.backend.grid_unit, self.grid[1] * self.backend.grid_unit)
        return AttentionSlices(
            maps=maps,
            columns=self.columns,
            grid=self.grid,
            direction=IMAGE_TO_TEXT,
            softmax=JOINT,
            heads="mean",
            timestep=t,
            sigma=t / self.backend.num_train_timesteps,
            image_sizes=(size,) * len(local),
            source="attention",
            defaults=self.backend.defaults,
        )

    def heatmaps(
        self, words: str | Sequence[str] | None = None, *, indices: Sequence[int] | None = None, **options
    ) -> Heatmaps:
        """``Heatmaps`` ``[B, C, h, w]`` of ``words`` (default: the trace's) over the generated
        images (or those at ``indices``), through ``lava.stages.aggregate.aggregate``.

        ``options``: ``layers`` (among the traced blocks; default all of them) and the aggregate
        options (``tokens``, ``normalize``, ``presence``), defaulted from the model as
        ``lava.segment`` does. Each word must be in the prompt of every image asked for.
        """
        names, rec = self._recipe(words, options)
        heats = []
        for p, local in self._groups(indices):
            prompt = self._prompt_for(names, p)
            heats.append(aggregate(self.slices(p, local), prompt, rec.aggregate, layers=rec.reading.layers))
        return stack_heatmaps(heats)

    def segment(
        self,
        words: str | Sequence[str] | None = None,
        *,
        images: Sequence[Any] | None = None,
        indices: Sequence[int] | None = None,
        **options,
    ) -> Segmentation:
        """A ``Segmentation`` of the generated images (or those at ``indices``) into ``words``:
        ``lava.compose.maps_from_slices`` and ``lava.compose.segmentation`` with the recipe of
        ``options`` (``layers`` among the traced blocks, and the aggregate, refinement and mask
        options of ``lava.segment``; the model's own where not given).

        ``images``: the generated images (``out.images``, one per image asked for), for
        ``Segmentation.overlay`` and for refinements that read the pixels (``pamr``).
        Propagation is refused: it needs one forward's attention, a trace averages many.
        """
        names, rec = self._recipe(words, options, segmenting=True)
        groups = self._groups(indices)
        pil = [] if images is None else load_images(list(images))
        size = (self.grid[0] * self.backend.grid_unit, self.grid[1] * self.backend.grid_unit)
        count = sum(len(local) for _, local in groups)
        if pil and [(im.height, im.width) for im in pil] != [size] * count:
            got = [(im.height, im.width) for im in pil]
            raise LavaError(f"images of sizes (H, W) {got} given for {count} generated image(s) of {size}")
        if rec.refine and not pil:
            raise LavaError(
                f"refine {rec.refine_label!r} reads the image: pass images=out.images or refine='none'"
            )
        heats, start = [], 0
        for p, local in groups:
            part, start = pil[start : start + len(local)], start + len(local)
            heats.append(maps_from_slices([self.slices(p, local)], self._prompt_for(names, p), rec, part))
        return segmentation(stack_heatmaps(heats), rec, pil)

    def _recipe(self, words, options: dict, segmenting: bool = False):
        names = parse_classes(words) if words is not None else self.words
        if names is None:
            raise LavaError("name the words to read: tr.heatmaps(['cat', 'sofa']) or trace(pipe, words=...)")
        rec = trace_recipe(self.backend, self.layers, names, options, segmenting=segmenting)
        if rec.aggregate.presence == "null" and len(self.columns) != self.text_len:
            raise LavaError(
                "the 'null' presence rule compares the words with every other token: trace with words=None"
            )
        return names, rec

    def _prompt_for(self, names: tuple[str, ...], prompt_index: int) -> PromptEncoding:
        try:
            prompt = self.encoding(names, prompt_index)
        except ClassNameError as err:
            if self.num_prompts == 1:
                raise
            n = self.images_per_prompt
            others = [i for i in range(self.num_images) if i // n != prompt_index]
            raise ClassNameError(f"{err} (read the other images alone: indices={others})") from None
        if not set(prompt.columns()) <= set(self.columns):
            raise LavaError(
                f"the trace kept only the tokens of {list(self.words or ())}: open it with words=None "
                f"or name {', '.join(names)} in lava.trace(pipe, words=...)"
            )
        return prompt

    def _groups(self, indices: Sequence[int] | None) -> list[tuple[int, list[int]]]:
        """``[(prompt index, [image index within that prompt, ...]), ...]`` in image order."""
        total, n = self.num_images, self.images_per_prompt
        chosen = list(range(total)) if indices is None else [int(i) for i in indices]
        bad = [i for i in chosen if not 0 <= i < total]
        if bad or not chosen:
            raise LavaError(f"image indices {bad or chosen} are out of range: the call made {total} image(s)")
        groups: list[tuple[int, list[int]]] = []
        for i in chosen:
            p = i // n
            if groups and groups[-1][0] == p:
                groups[-1][1].append(i % n)
            else:
                groups.append((p, [i % n]))
        return groups


def trace_recipe(
    backend: Backend, traced: Sequence[int], names: Sequence[str], options: dict, segmenting: bool = True
) -> Recipe:
    """The ``Recipe`` that reads a trace of blocks ``traced``: ``options`` may choose ``layers``
    (among ``traced``; default all of them) and the aggregate, refinement and mask options, the
    model's own elsewhere. Options the pipeline call decided (timestep, seed, resolution, the view,
    the prompt wording) are refused, and with ``segmenting`` so is refinement by propagation."""
    options = dict(options)
    targets = {n: OPTIONS[n].target for n in options if n in OPTIONS}
    fixed = [n for n, t in targets.items() if t == PROMPT or (t == READING and n not in _TRACE_READING)]
    if fixed:
        raise LavaError(
            f"{', '.join(fixed)} cannot be chosen after a trace: the pipeline call decided them "
            "(a trace reads layers and the aggregate, refinement and mask options)"
        )
    layers = options.pop("layers", None)
    layers = tuple(traced) if layers is None else backend.check_layers(layers)
    untraced = [b for b in layers if b not in traced]
    if untraced:
        raise LavaError(f"blocks {untraced} were not traced; traced: {list(traced)}")
    rec = make_recipe(backend, classes=names, layers=layers, **options)
    if segmenting and any(isinstance(step, Propagate) for step in rec.refine):
        raise LavaError(
            "refine 'propagate' reads one forward's image-to-image attention; a trace averages many "
            "steps: use refine='pamr' or 'none'"
        )
    return rec

"""Run a segmentation setting (or a grid of them) over a dataset; resumable and shardable.

One engine serves ``lava eval`` (one cell) and ``lava sweep`` (timesteps × layers): for each
image, each timestep and each noise seed it noises once and captures every requested block in
one forward pass, then aggregates each cell from those slices (a cell over several timesteps or
seeds averages its runs' maps). Per-image confusion counts go to a journal
(JSON lines) as they finish, so a killed run resumes where it stopped and sums to the same
totals. Under ``torchrun`` each rank takes every n-th image and the counts are all-reduced.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..backends.base import Backend
from ..compose import ClassList, prepare_prompt, read_heatmaps, segmentation
from ..config import Recipe
from ..errors import LavaError
from ..methods import METHODS
from ..methods.base import Segmenter, is_segmenter
from ..options import IMAGE_TO_TEXT, JOINT
from ..types import PromptEncoding, Segmentation
from . import distributed
from .datasets import DatasetInfo, SegmentationDataset
from .metrics import ConfusionMatrix

PROTOCOLS = ("all", "present")
BACKGROUNDS = ("auto", "class", "threshold", "none")
# Settings added after journals were first written, with the value every older journal was made
# with: a journal that does not record one is checked against that value, not assumed to match.
UNRECORDED_DEFAULTS = {"refine": None, "source": "attention", "seeds": None, "method": "lava"}


@dataclass(frozen=True)
class Cell:
    """One setting of the grid: a timestep (or a tuple of timesteps whose maps are averaged, an
    ensemble), the blocks averaged into one map, and the attention view (direction and softmax
    domain) read."""

    timestep: float | tuple[float, ...]
    layers: tuple[int, ...]
    direction: str = IMAGE_TO_TEXT
    softmax: str = JOINT

    @property
    def view(self) -> tuple[str, str]:
        return (self.direction, self.softmax)

    @property
    def timesteps(self) -> tuple[float, ...]:
        return tuple(self.timestep) if isinstance(self.timestep, tuple) else (self.timestep,)

    @property
    def key(self) -> str:
        when = "+".join(f"{t:g}" for t in self.timesteps)
        return f"t={when}|layers={','.join(map(str, self.layers))}|{self.direction}/{self.softmax}"


@dataclass(frozen=True)
class EvalSettings:
    """Everything that decides a prediction besides the timestep, layers and view of a cell.

    ``protocol``: ``"all"`` gives the method every class of the dataset (open vocabulary);
    ``"present"`` only the classes in that image's ground truth (as Seg4Diff reports).
    ``background``: ``"class"`` names the dataset's background class in the prompt;
    ``"threshold"`` labels pixels whose best normalised score is below the recipe's background
    threshold as background; ``"none"`` never predicts background; ``"auto"``, for a dataset that
    scores a background class, is ``"threshold"`` when a threshold is set (the model's by default)
    and ``"class"`` otherwise, and ``"none"`` for a dataset without one.
    ``method``: ``"lava"``, or the comparison method (``lava.methods``) whose segmenter is run.
    ``recipe``: the reading, aggregation, refinement and mask settings (``lava.config.recipe``
    resolves them against the model); each cell replaces its timesteps, layers and view.
    """

    protocol: str = "all"
    background: str = "auto"
    method: str = "lava"
    recipe: Recipe = field(default_factory=Recipe)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise LavaError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.protocol not in PROTOCOLS:
            raise LavaError(f"protocol must be one of {PROTOCOLS}, got {self.protocol!r}")
        if self.background not in BACKGROUNDS:
            raise LavaError(f"background must be one of {BACKGROUNDS}, got {self.background!r}")

    def background_mode(self, info: DatasetInfo) -> str:
        if self.background == "auto":
            if info.background is None:
                return "none"
            return "threshold" if self.recipe.mask.background_threshold is not None else "class"
        return self.background

    def record(self) -> dict:
        """The settings as the journal records them (the keys every lava since 0.1 has written)."""
        r = self.recipe
        seeds = r.reading.seeds
        return {
            "protocol": self.protocol,
            "background": self.background,
            "background_threshold": r.mask.background_threshold,
            "direction": r.reading.direction,
            "softmax": r.reading.softmax,
            "source": r.reading.source,
            "tokens": r.aggregate.tokens,
            "normalize": r.aggregate.normalize,
            "min_presence": r.mask.min_presence,
            "presence": r.aggregate.presence,
            "seed": seeds[0] if len(seeds) == 1 else 0,
            "resolution": r.reading.resolution,
            "impl": r.reading.impl,
            "template": r.prompt.template,
            "separator": r.prompt.separator,
            "max_classes_per_prompt": r.prompt.max_classes_per_prompt,
            "refine": r.refine_label,
            "seeds": list(seeds) if len(seeds) > 1 else None,
            "method": self.method,
        }


@dataclass
class RunResult:
    """Confusion counts per cell over every image done (this run and resumed ones)."""

    cells: list[Cell]
    matrices: dict[str, ConfusionMatrix]
    num_images: int
    resumed: int = 0
    extras: dict = field(default_factory=dict)


def vocabulary(
    info: DatasetInfo, label: np.ndarray, settings: EvalSettings
) -> tuple[tuple[str, ...], np.ndarray]:
    """Prompt names given to the method and, for each, the dataset label id it predicts.

    With the ``present`` protocol only classes in ``label`` (ignore excluded) are named. An
    image whose ground truth names nothing but background, when background is a threshold, gets
    no names at all: nothing to segment, so every pixel is background (``run_cells`` predicts it
    without a forward pass). Any other image whose ground truth names nothing gets the background
    class (or the first class) so a prediction still exists; its pixels are all ignored anyway.
    """
    ids = list(range(info.num_classes))
    if settings.protocol == "present":
        present = set(np.unique(label).tolist()) - {info.ignore_index}
        ids = [i for i in ids if i in present]
    threshold = settings.background_mode(info) == "threshold"
    if settings.background_mode(info) != "class" and info.background is not None:
        ids = [i for i in ids if i != info.background]
    if not ids and threshold and info.background is not None:
        return (), np.zeros(0, dtype=np.int64)
    if not ids:
        ids = [info.background if info.background is not None else 0]
    return tuple(info.prompt_names[i] for i in ids), np.asarray(ids, dtype=np.int64)


def to_dataset_ids(
    seg: Segmentation, index: int, ids: np.ndarray, info: DatasetInfo, threshold: bool
) -> np.ndarray:
    """A predicted label map in the dataset's label ids (``ignore_index`` where none applies)."""
    labels = seg.labels[index].numpy().astype(np.int64)
    if threshold:
        background = info.background if info.background is not None else info.ignore_index
        table = np.concatenate([[background], ids])
    else:
        table = ids
    return table[labels].astype(np.uint8 if info.num_classes < 255 else np.int32)


def settings_hash(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Journal:
    """Per-image results as JSON lines, one file per rank, with the run's settings as header.

    The header records every setting that changes a prediction (``config``). A journal with
    results is resumed only when each setting it records equals this run's; otherwise it is
    refused, naming each setting that differs. A setting the journal does not record (it was
    written by an older lava that did not record it yet) cannot be checked: it is listed in
    ``unrecorded`` for the caller to say so. A journal that holds only its header (a run that
    failed or was stopped before its first image) is stale and is replaced, whatever its
    settings, so a failed run never locks its output folder.
    """

    def __init__(self, folder: Path, config: dict, rank: int = 0):
        self.folder = folder
        self.digest = settings_hash(config)
        self.config = config
        self.path = folder / f"journal.rank{rank}.jsonl"
        self.unrecorded: list[str] = []

    def load(self, num_classes: int) -> dict[str, dict[str, torch.Tensor]]:
        """``{image id: {cell key: counts [C, C+1]}}`` from every rank's journal in the folder.

        Raises ``LavaError`` naming the settings that differ when a journal with results was
        written with other settings.
        """
        done: dict[str, dict[str, torch.Tensor]] = {}
        unrecorded: set[str] = set()
        for path in sorted(self.folder.glob("journal.rank*.jsonl")):
            header, records = _read_journal(path)
            if not records:
                continue  # nothing finished: whatever its settings, it holds nothing to keep
            if not self._matches(header):
                raise LavaError(self._mismatch(path, header, len(records)))
            # Settings of UNRECORDED_DEFAULTS are checked against their old value, not assumed.
            unrecorded |= set(self._json_config()) - set(header["config"]) - set(UNRECORDED_DEFAULTS)
            for rec in records:
                done[rec["id"]] = {k: _dense(v, num_classes) for k, v in rec["cells"].items()}
        self.unrecorded = sorted(unrecorded)
        return done

    def _json_config(self) -> dict:
        return json.loads(json.dumps(self.config, default=str))

    def _matches(self, header: dict | None) -> bool:
        if header is None:
            return False
        if header.get("settings") == self.digest:
            return True
        return isinstance(header.get("config"), dict) and not self._differences(header["config"])

    def _differences(self, old: dict) -> list[str]:
        """``"key: old -> new"`` for each setting ``old`` records with another value (or that this
        run no longer has); settings ``old`` does not record are not differences, except those of
        ``UNRECORDED_DEFAULTS``, which every older journal was made with."""
        new = self._json_config()
        old = {**{k: v for k, v in UNRECORDED_DEFAULTS.items() if k in new}, **old}
        return [_change(key, old[key], new.get(key)) for key in sorted(old) if old[key] != new.get(key)]

    def _mismatch(self, path: Path, header: dict | None, count: int) -> str:
        old = (header or {}).get("config")
        diffs = self._differences(old) if isinstance(old, dict) else []
        what = "; ".join(diffs) if diffs else "its settings header is unreadable"
        return (
            f"{path} holds results for {count} image(s) made with other settings ({what}). "
            f"Use a new --out folder, run again with the settings it was made with, or delete "
            f"{self.folder / 'journal.rank*.jsonl'} to start over"
        )

    def start(self) -> None:
        """Write this rank's header, replacing a stale journal (one with no finished image)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            header, records = _read_journal(self.path)
            if self._matches(header):
                return
            if records:  # load() refuses this before start() is called; never overwrite results
                raise LavaError(self._mismatch(self.path, header, len(records)))
        with open(self.path, "w") as fh:
            fh.write(json.dumps({"settings": self.digest, "config": self.config}, default=str) + "\n")

    def append(self, image_id: str, cells: dict[str, torch.Tensor]) -> None:
        with open(self.path, "a") as fh:
            fh.write(json.dumps({"id": image_id, "cells": {k: _sparse(v) for k, v in cells.items()}}) + "\n")
            fh.flush()


def _read_journal(path: Path) -> tuple[dict | None, list[dict]]:
    """``(header, finished-image records)`` of one journal file; lines cut by a kill are skipped
    (that image is simply redone)."""
    header, records = None, []
    with open(path) as fh:
        for n, line in enumerate(fh):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if n == 0 and "settings" in rec:
                header = rec
            elif "id" in rec and "cells" in rec:
                records.append(rec)
    return header, records


def _show(value) -> str:
    return "(unset)" if value is None else json.dumps(value)


def _change(key: str, old, new) -> str:
    """``"key: old -> new"``; long lists (a class list) are summarised by what was added or removed."""
    if isinstance(old, list) and isinstance(new, list) and max(len(old), len(new)) > 6:
        added = [x for x in new if x not in old]
        removed = [x for x in old if x not in new]
        if not added and not removed:
            what = "same entries in another order"
        else:
            what = "; ".join(
                f"{label} {', '.join(map(_show, items[:5]))}{', ...' if len(items) > 5 else ''}"
                for label, items in (("added", added), ("removed", removed))
                if items
            )
        return f"{key}: {len(old)} entries -> {len(new)} entries ({what})"
    return f"{key}: {_show(old)} -> {_show(new)}"


def _sparse(counts: torch.Tensor) -> list[list[int]]:
    nz = counts.nonzero()
    return [[int(i), int(j), int(counts[i, j])] for i, j in nz.tolist()]


def _dense(entries: list[list[int]], num_classes: int) -> torch.Tensor:
    out = torch.zeros(num_classes, num_classes + 1, dtype=torch.int64)
    for i, j, c in entries:
        out[i, j] = c
    return out


def run(
    backend: Backend | Segmenter,
    dataset: SegmentationDataset,
    cells: Sequence[Cell],
    settings: EvalSettings,
    out: Path,
    *,
    config: dict,
    on_prediction: Callable[[str, np.ndarray, Segmentation | None, int], None] | None = None,
    progress: bool = True,
    prompt_batch: int | None = None,
    on_prompt: Callable[[PromptEncoding], None] | None = None,
    on_note: Callable[[str], None] | None = None,
) -> RunResult:
    """Evaluate every cell over ``dataset``; resumes from ``out``'s journal; shards over ranks.

    ``on_prediction(image_id, prediction_in_dataset_ids, segmentation, cell_index)`` is called for
    each new prediction (to save pictures or label maps; ``segmentation`` is ``None`` for an image
    predicted without a forward pass); ``on_prompt(prompt)`` for each distinct
    vocabulary when it is first encoded. ``prompt_batch`` caps the prompts per forward pass (it
    changes memory, not results). ``on_note(message)`` hears what the user should know before the
    run starts (a resumed journal that does not record some of today's settings).
    """
    info = dataset.info
    rank, world = distributed.rank_and_world()
    journal, done = open_journal(out, config, rank, info.num_classes, on_note)
    threshold = settings.background_mode(info) == "threshold"
    base, recipes = cell_recipes(settings, cells, threshold, prompt_batch)

    new = {c.key: ConfusionMatrix(info.num_classes, info.ignore_index) for c in cells}
    todo = [i for i in range(len(dataset)) if dataset[i].id not in done][rank::world]
    prompts: dict[tuple[str, ...], PromptEncoding | ClassList] = {}
    bar = tqdm(todo, desc=f"{info.name}", unit="img", disable=not progress or rank != 0, dynamic_ncols=True)
    for i in bar:
        sample = dataset[i]
        image, label = sample.load()
        names, ids = vocabulary(info, label, settings)
        if not names:  # only background to find, by threshold: every pixel is background
            dtype = np.uint8 if info.num_classes < 255 else np.int32
            pred = np.full(label.shape, info.background, dtype=dtype)
            one = ConfusionMatrix(info.num_classes, info.ignore_index)
            one.update(pred, label)
            for ci, cell in enumerate(cells):
                new[cell.key].add_counts(one.counts)
                if on_prediction is not None:
                    on_prediction(sample.id, pred, None, ci)
            journal.append(sample.id, {cell.key: one.counts for cell in cells})
            continue
        if names not in prompts:
            prompts[names] = prepare_prompt(backend, names, base.prompt)
            if on_prompt is not None and not is_segmenter(backend):
                on_prompt(prompts[names])
        # One forward per timestep and seed, every cell's blocks and views at once.
        heats = read_heatmaps(backend, [image], prompts[names], recipes)
        per_cell: dict[str, torch.Tensor] = {}
        for ci, (cell, heat) in enumerate(zip(cells, heats, strict=True)):
            seg = segmentation(heat, recipes[ci], (image,))
            pred = to_dataset_ids(seg, 0, ids, info, threshold)
            one = ConfusionMatrix(info.num_classes, info.ignore_index)
            one.update(pred, label)
            per_cell[cell.key] = one.counts
            new[cell.key].add_counts(one.counts)
            if on_prediction is not None:
                on_prediction(sample.id, pred, seg, ci)
        del heats
        journal.append(sample.id, per_cell)

    totals = {}
    for cell in cells:
        counts = distributed.all_reduce_sum(new[cell.key].counts)
        for rec in done.values():
            counts = counts + rec.get(cell.key, torch.zeros_like(counts))
        totals[cell.key] = ConfusionMatrix(info.num_classes, info.ignore_index).add_counts(counts)
    num_new = int(distributed.all_reduce_sum(torch.tensor([len(todo)]))[0])
    return RunResult(cells=list(cells), matrices=totals, num_images=num_new + len(done), resumed=len(done))


def open_journal(out: Path, config: dict, rank: int, num_classes: int, on_note) -> tuple[Journal, dict]:
    """This rank's journal in ``out``, started, and the results it (and the other ranks') already
    hold, ``{image id: {cell key: counts}}``; every rank has read them before any writes.

    ``lava generate`` keeps its journal here too, with no cells (``{item id: {}}``)."""
    journal = Journal(out, config, rank)
    done = journal.load(num_classes)
    if journal.unrecorded and on_note is not None:
        on_note(
            f"resuming {len(done)} image(s) from a journal written by an older lava, which does not record "
            f"{', '.join(journal.unrecorded)}: those are assumed unchanged (use a new --out to be sure)"
        )
    journal.start()
    distributed.barrier()
    return journal, done


def cell_recipes(
    settings: EvalSettings, cells: Sequence[Cell], threshold: bool, prompt_batch: int | None = None
) -> tuple[Recipe, list[Recipe]]:
    """``(base, one recipe per cell)``: the run's recipe (no background threshold unless the
    dataset's background is a threshold; ``prompt_batch`` changes memory, not results, so it is not
    part of the recorded settings), with each cell's timesteps, blocks and view."""
    base = settings.recipe
    if prompt_batch is not None:
        base = base.replace(prompt_batch=prompt_batch)
    if not threshold:
        base = dataclasses.replace(base, mask=dataclasses.replace(base.mask, background_threshold=None))
    recipes = [
        base.replace(
            timesteps=cell.timesteps, layers=cell.layers, direction=cell.direction, softmax=cell.softmax
        )
        for cell in cells
    ]
    return base, recipes

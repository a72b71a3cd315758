"""``lava.generate``: a segmentation dataset of generated images, their masks read by ``lava.trace``.

Each item of a run is one pipeline call under ``lava.trace``: image ``k`` of prompt ``p`` (of ``P``
prompts) is item ``index = k·P + p``, generated from the seed ``seed + index`` (a CPU
``torch.Generator``), so an item's bytes depend on its own index and the run's settings only —
not on the other items, the order they run in, or how many ``count`` asks for. The trace keeps
the maps of the run's words that occur in that prompt and ``Trace.segment`` turns them into a
label map through lava's own stages (``lava.compose``: aggregate, refine, mask, with the model's
defaults unless options say otherwise); nothing of the pipeline is copied here.

``out`` receives the ``folder`` layout that ``lava eval --dataset folder`` reads
(``lava.evaluation.layouts.LAYOUTS["folder"]``)::

    images/<id>.png     the generated image (id: the index, 6 digits)
    labels/<id>.png     class ids indexing classes.txt (palette PNG)
    overlays/<id>.png   the label colours over the image, with a legend
    classes.txt         "background" first when the mask has a background threshold, then the words
    coco.json           one category per word, one RLE annotation per word present in an image
    journal.rank<r>.jsonl   the items done, after the settings they were made with

An item's three files are written together (temporary files renamed into place) and then recorded
in the journal (``lava.evaluation.runner.Journal``, as ``lava eval`` keeps it), so a killed run
resumes with the items it had not finished; ``classes.txt`` and ``coco.json`` are written when every
item is done. Under ``torchrun`` each rank makes every n-th item left (``lava.evaluation.distributed``)
and rank 0 writes the two index files once all ranks are through.
"""

from __future__ import annotations

import contextlib
import inspect
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ClassNameError, LavaError

__all__ = ["GenerateResult", "Item", "generate", "plan_items"]

ID_DIGITS = 6
FOLDERS = ("images", "labels", "overlays")
COCO_FILE = "coco.json"
CLASSES_FILE = "classes.txt"
# The options a trace reads (lava.tracing.trace_recipe); the pipeline call decides the others.
TRACE_OPTIONS = (
    "layers",
    "tokens",
    "normalize",
    "presence",
    "refine",
    "background_threshold",
    "min_presence",
)


@dataclass(frozen=True)
class Item:
    """One image of a run: its place ``index`` (image ``k`` of prompt ``p`` of ``P`` is ``k·P + p``),
    its file stem ``id``, its prompt, its generator seed and the run's words found in the prompt."""

    index: int
    id: str
    prompt: str
    seed: int
    words: tuple[str, ...]

    def files(self, out: Path) -> list[Path]:
        """``[image, label map, overlay]`` under ``out``."""
        return [out / folder / f"{self.id}.png" for folder in FOLDERS]


@dataclass(frozen=True)
class GenerateResult:
    """What ``lava.generate`` made: ``classes`` (classes.txt), every ``items`` of the run, how many
    were ``generated`` now (all ranks) and how many a journal already held (``resumed``)."""

    out: Path
    classes: tuple[str, ...]
    items: tuple[Item, ...]
    generated: int
    resumed: int

    @property
    def coco(self) -> Path:
        return self.out / COCO_FILE


def plan_items(
    prompts: str | Sequence[str], words: str | Sequence[str], count: int = 1, seed: int = 0
) -> list[Item]:
    """The items of a run, checked against the text alone (no model): ``count`` images of each
    prompt, image ``k`` of prompt ``p`` at index ``k·P + p`` with seed ``seed + index``.

    Each word (a list, or one comma-separated string; several words such as ``"red circle"`` are
    one class) must occur in at least one prompt, whole and case-insensitively, and each prompt
    must hold at least one word: otherwise ``ClassNameError`` names the words of every prompt.
    """
    from .stages.prompts import parse_classes, prompt_words, word_ranges

    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts or any(not isinstance(p, str) or not p.strip() for p in prompts):
        raise LavaError(f"give one or more non-empty prompts, got {prompts!r}")
    names = parse_classes(words)
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise LavaError(f"count must be a positive number of images per prompt, got {count!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise LavaError(f"seed must be a whole number >= 0, got {seed!r}")
    found = [tuple(w for w in names if word_ranges(p, w)) for p in prompts]

    def listing() -> str:
        return "; ".join(f"{p!r} has {', '.join(prompt_words(p))}" for p in prompts)

    missing = [w for w in names if not any(w in f for f in found)]
    if missing:
        which = "the prompt" if len(prompts) == 1 else "any prompt"
        verb = "is not a word" if len(missing) == 1 else "are not words"
        raise ClassNameError(f"{', '.join(map(repr, missing))} {verb} of {which}: {listing()}")
    empty = [p for p, f in zip(prompts, found) if not f]
    if empty:
        raise ClassNameError(
            f"prompt {empty[0]!r} holds none of the words {', '.join(names)}: name a word of every prompt "
            f"({listing()})"
        )
    n = len(prompts)
    return [Item(i, f"{i:0{ID_DIGITS}d}", prompts[i % n], seed + i, found[i % n]) for i in range(count * n)]


def generate(
    prompts: str | Sequence[str],
    words: str | Sequence[str],
    out: str | Path,
    *,
    count: int = 1,
    backend: Any = "lava-shapes",
    steps: int | None = None,
    guidance: float | None = None,
    seed: int = 0,
    size: int | tuple[int, int] | None = None,
    progress: bool = True,
    on_note: Callable[[str], None] | None = None,
    **options: Any,
) -> GenerateResult:
    """Generate ``count`` images of each prompt and write them with their label maps as a dataset.

    Args:
        prompts: one prompt or several.
        words: the classes (a list, or one comma-separated string): each must be a word (or words)
            of some prompt; an image is segmented into the words of its own prompt.
        out: the dataset folder (layout in the module docstring: ``images/``, ``labels/``,
            ``overlays/``, ``classes.txt``, ``coco.json``). A folder holding a journal of the same
            settings is resumed; one of other settings is refused, naming what differs.
        count: images per prompt. Raising it on a rerun adds items; the ones made stay as they are.
        backend: a ``Backend``, a name for ``lava.load_backend`` or a diffusers pipeline
            (``lava.from_pipeline(pipe, move=False)``).
        steps / guidance: ``num_inference_steps`` / ``guidance_scale`` of the pipeline call
            (default: the pipeline's own, e.g. 28 and 7.0 for SD3).
        seed: image ``index`` is generated from ``seed + index`` (a CPU generator): the same
            settings give the same bytes, item by item, on the same machine and software.
        size: the image size in pixels: a side (square) or ``(height, width)``; each must be a
            multiple of the model's token size (default: the model's native resolution).
        progress: a progress bar (rank 0 only).
        on_note: told what the user should know before the run: what it makes and with which
            settings (one line), and a resumed journal's caveats.
        **options: what ``Trace.segment`` reads: ``layers`` (the blocks traced; default the
            model's) and the aggregate, refinement and mask options of ``lava.segment``
            (``tokens``, ``normalize``, ``presence``, ``refine``, ``background_threshold``,
            ``min_presence``); the model's own where not given.
    """
    import torch
    from tqdm.auto import tqdm

    from . import io
    from .backends import load_backend
    from .backends.base import Backend
    from .backends.wrap import from_pipeline
    from .evaluation import distributed
    from .evaluation.runner import open_journal
    from .tracing import trace, trace_recipe
    from .viz import label_image

    items = plan_items(prompts, words, count, seed)
    names = _parse(words)  # every one is in some prompt (plan_items checked)
    unknown = [k for k in options if k not in TRACE_OPTIONS]
    if unknown:
        raise LavaError(
            f"unknown option(s) {', '.join(map(repr, unknown))}: "
            f"lava.generate reads {', '.join(TRACE_OPTIONS)}"
        )
    if isinstance(backend, str):
        backend = load_backend(backend)
    elif not isinstance(backend, Backend):
        backend = from_pipeline(backend, move=False)
    pipe = backend.pipe
    height, width = _size(backend, size)
    steps = _call_default(pipe, "num_inference_steps") if steps is None else int(steps)
    guidance = _call_default(pipe, "guidance_scale") if guidance is None else float(guidance)
    if steps is None or steps < 1:
        raise LavaError(f"steps must be a positive number of denoising steps, got {steps!r}")
    asked = options.get("layers")
    layers = backend.check_layers(asked if asked is not None else backend.defaults.layers)
    rec = trace_recipe(backend, layers, names, options)
    segment_options = {k: v for k, v in options.items() if k != "layers"}
    _check_windows(backend, items)
    background = rec.mask.background_threshold is not None
    classes = ("background", *names) if background else names
    if len(classes) > 255:
        raise LavaError(f"{len(names)} words: a generated dataset holds at most 254 (8-bit label maps)")
    call = dict(
        height=height,
        width=width,
        num_inference_steps=steps,
        max_sequence_length=backend.max_sequence_length,
        output_type="pil",
    )
    if guidance is not None:  # None: a pipeline without the argument
        call["guidance_scale"] = guidance
    config = {
        "command": "generate",
        "model": backend.name,
        "variant": backend.variant,
        "dtype": str(backend.dtype),
        "device": backend.device.type,
        "prompts": _prompt_list(prompts),
        "seed": seed,
        "size": [height, width],
        "steps": steps,
        "guidance": guidance,
        "max_sequence_length": backend.max_sequence_length,
        "layers": list(layers),
        "tokens": rec.aggregate.tokens,
        "normalize": rec.aggregate.normalize,
        "presence": rec.aggregate.presence,
        "refine": rec.refine_label,
        "background_threshold": rec.mask.background_threshold,
        "min_presence": rec.mask.min_presence,
        "classes": list(classes),
    }

    out = Path(out)
    _check_folder(out)
    rank, world = distributed.rank_and_world()
    journal, done = open_journal(out, config, rank, 0, on_note)
    beyond = sorted(set(done) - {item.id for item in items})
    if beyond and on_note is not None:
        on_note(
            f"{out} holds {len(beyond)} item(s) beyond this run's {len(items)} (from a larger --count, "
            f"{beyond[0]} ...): left as they are; coco.json lists this run's items only"
        )
    todo = [item for item in items if item.id not in done][rank::world]
    resumed = sum(1 for item in items if item.id in done)
    if on_note is not None:
        on_note(_summary(backend, rec, config, len(items), resumed, world))
    bar = tqdm(todo, desc="generate", unit="img", disable=not progress or rank != 0, dynamic_ncols=True)
    with _quiet(pipe):
        for item in bar:
            generator = torch.Generator().manual_seed(item.seed)
            with trace(backend, words=item.words, layers=layers) as tr:
                result = pipe(item.prompt, generator=generator, **call)
            image = result.images[0]
            seg = tr.segment(item.words, images=[image], **segment_options)
            table = np.array([classes.index(c) for c in seg.classes], dtype=np.uint8)
            ids = table[seg.labels[0].cpu().numpy()]
            with io.atomic_files(item.files(out)) as (image_tmp, label_tmp, overlay_tmp):
                image.save(image_tmp, format="PNG")
                label_image(ids, num_labels=len(classes)).save(label_tmp, format="PNG")
                seg.overlay(0).save(overlay_tmp, format="PNG")
            journal.append(item.id, {})
            del seg, result, tr
    generated = int(distributed.all_reduce_sum(torch.tensor([len(todo)]))[0])
    distributed.barrier()
    if distributed.is_main():
        write_index(out, items, classes, background)
    distributed.barrier()
    return GenerateResult(out, tuple(classes), tuple(items), generated, resumed)


def write_index(out: Path, items: Sequence[Item], classes: Sequence[str], background: bool) -> None:
    """``classes.txt`` and ``coco.json`` of a finished run, from the label maps on disk (image id
    ``index + 1``, file name ``<id>.png`` in ``images/``, with the prompt and seed), written together."""
    from PIL import Image

    from . import io
    from .coco import CocoBuilder

    builder = CocoBuilder(classes, background=background)
    missing = [str(item.files(out)[1]) for item in items if not item.files(out)[1].is_file()]
    if missing:
        raise LavaError(
            f"{len(missing)} label map(s) missing, e.g. {missing[0]}: run the command again to make them"
        )
    for item in items:
        with Image.open(item.files(out)[1]) as im:
            labels = np.asarray(im)
        builder.add(labels, f"{item.id}.png", image_id=item.index + 1, prompt=item.prompt, seed=item.seed)
    data = json.dumps(builder.dataset(description="lava generate"))
    with io.atomic_files([out / CLASSES_FILE, out / COCO_FILE]) as (names_tmp, coco_tmp):
        names_tmp.write_text("\n".join(classes) + "\n")
        coco_tmp.write_text(data)


def _parse(words) -> tuple[str, ...]:
    from .stages.prompts import parse_classes

    return parse_classes(words)


def _prompt_list(prompts) -> list[str]:
    return [prompts] if isinstance(prompts, str) else list(prompts)


def _size(backend, size) -> tuple[int, int]:
    """``(height, width)`` of ``size`` (a side, or ``(height, width)``), checked against the model's
    token grid and position embedding."""
    if size is None:
        side = int(backend.defaults.resolution)
        return side, side
    hw = (size, size) if isinstance(size, int) else tuple(size)
    if len(hw) != 2 or any(isinstance(s, bool) or not isinstance(s, int) or s <= 0 for s in hw):
        raise LavaError(f"size must be a side or (height, width) in pixels, got {size!r}")
    unit, limit = backend.grid_unit, backend.max_resolution
    for side in hw:
        if side % unit:
            lower, upper = max(unit, side // unit * unit), (side // unit + 1) * unit
            raise LavaError(
                f"size {side} px is not a multiple of the token size of {backend.name} ({unit} px): "
                f"use {lower} or {upper}"
            )
        if limit is not None and side > limit:
            raise LavaError(
                f"size {side} px is beyond the position embedding of {backend.name} ({limit} px at most)"
            )
    return hw[0], hw[1]


def _summary(backend, rec, config: dict, total: int, done: int, world: int) -> str:
    """The line a run opens with: what it makes, how, and how the masks are read."""
    mask = rec.mask
    bg = (
        "no background"
        if mask.background_threshold is None
        else f"background below {mask.background_threshold:g}"
    )
    if mask.min_presence is not None:
        bg += f", min presence {mask.min_presence:g}"
    height, width = config["size"]
    guidance = config["guidance"]
    scale = "the pipeline's" if guidance is None else format(guidance, "g")
    left = f"{total - done} of {total} image(s) to make" if done else f"{total} image(s) to make"
    shards = f" over {world} processes" if world > 1 else ""
    return (
        f"{left}{shards} with {backend.name}: {width}x{height} px, {config['steps']} steps, guidance "
        f"{scale}, blocks {list(rec.reading.layers)} traced over every step; masks "
        f"{rec.aggregate.normalize}, {bg}, refine {rec.refine_label or 'none'}"
    )


def _check_folder(out: Path) -> None:
    """Refuse a folder whose images/labels/overlays hold files but that has no journal: it is not a
    dataset ``lava generate`` made, and its files would be overwritten."""
    if any(out.glob("journal.rank*.jsonl")):
        return
    taken = [f for f in FOLDERS if (out / f).is_dir() and any((out / f).iterdir())]
    if taken:
        raise LavaError(
            f"{out} already holds {', '.join(f + '/' for f in taken)} but no lava generate journal: "
            "use a new folder (lava generate writes images/, labels/ and overlays/ itself)"
        )


def _call_default(pipe, name: str):
    """The default of the pipeline call's argument ``name`` (``None`` if it has none)."""
    param = inspect.signature(type(pipe).__call__).parameters.get(name)
    return None if param is None or param.default is inspect.Parameter.empty else param.default


def _check_windows(backend, items: Sequence[Item]) -> None:
    """Each prompt's words located in the text windows the pipeline encodes (as the trace will),
    before anything is written: a word past both windows fails here, not after the first item."""
    from .stages.prompts import word_spans

    for prompt, words in dict((item.prompt, item.words) for item in items).items():
        word_spans(backend, words, prompt, prompt, backend.max_sequence_length)


@contextlib.contextmanager
def _quiet(pipe) -> Iterator[None]:
    """The pipeline's own per-step progress bar off for the run (lava's bar counts the images)."""
    own = vars(pipe).get("_progress_bar_config")
    pipe.set_progress_bar_config(disable=True)
    try:
        yield
    finally:
        if own is None:
            vars(pipe).pop("_progress_bar_config", None)
        else:
            pipe._progress_bar_config = own

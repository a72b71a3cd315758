"""Measure how lava reads ``lava-shapes`` under both protocols, on both held-out splits.

    python -m scripts.measure --scenes 200 --json docs/results/open-vocabulary.json \
        --markdown docs/results/open-vocabulary.md

For each held-out split (``standard``: 1–3 objects; ``hard``: 3–5), each protocol (``present``:
the prompt names the scene's own classes; ``all``: all 12 colour+shape names, most of them
absent) and each setting (``SETTINGS``), every scene is segmented and its predictions
accumulated in one confusion matrix (mIoU over all pixels of the set, mmseg's definition;
background is label 0). All maps are image→text attention of the backend's default block and
timestep; the softmax domain is the joint one (all keys) unless a setting says ``cross``.

The settings share forward passes: one capture per scene and prompt split gives both softmax
domains, and every normalisation, background and presence rule is applied to those maps.
``denoise`` presence costs one extra forward per prompt row and per class.

``--tune`` sweeps the mask grid (``TUNE_GRID``) on other scenes of the same splits (seeds after
the reported ones) and prints the settings ranked by their mean mIoU over the four cells: that
is how the backend's mask defaults were chosen, on scenes the table does not report.
``--label`` tags the rows (e.g. the weights measured), so runs on several models can share one
JSON file and one table.

``--targets`` measures issue #20's target cells (``TARGETS``) on the plain call, each with a 95 %
interval: present colour+shape names, shape-only names and the all-names and unseen-words
protocols on ``standard`` scenes, present names on ``same``-colour scenes. The interval is a
percentile bootstrap over scenes (``bootstrap_cells``: scenes drawn with replacement, mIoU
recomputed from their summed confusion counts); the cells of one split share each draw, so a
ratio to the present cell gets its own (paired) interval. ``--skip K`` starts after the first
``K`` scenes of each split (fresh scenes), ``--tune`` uses tuning scenes instead::

    python -m scripts.measure --targets --scenes 1000 --skip 2200 \
        --json docs/results/targets.json --markdown docs/results/targets.md
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from lava.evaluation.metrics import ConfusionMatrix, SegMetrics
from lava.reference.scenes import COLOURS, SPLITS, class_names, heldout_seeds, make_scene, tuning_seeds
from scripts.sweep import to_global

PROTOCOLS = ("present", "all")
DEFAULT_SPLITS = ("standard", "hard")  # the open-vocabulary table's splits (``same``: --targets)
# --protocols unseen: all 12 names plus 28 words no training caption ever held (issue #20's test of
# names the model does not know); a pixel given to one of them counts as background, i.e. as no
# class of the vocabulary, so it is wrong wherever an object lies.
UNSEEN_WORDS = (
    "cat",
    "dog",
    "car",
    "chair",
    "mountain",
    "tree",
    "person",
    "bird",
    "boat",
    "bottle",
    "bus",
    "cow",
    "horse",
    "sheep",
    "sofa",
    "train",
    "table",
    "plant",
    "road",
    "sky",
    "building",
    "grass",
    "water",
    "house",
    "window",
    "door",
    "lamp",
    "book",
)


@dataclasses.dataclass(frozen=True)
class Setting:
    """One way to turn a forward pass into labels: ``options`` are ``lava.segment`` options
    (``lava.options``; one left out takes the backend's default), except that ``presence`` may
    also be ``"denoise"`` (``lava.stages.presence.denoising_presence``, not a lava.segment rule)."""

    doc: str
    options: tuple[tuple[str, Any], ...] = ()

    @property
    def presence(self) -> str | None:
        return dict(self.options).get("presence")

    def segment_kwargs(self) -> dict[str, Any]:
        """The ``lava.segment`` keywords of this setting (``None``: the backend's default)."""
        if self.presence == "denoise":
            raise ValueError("denoising presence is not a lava.segment keyword")
        return dict(self.options)

    def recipe(self, backend, classes: Sequence[str]):
        """The setting resolved against ``backend`` (``lava.config.recipe``); denoising presence
        reads the model's own maps, peak rule, and swaps the presence in later."""
        from lava.config import recipe

        opts = dict(self.options)
        if opts.get("presence") == "denoise":
            opts["presence"] = "peak"
        return recipe(backend, classes=classes, **opts)


def setting(doc: str, **options: Any) -> Setting:
    return Setting(doc, tuple(options.items()))


# Each row changes one or two things against the plain call, so the table shows what each is worth.
# refine=None takes the backend's default (PAMR for lava-shapes); rows that stand for settings
# from before that default (or from other work) say refine="none".
SETTINGS: dict[str, Setting] = {
    "defaults": setting("the plain call lava.segment(image, classes): the backend's defaults"),
    "minmax-none": setting(
        "per-class min-max, no background, no presence floor (the plain call before the open-vocabulary "
        "defaults)",
        normalize="minmax",
        background_threshold=0,
        min_presence=0,
        refine="none",
    ),
    "minmax-0.4": setting(
        "per-class min-max, background below 0.4 (the hand-tuned flags before the open-vocabulary defaults)",
        normalize="minmax",
        background_threshold=0.4,
        min_presence=0,
        refine="none",
    ),
    "raw": setting(
        "raw probabilities (no normalisation), no background, no refinement: Seg4Diff's choice",
        normalize="none",
        background_threshold=0,
        min_presence=0,
        refine="none",
    ),
    "global-0.4": setting(
        "min-max over all classes of the image together, background below 0.4, no refinement",
        normalize="global",
        background_threshold=0.4,
        min_presence=0,
        refine="none",
    ),
    "minmax-0.4-peak": setting(
        "minmax-0.4 plus the defaults' presence floor on the map peaks",
        normalize="minmax",
        presence="peak",
        background_threshold=0.4,
        refine="none",
    ),
    "defaults-denoise": setting(
        "defaults, presence from the denoising error instead of map peaks", presence="denoise"
    ),
    "defaults-null": setting(
        "defaults, presence against the prompt's non-class tokens (lava.stages.presence.null_presence)",
        presence="null",
    ),
    "defaults-peak": setting(
        "defaults, presence from the map peaks (lava-shapes' rule before #8)", presence="peak"
    ),
    "defaults-cross": setting(
        "defaults, softmax over the text keys only (cross) instead of all keys", softmax="cross"
    ),
    "split-4": setting("defaults, classes forced into prompts of at most 4 names", max_classes_per_prompt=4),
    "split-1": setting("defaults, one prompt per class", max_classes_per_prompt=1),
    # Issue #20: lava-shapes' plain call puts every class in a prompt of its own, presence floor 0.3.
    "before-20": setting(
        "the plain call before issue #20: as many names per prompt as fit, presence floor 0.5",
        max_classes_per_prompt=0,
        min_presence=0.5,
    ),
    "one-prompt": setting("defaults, but as many names per prompt as fit", max_classes_per_prompt=0),
    "split-1-presence-0.5": setting(
        "one prompt per class, presence floor 0.5", max_classes_per_prompt=1, min_presence=0.5
    ),
    "split-1-presence-0.3": setting(
        "one prompt per class, presence floor 0.3", max_classes_per_prompt=1, min_presence=0.3
    ),
    "split-1-presence-0.6": setting(
        "one prompt per class, presence floor 0.6", max_classes_per_prompt=1, min_presence=0.6
    ),
    "defaults-no-refine": setting(
        "defaults without PAMR: the maps as aggregated (the plain call before PAMR became the default)",
        refine="none",
    ),
    "concept": setting(
        "defaults, concept view (lava.concept: attention outputs, softmax over classes) instead of "
        "attention probabilities",
        source="concept",
    ),
    "concept-no-refine": setting("concept view, no refinement", source="concept", refine="none"),
    "propagate-pamr": setting(
        "defaults, maps propagated by the read blocks' own image attention (lava.propagate, 1 step), "
        "then PAMR",
        refine="propagate,pamr",
    ),
    "propagate": setting("maps propagated by the block's image attention, no PAMR", refine="propagate"),
    "seeds-5": setting("defaults, maps averaged over noise seeds 0-4", seeds=(0, 1, 2, 3, 4)),
    "timesteps-3": setting(
        "defaults, maps averaged over timesteps 20, 50, 100", timesteps=(20.0, 50.0, 100.0)
    ),
}

# --tune: every combination, joint softmax, peak and denoise presence.
TUNE_GRID = {
    "normalize": ("minmax", "global"),
    "background_threshold": (0, 0.1, 0.2, 0.3, 0.4, 0.5),
    "min_presence": (0, 0.3, 0.5, 0.7, 0.8, 0.9),
    "presence": ("peak", "denoise", "null"),
    "refine": ("none", "pamr"),
}


def scene_labels(
    backend,
    image: Image.Image,
    classes: Sequence[str],
    settings: Sequence[Setting],
    size: int,
    vocab: str = "colour_shape",
):
    """Label maps ``[size, size]`` of one image under each setting, through ``lava.compose`` (the
    composition ``lava.segment`` runs), as ids of ``class_names(vocab)``: settings that share a
    prompt share its forward passes, and settings whose maps agree (they differ only in the mask
    stage) share those maps."""
    from lava.compose import capture_forwards, forward_key, maps_from_slices, prepare_prompt, segmentation
    from lava.stages.presence import denoising_presence, with_presence
    from lava.types import MaskConfig

    recipes = [s.recipe(backend, classes) for s in settings]
    by_prompt: dict = {}
    for rec in recipes:
        by_prompt.setdefault(rec.prompt, []).append(rec)
    prompts, captured = {}, {}
    for config, group in by_prompt.items():
        prompts[config] = prepare_prompt(backend, classes, config)
        captured[config] = capture_forwards(backend, [image], prompts[config], group)
    maps: dict = {}
    denoised: dict = {}
    out = []
    for s, rec in zip(settings, recipes):
        prompt = prompts[rec.prompt]
        # The maps do not depend on the mask settings: settings differing only there share them.
        key = dataclasses.replace(rec, mask=MaskConfig())
        if key not in maps:
            runs = [
                captured[rec.prompt][forward_key(rec, t, x)][rec.reading.view] for t, x in rec.reading.runs
            ]
            maps[key] = maps_from_slices(runs, prompt, rec, [image])
        heat = maps[key]
        if s.presence == "denoise":  # refinement keeps presence, so it can be swapped in after
            if rec.prompt not in denoised:
                noisy = lava_noise(backend, image, rec)
                denoised[rec.prompt] = denoising_presence(backend, noisy, prompt)
            heat = with_presence(heat, denoised[rec.prompt])
        seg = segmentation(dataclasses.replace(heat, image_sizes=((size, size),)), rec)
        out.append(to_global(seg.labels[0], seg.classes, vocab))
    return out


def lava_noise(backend, image: Image.Image, rec):
    """The noised latents of the recipe's first run (what denoising presence compares against)."""
    import lava

    ((t, seed), *_) = rec.reading.runs
    return lava.noise(backend, image, timestep=t, sigma=rec.reading.sigma, seed=seed)


_COLOUR_OF = np.array(
    [0] + [1 + list(COLOURS).index(n.split()[0]) for n in class_names()[1:]], dtype=np.uint8
)


def colour_ids(labels: np.ndarray) -> np.ndarray:
    """Colour+shape ids → colour ids (0 background, then ``COLOURS`` order): what a model that
    reads colour words but not shape words can get right."""
    return _COLOUR_OF[labels]


def measure_many(
    backend,
    settings: Sequence[Setting],
    split: str,
    protocol: str,
    seeds: Sequence[int],
    *,
    size: int = 64,
    vocab: str = "colour_shape",
    by_colour: list[ConfusionMatrix] | None = None,
    scene_counts: list[list] | None = None,
) -> list[SegMetrics]:
    """One table cell per setting: the settings on the scenes ``seeds`` of ``split``.

    ``by_colour``: an empty list to fill with one colour-level confusion matrix per setting
    (predictions and truth mapped by ``colour_ids``; colour+shape vocabulary only).
    ``scene_counts``: an empty list to fill with one list per setting of each scene's own
    confusion counts ``[C, C + 1]`` (for ``bootstrap_cells``)."""
    names = class_names(vocab)
    cms = [ConfusionMatrix(len(names)) for _ in settings]
    if by_colour is not None:
        if vocab != "colour_shape":
            raise ValueError("colour-level scores need the colour_shape vocabulary")
        by_colour.extend(ConfusionMatrix(1 + len(COLOURS)) for _ in settings)
    if scene_counts is not None:
        scene_counts.extend([] for _ in settings)
    for seed in tqdm(seeds, desc=f"{split}/{protocol}", leave=False):
        scene = make_scene(seed)
        classes = list(scene.present_classes(vocab) if protocol == "present" else names[1:])
        if protocol == "unseen":
            classes += UNSEEN_WORDS
        truth = scene.labels(size, vocab)
        preds = scene_labels(backend, Image.fromarray(scene.render(size)), classes, settings, size, vocab)
        for k, pred in enumerate(preds):
            one = ConfusionMatrix(len(names))
            one.update(pred, truth)
            cms[k].merge(one)
            if scene_counts is not None:
                scene_counts[k].append(one.counts)
            if by_colour is not None:
                by_colour[k].update(colour_ids(pred), colour_ids(truth))
    return [cm.compute(names) for cm in cms]


# ---- issue #20's targets ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Target:
    """One target cell: ``protocol`` on ``split`` in ``vocab``, at least ``target`` mIoU, or at
    least ``target`` × the mIoU of cell ``of`` (a ratio target)."""

    cell: str
    doc: str
    split: str
    protocol: str
    vocab: str
    target: float
    of: str | None = None


TARGETS = (
    Target("present", "present colour+shape names", "standard", "present", "colour_shape", 0.85),
    Target("shape", "shape-only names", "standard", "present", "shape", 0.75),
    Target("same", "same-colour scenes, present names", "same", "present", "colour_shape", 0.75),
    Target("all", "all 12 names", "standard", "all", "colour_shape", 0.8, of="present"),
    Target(
        "unseen",
        f"12 names + {len(UNSEEN_WORDS)} unseen words",
        "standard",
        "unseen",
        "colour_shape",
        0.7,
        of="present",
    ),
)


def miou_of_counts(counts: np.ndarray) -> np.ndarray:
    """mIoU of confusion counts ``[..., C, C + 1]`` (the last column: predictions outside the
    vocabulary), as ``compute_metrics`` defines it, for every leading index at once."""
    c = counts.shape[-2]
    m = counts[..., :, :c].astype(np.float64)
    tp = np.diagonal(m, axis1=-2, axis2=-1)
    union = m.sum(-1) + counts[..., :, c] + m.sum(-2) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / np.where(union > 0, union, 1), np.nan)
    defined = (union > 0).sum(-1)
    return np.where(defined > 0, np.nansum(iou, -1) / np.maximum(defined, 1), np.nan)


def bootstrap_cells(
    counts: dict[str, Sequence], groups: dict[str, str], *, samples: int = 1000, seed: int = 0
) -> dict[str, np.ndarray]:
    """``{cell: [samples]}`` bootstrap mIoU of each cell from its scenes' confusion counts.

    ``counts[cell]`` holds one ``[C, C + 1]`` per scene; cells of the same ``groups[cell]`` (the
    split: the same scenes, in the same order) share each draw of scenes with replacement, so
    their ratios are paired. Each draw's mIoU is recomputed from the drawn scenes' summed counts
    (the dataset definition), as ``lava.evaluation.metrics.bootstrap_miou`` does."""
    rng = np.random.default_rng(seed)
    weights: dict[str, np.ndarray] = {}
    out = {}
    for cell, per_scene in counts.items():
        stacked = np.stack([np.asarray(c, dtype=np.int64) for c in per_scene])  # [n, C, C + 1]
        n = len(stacked)
        group = groups[cell]
        if group not in weights:
            draws = rng.integers(0, n, (samples, n))
            weights[group] = np.stack([np.bincount(d, minlength=n) for d in draws])  # [samples, n]
        w = weights[group]
        if w.shape[1] != n:
            raise ValueError(f"cells of group {group!r} must hold the same scenes: {w.shape[1]} vs {n}")
        total = (w @ stacked.reshape(n, -1)).reshape(samples, *stacked.shape[1:])
        out[cell] = miou_of_counts(total)
    return out


def interval(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    tail = 100 * (1 - level) / 2
    low, high = np.nanpercentile(values, [tail, 100 - tail])
    return float(low), float(high)


def measure_targets(
    backend,
    settings: dict[str, Setting],
    seeds_of,
    *,
    samples: int = 1000,
    targets: Sequence[Target] = TARGETS,
) -> list[dict]:
    """One row per setting and target cell: mIoU, its 95 % bootstrap interval, and for a ratio
    target the ratio to its reference cell with a paired interval. ``seeds_of(split)`` gives
    each split's scenes."""
    counts: dict[str, dict[str, list]] = {name: {} for name in settings}
    meta: dict[str, tuple[int, float]] = {}
    for t in targets:
        start = time.time()
        per_setting: list[list] = []
        seeds = seeds_of(t.split)
        measure_many(
            backend,
            list(settings.values()),
            t.split,
            t.protocol,
            seeds,
            vocab=t.vocab,
            scene_counts=per_setting,
        )
        meta[t.cell] = (len(seeds), round(time.time() - start, 1))
        for name, per_scene in zip(settings, per_setting):
            counts[name][t.cell] = per_scene
    rows = []
    groups = {t.cell: t.split for t in targets}
    for name in settings:
        boot = bootstrap_cells(counts[name], groups, samples=samples)
        for t in targets:
            total = np.sum(np.stack([np.asarray(c) for c in counts[name][t.cell]]), 0)
            value = float(miou_of_counts(total))
            row = {
                "setting": name,
                "cell": t.cell,
                "doc": t.doc,
                "split": t.split,
                "protocol": t.protocol,
                "vocab": t.vocab,
                "scenes": meta[t.cell][0],
                "first_seed": int(seeds_of(t.split)[0]),
                "miou": round(value, 4),
                "interval": [round(v, 4) for v in interval(boot[t.cell])],
                "target": t.target,
                "seconds_all_settings": meta[t.cell][1],
            }
            measured = value
            if t.of is not None:
                ref = np.sum(np.stack([np.asarray(c) for c in counts[name][t.of]]), 0)
                measured = value / float(miou_of_counts(ref))
                row["of"] = t.of
                row["ratio"] = round(measured, 4)
                row["ratio_interval"] = [round(v, 4) for v in interval(boot[t.cell] / boot[t.of])]
            low = row["ratio_interval" if t.of else "interval"][0]
            row["met"] = bool(measured >= t.target)
            row["interval_above"] = bool(low >= t.target)
            rows.append(row)
    return rows


def targets_markdown(rows: list[dict]) -> str:
    """The target rows as Markdown: one table per setting."""
    out = []
    for name in dict.fromkeys(r["setting"] for r in rows):
        out += [
            f"Setting `{name}`:",
            "",
            "| cell | scenes | mIoU (95 % interval) | ratio to present (95 % interval) | target | met? |",
            "|---|---:|---:|---:|---:|---|",
        ]
        for r in (r for r in rows if r["setting"] == name):
            lo, hi = r["interval"]
            where = f"{r['split']} split, seeds from {r['first_seed']:,}"
            value = f"{r['miou']:.3f} ({lo:.3f}–{hi:.3f})"
            if "ratio" in r:
                rlo, rhi = r["ratio_interval"]
                ratio, target = f"{r['ratio']:.3f} ({rlo:.3f}–{rhi:.3f})", f"≥ {r['target']:g} × present"
            else:
                ratio, target = "", f"≥ {r['target']:g}"
            met = ("yes" if r["interval_above"] else "yes (interval reaches below)") if r["met"] else "no"
            out.append(f"| {r['doc']} ({where}) | {r['scenes']} | {value} | {ratio} | {target} | {met} |")
        out.append("")
    return "\n".join(out)


def figure(backend, settings: dict[str, Setting], seeds: Sequence[int], path: Path, size: int = 64) -> None:
    """A PNG grid: one row per scene (all 12 names given), columns image, truth, then each
    setting's label map, coloured by class (the VOC palette of the global class ids)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lava.viz import palette

    names = class_names("colour_shape")
    pal = palette(len(names)) / 255.0
    cols = ["image", "truth", *settings]
    size_in = (1.6 * len(cols), 1.7 * len(seeds))
    fig, axes = plt.subplots(len(seeds), len(cols), figsize=size_in, squeeze=False)
    for r, seed in enumerate(seeds):
        scene = make_scene(seed)
        image = Image.fromarray(scene.render(size))
        truth = scene.labels(size)
        preds = scene_labels(backend, image, list(names[1:]), list(settings.values()), size)
        panels = [np.asarray(image), pal[truth]] + [pal[np.asarray(p)] for p in preds]
        for c, (title, panel) in enumerate(zip(cols, panels, strict=True)):
            ax = axes[r, c]
            ax.imshow(panel, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(title, fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(rows: list[dict], metric: str = "miou") -> str:
    """The results as a Markdown table: one row per (label, setting), one column per cell;
    ``metric="miou"`` shows mIoU (pixel accuracy), ``"colour_miou"`` the colour-level mIoU."""
    splits = [sp for sp in SPLITS if any(r["split"] == sp for r in rows)]
    protocols = [pr for pr in (*PROTOCOLS, "unseen") if any(r["protocol"] == pr for r in rows)]
    cells = [(sp, pr) for sp in splits for pr in protocols]
    keys = list(dict.fromkeys((r["label"], r["setting"]) for r in rows))
    found = {(r["label"], r["setting"], r["split"], r["protocol"]): r for r in rows}
    head = "| model | setting | " + " | ".join(f"{sp} / {pr}" for sp, pr in cells) + " |"
    lines = [head, "|" + "---|" * (2 + len(cells))]
    for label, setting in keys:
        out = []
        for sp, pr in cells:
            r = found.get((label, setting, sp, pr))
            if r is None or metric not in r:
                out.append("—")
            elif metric == "miou":
                out.append(f"{r['miou']:.3f} ({r['pixel_accuracy']:.3f})")
            else:
                out.append(f"{r[metric]:.3f}")
        lines.append(f"| {label} | {setting} | " + " | ".join(out) + " |")
    return "\n".join(lines) + "\n"


def parse_grid(text: str | None) -> dict[str, tuple]:
    """``TUNE_GRID`` with some axes narrowed: ``"normalize=minmax;min_presence=0.3,0.5"``."""
    grid = dict(TUNE_GRID)
    for item in filter(None, (text or "").split(";")):
        key, _, values = item.partition("=")
        if key not in grid:
            raise ValueError(f"unknown tuning axis {key!r}: expected one of {list(grid)}")
        cast = type(grid[key][0])
        grid[key] = tuple(v if cast is str else float(v) for v in values.split(","))
    return grid


def tune_settings(grid: dict[str, tuple] | None = None) -> dict[str, Setting]:
    out = {}
    for norm, bg, pres, how, refine in itertools.product(*(grid or TUNE_GRID).values()):
        if how != "peak" and pres == 0:
            continue
        out[f"{norm} bg={bg} presence={how}>={pres} refine={refine}"] = setting(
            "tuning", normalize=norm, background_threshold=bg, min_presence=pres, presence=how, refine=refine
        )
    return out


def main(argv: list[str] | None = None) -> None:
    import lava

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenes", type=int, default=200, help="held-out scenes per split")
    p.add_argument("--weights", default=None, help="model folder (default: the shipped weights)")
    p.add_argument("--label", default="lava-shapes", help="name of this model in the table")
    p.add_argument("--settings", default=",".join(SETTINGS), help=f"comma-separated, of {list(SETTINGS)}")
    p.add_argument("--splits", default=",".join(DEFAULT_SPLITS), help=f"comma-separated, of {list(SPLITS)}")
    p.add_argument("--protocols", default=",".join(PROTOCOLS))
    p.add_argument("--json", default=None, help="results file; rows of other labels in it are kept")
    p.add_argument("--markdown", default=None, help="also write the table here")
    p.add_argument("--timestep", type=float, default=None, help="timestep to read (default: the model's)")
    p.add_argument("--layers", default=None, help="comma-separated blocks to read (default: the model's)")
    p.add_argument(
        "--tune", action="store_true", help="rank TUNE_GRID on --scenes tuning seeds (after the first 200)"
    )
    p.add_argument(
        "--grid",
        default=None,
        help="with --tune, narrow axes of TUNE_GRID, e.g. 'normalize=minmax;min_presence=0.3,0.5'",
    )
    p.add_argument(
        "--targets",
        action="store_true",
        help="measure issue #20's target cells (TARGETS) with 95%% bootstrap intervals; --settings defaults "
        "to the plain call here",
    )
    p.add_argument(
        "--skip", type=int, default=0, help="start after the first K held-out scenes of each split"
    )
    p.add_argument("--samples", type=int, default=1000, help="bootstrap draws of scenes for --targets")
    p.add_argument(
        "--figure",
        default=None,
        help="also draw the first 4 hard held-out scenes (all 12 names) under each setting to this PNG",
    )
    a = p.parse_args(argv)
    if not a.tune and not a.json and not a.figure and not a.targets:
        p.error("--json is required (or --tune, --targets or --figure)")
    if a.tune and a.skip:
        p.error("--skip picks held-out scenes; --tune always uses the tuning scenes")
    if a.targets and a.settings == p.get_default("settings"):
        a.settings = "defaults"

    backend = lava.load_backend("lava-shapes", **({"path": a.weights} if a.weights else {}))
    if a.timestep is not None or a.layers:
        layers = tuple(int(x) for x in a.layers.split(",")) if a.layers else backend.defaults.layers
        timestep = a.timestep if a.timestep is not None else backend.defaults.timestep
        backend.defaults = dataclasses.replace(backend.defaults, timestep=timestep, layers=layers)
    if a.tune and not a.targets:
        named = tune_settings(parse_grid(a.grid))
    else:
        unknown = [n for n in a.settings.split(",") if n not in SETTINGS]
        if unknown:
            p.error(f"unknown settings {unknown}: expected some of {list(SETTINGS)}")
        named = {n: SETTINGS[n] for n in a.settings.split(",")}
    if a.figure:
        figure(backend, named, heldout_seeds(4, "hard"), Path(a.figure))
        if not a.json:
            return
    if a.targets:
        return report_targets(backend, named, a)
    path = Path(a.json) if a.json else None
    rows = json.loads(path.read_text()) if path and path.exists() else []
    scores: dict[str, list[float]] = {n: [] for n in named}
    for split in a.splits.split(","):
        seeds = tuning_seeds(a.scenes, split) if a.tune else heldout_seeds(a.scenes, split, a.skip)
        for protocol in a.protocols.split(","):
            start = time.time()
            colour: list[ConfusionMatrix] = []
            results = measure_many(backend, list(named.values()), split, protocol, seeds, by_colour=colour)
            took = round(time.time() - start, 1)
            for name, m, cm in zip(named, results, colour):
                scores[name].append(m.miou)
                if a.tune:
                    continue
                row = {
                    "label": a.label,
                    "setting": name,
                    "split": split,
                    "protocol": protocol,
                    "scenes": a.scenes,
                    **({"skip": a.skip} if a.skip else {}),
                    "miou": round(m.miou, 4),
                    "pixel_accuracy": round(m.pixel_accuracy, 4),
                    "colour_miou": round(cm.compute(("background", *COLOURS)).miou, 4),
                    "seconds_all_settings": took,
                }
                print(json.dumps(row), flush=True)
                rows = [
                    r
                    for r in rows
                    if (r["label"], r["setting"], r["split"], r["protocol"])
                    != (a.label, name, split, protocol)
                ] + [row]
    if a.tune:
        ranked = sorted(scores.items(), key=lambda kv: -float(np.mean(kv[1])))
        for name, cells in ranked:
            print(f"{np.mean(cells):.4f}  " + " ".join(f"{c:.3f}" for c in cells) + f"  {name}")
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, indent=1) + "\n")
    if a.markdown:
        Path(a.markdown).write_text(
            "mIoU (pixel accuracy), colour+shape classes:\n\n"
            + markdown(rows)
            + "\nColour-level mIoU (predictions and truth mapped to their colour):\n\n"
            + markdown(rows, "colour_miou")
        )


def report_targets(backend, named: dict[str, Setting], a) -> None:
    """``--targets``: print (and with ``--json``/``--markdown`` write) the target table."""

    def seeds_of(split: str) -> list[int]:
        return tuning_seeds(a.scenes, split) if a.tune else heldout_seeds(a.scenes, split, a.skip)

    rows = measure_targets(backend, named, seeds_of, samples=a.samples)
    for row in rows:
        row["label"] = a.label
        print(json.dumps(row), flush=True)
    table = targets_markdown(rows)
    print(table)
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(rows, indent=1) + "\n")
    if a.markdown:
        seeds = "tuning scenes" if a.tune else f"held-out scenes after the first {a.skip} of each split"
        Path(a.markdown).write_text(
            f"Issue #20's targets, {a.label}, {a.scenes} {seeds}; 95 % percentile bootstrap intervals over "
            f"scenes ({a.samples} draws; the cells of a split share each draw, so ratios are paired):\n\n"
            + table
        )


if __name__ == "__main__":
    main()

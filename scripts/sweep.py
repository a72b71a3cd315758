"""Measure ``lava-shapes`` on held-out scenes: one setting (``evaluate``) or a timestep × layer grid.

    python -m scripts.sweep --scenes 200 --figure docs/figures/reference_sweep.png

Protocol: each held-out scene (seeds from ``HELDOUT_START``) is rendered at ``size`` px and
segmented by lava with the names of the classes it contains, in one of two vocabularies
(``"red circle"``… or ``"circle"``…). Background is a class named ``"background"`` in the
prompt (``background="class"``) or a threshold on the min-max normalised maps (a float).
Predictions are mapped to the vocabulary's global ids and accumulated in one
``ConfusionMatrix`` per setting, so mIoU is over all pixels of the set (mmseg's definition).
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from lava.evaluation.metrics import ConfusionMatrix, SegMetrics, bootstrap_miou
from lava.reference.scenes import BACKGROUND, VOCABS, class_names, heldout_seeds, make_scene, tuning_seeds

Background = str | float  # "class" or a threshold


@dataclass(frozen=True)
class Setting:
    """One way of reading the model: when, where, and how background is decided."""

    timestep: float
    layers: tuple[int, ...]
    background: Background = "class"


def prompt_classes(names: Sequence[str], background: Background) -> tuple[str, ...]:
    """The classes to prompt with: the scene's names, plus ``"background"`` first if it is a class."""
    return (BACKGROUND, *names) if background == "class" else tuple(names)


def to_global(labels: torch.Tensor, classes: Sequence[str], vocab: str) -> np.ndarray:
    """Per-prompt label ids → ids of ``class_names(vocab)`` (background, named or not, is 0; a name
    outside the vocabulary, such as measure's unseen words, also maps to 0: no class of it)."""
    ids = class_names(vocab)
    lut = np.array([ids.index(c) if c in ids else 0 for c in classes], dtype=np.uint8)
    return lut[labels.numpy()]


def evaluate(
    backend,
    seeds: Sequence[int],
    setting: Setting,
    *,
    vocab: str = "colour_shape",
    size: int = 64,
    full_vocabulary: bool = False,
    refine: str | None = "none",
    scene_counts: list | None = None,
) -> SegMetrics:
    """Held-out metrics of one setting via ``lava.segment`` (the public path, as users call it).

    ``full_vocabulary`` prompts every class of the vocabulary instead of the scene's own.
    ``refine``: ``"none"`` (default) measures the attention reading itself, as the sweep and the
    reference-model table report it; ``None`` adds the backend's default refinement (PAMR).
    ``scene_counts``, when given, receives each scene's own confusion counts (for
    ``bootstrap_miou``).
    """
    import lava
    from lava.types import MaskConfig

    names = class_names(vocab)
    cm = ConfusionMatrix(len(names))
    for seed in seeds:
        scene = make_scene(seed)
        present = names[1:] if full_vocabulary else scene.present_classes(vocab)
        classes = prompt_classes(present, setting.background)
        threshold = None if setting.background == "class" else float(setting.background)
        seg = lava.segment(
            Image.fromarray(scene.render(size)),
            list(classes),
            backend=backend,
            timestep=setting.timestep,
            layers=setting.layers,
            mask_config=MaskConfig(background_threshold=threshold),
            refine=refine,
        )
        scene_cm = ConfusionMatrix(len(names))
        scene_cm.update(to_global(seg.labels[0], seg.classes, vocab), scene.labels(size, vocab))
        cm.merge(scene_cm)
        if scene_counts is not None:
            scene_counts.append(scene_cm.counts)
    return cm.compute(names)


def baseline(seeds: Sequence[int], vocab: str, size: int = 64) -> SegMetrics:
    """Metrics of labelling every pixel background."""
    names = class_names(vocab)
    cm = ConfusionMatrix(len(names))
    for seed in seeds:
        gt = make_scene(seed).labels(size, vocab)
        cm.update(np.zeros_like(gt), gt)
    return cm.compute(names)


def sweep(
    backend,
    seeds: Sequence[int],
    timesteps: Sequence[float],
    layer_sets: Sequence[tuple[int, ...]],
    thresholds: Sequence[float] = (0.1, 0.2, 0.3, 0.4, 0.5),
    *,
    size: int = 64,
) -> dict[tuple, float]:
    """mIoU of every (vocab, background, timestep, layers) combination: one forward per prompt/time.

    Uses the stages directly so that one capture of all blocks serves every layer subset.
    """
    import lava

    all_layers = tuple(range(backend.num_blocks))
    backgrounds: list[Background] = ["class", *thresholds]
    cms = {
        (v, bg, t, ls): ConfusionMatrix(len(class_names(v)))
        for v, bg, t, ls in itertools.product(VOCABS, backgrounds, timesteps, layer_sets)
    }
    for seed in seeds:
        scene = make_scene(seed)
        image = Image.fromarray(scene.render(size))
        noisy = {t: lava.noise(backend, image, timestep=t) for t in timesteps}
        for vocab in VOCABS:
            gt = scene.labels(size, vocab)
            for named in (True, False):
                classes = prompt_classes(scene.present_classes(vocab), "class" if named else 0.5)
                prompt = lava.encode_prompt(backend, list(classes))
                for t in timesteps:
                    slices = lava.capture(backend, noisy[t], prompt, layers=all_layers, early_exit=False)
                    for ls in layer_sets:
                        heat = lava.aggregate(slices, prompt, layers=ls)
                        if named:
                            seg = lava.to_mask(heat)
                            cms[vocab, "class", t, ls].update(
                                to_global(seg.labels[0], seg.classes, vocab), gt
                            )
                            continue
                        for thr in thresholds:
                            seg = lava.to_mask(heat, background_threshold=thr)
                            cms[vocab, thr, t, ls].update(to_global(seg.labels[0], seg.classes, vocab), gt)
    return {k: cm.compute(class_names(k[0])).miou for k, cm in cms.items()}


def layer_label(ls: tuple[int, ...], n: int) -> str:
    return "all" if ls == tuple(range(n)) else "+".join(str(i) for i in ls)


def plot(
    results: dict[tuple, float],
    timesteps: Sequence[float],
    layer_sets: Sequence[tuple[int, ...]],
    background: Background,
    n_blocks: int,
    path: str,
) -> None:
    """Heatmaps of mIoU over timestep (rows) × layers (columns), one panel per vocabulary."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(VOCABS), figsize=(4.6 * len(VOCABS), 0.45 * len(timesteps) + 1.8))
    for ax, vocab in zip(axes, VOCABS):
        grid = np.array([[results[vocab, background, t, ls] for ls in layer_sets] for t in timesteps])
        im = ax.imshow(grid, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
        for (r, c), v in np.ndenumerate(grid):
            ax.text(c, r, f"{v:.2f}", ha="center", va="center", color="w" if v < 0.6 else "k", fontsize=8)
        ax.set_xticks(range(len(layer_sets)), [layer_label(ls, n_blocks) for ls in layer_sets])
        ax.set_yticks(range(len(timesteps)), [f"{t:g}" for t in timesteps])
        ax.set_xlabel("blocks averaged")
        if ax is axes[0]:
            ax.set_ylabel("timestep t = 1000·σ")
        names = "colour+shape" if vocab == "colour_shape" else "shape-only"
        bg = "named" if background == "class" else f"below {background:g}"
        ax.set_title(f"held-out mIoU, {names} names\n(present protocol, background {bg})", fontsize=10)
    fig.colorbar(im, ax=list(axes), shrink=0.8)
    fig.savefig(path, dpi=120, bbox_inches="tight")


def main(argv: list[str] | None = None) -> None:
    import lava

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenes", type=int, default=200, help="held-out scenes to measure on")
    p.add_argument("--weights", default=None, help="model folder (default: the shipped weights)")
    p.add_argument("--timesteps", default="25,50,100,150,200,300,400,500,700,900")
    p.add_argument("--size", type=int, default=64, help="scene size in pixels")
    p.add_argument("--figure", default=None, help="write the timestep × layer heatmap PNG here")
    p.add_argument("--json", default=None, help="write all results as JSON here")
    p.add_argument(
        "--tune",
        action="store_true",
        help="measure on --scenes tuning seeds (after the 200 every reported number may use; "
        "the scenes measure --tune uses) instead of the first held-out seeds",
    )
    p.add_argument(
        "--skip",
        type=int,
        default=0,
        help="leave out the first SKIP held-out seeds (e.g. 1200: scenes no tuning run has used)",
    )
    p.add_argument(
        "--reading-point",
        action="store_true",
        help="instead of the grid: evaluate the model's own block, timestep and background threshold "
        "on both vocabularies, without refinement and with the model's default one",
    )
    a = p.parse_args(argv)

    backend = lava.load_backend("lava-shapes", **({"path": a.weights} if a.weights else {}))
    if a.skip and a.tune:
        p.error("--skip and --tune both choose the seeds: give one")
    seeds = tuning_seeds(a.scenes) if a.tune else heldout_seeds(a.scenes, skip=a.skip)
    if a.reading_point:
        d = backend.defaults
        point = Setting(timestep=d.timestep, layers=d.layers, background=d.background_threshold)
        bg = d.background_threshold
        print(f"{len(seeds)} scenes, block(s) {list(d.layers)}, t={d.timestep:g}, background < {bg}")
        for vocab in VOCABS:
            runs = {}
            for refine in ("none", None):
                counts: list = []
                miou = evaluate(
                    backend, seeds, point, vocab=vocab, size=a.size, refine=refine, scene_counts=counts
                ).miou
                low, high = bootstrap_miou(counts, class_names(vocab))
                runs[refine] = f"{miou:.3f} (95% over scenes {low:.3f}-{high:.3f})"
            print(f"{vocab}: mIoU {runs['none']} without refinement, {runs[None]} with {d.refine or 'none'}")
        return
    timesteps = [float(t) for t in a.timesteps.split(",")]
    n = backend.num_blocks
    layer_sets = [(i,) for i in range(n)] + [tuple(range(n))]
    start = time.time()
    results = sweep(backend, seeds, timesteps, layer_sets, size=a.size)
    print(f"{len(seeds)} scenes, {time.time() - start:.0f}s")
    for vocab in VOCABS:
        print(f"all-background baseline ({vocab}): mIoU {baseline(seeds, vocab, a.size).miou:.3f}")
    backgrounds = sorted({k[1] for k in results}, key=str)
    for vocab, bg in itertools.product(VOCABS, backgrounds):
        print(f"\n{vocab}, background={bg}")
        print("t".rjust(6) + "".join(layer_label(ls, n).rjust(8) for ls in layer_sets))
        for t in timesteps:
            print(f"{t:6g}" + "".join(f"{results[vocab, bg, t, ls]:8.3f}" for ls in layer_sets))
    if a.figure:
        plot(results, timesteps, layer_sets, backend.defaults.background_threshold, n, a.figure)
    if a.json:
        rows = [
            {"vocab": v, "background": bg, "timestep": t, "layers": list(ls), "miou": m}
            for (v, bg, t, ls), m in results.items()
        ]
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()

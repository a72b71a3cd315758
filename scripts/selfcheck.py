"""Self-check of ``lava generate`` on lava-shapes: do the traced masks cover what was drawn?

    nice python -m scripts.selfcheck --count 100 --out runs/selfcheck

Captions come from held-out scenes (``make_scene(seed).caption()`` for the first ``--count`` seeds
of the ``standard`` split, e.g. ``"a red circle and a blue square"``). ``lava.generate`` makes one
image of each with the shipped model (``--steps`` 20, ``--seed`` 0, the model's mask defaults) and
segments it into the caption's object names (``--words objects``: ``"red circle"``, ...) or its
colour words (``--words colours``: ``"red"``, ...).

The reference is the generated image's own colours: the scene colours are saturated and the
backgrounds grey, so a pixel whose channel spread (max − min) is at least ``SATURATED`` is the
scene colour nearest to it (RGB distance), one below ``GREY`` is background, and the few in
between (anti-aliased edges) are ignored. Each predicted class becomes its colour (``"red circle"``
→ red), and one confusion matrix over background + the four colours is accumulated over every
pixel of the set: mIoU as ``lava eval`` computes it (mmseg's definition). The same rule applied to
rendered scenes against their exact label maps (``reference_check``) says how good the reference
itself is.

The generation goes through ``lava.generate`` into ``--out`` (resumable): a rerun scores again
without generating. ``tests/test_generate.py`` gates a few captions against the number this
prints; docs/trace.md records it.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # busy-waiting threads crawl on shared cores

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from lava.evaluation.metrics import ConfusionMatrix
from lava.reference.scenes import COLOURS, class_names, heldout_seeds, make_scene

LABELS = ("background", *COLOURS)  # reference label ids: 0 background, 1.. the scene colours
SATURATED = 60  # channel spread (max - min) from which a pixel is a scene colour
GREY = 40  # below which it is background (the scene backgrounds' tint spreads at most 24)
IGNORE = 255
WORD_KINDS = ("objects", "colours")


def colour_reference(image: np.ndarray) -> np.ndarray:
    """``[H, W]`` uint8 label ids of ``LABELS`` from an RGB image's own colours (``IGNORE`` between
    grey and saturated)."""
    rgb = np.asarray(image, dtype=np.float32)[..., :3]
    spread = rgb.max(-1) - rgb.min(-1)
    centres = np.asarray(list(COLOURS.values()), dtype=np.float32)
    nearest = np.linalg.norm(rgb[..., None, :] - centres, axis=-1).argmin(-1)
    out = np.full(spread.shape, IGNORE, dtype=np.uint8)
    out[spread < GREY] = 0
    saturated = spread >= SATURATED
    out[saturated] = nearest[saturated] + 1
    return out


def colour_of(name: str) -> int:
    """The reference label of a class name: its colour word's, or 0 (background)."""
    first = name.split()[0]
    return LABELS.index(first) if first in COLOURS else 0


def captions(count: int) -> list[str]:
    return [make_scene(seed).caption() for seed in heldout_seeds(count, "standard")]


def words_of(prompts: Sequence[str], kind: str) -> list[str]:
    """The class names of ``kind`` that occur in ``prompts`` (in class order)."""
    names = [n for n in class_names("colour_shape")[1:]] if kind == "objects" else list(COLOURS)
    return [n for n in names if any(f" {n} " in f" {p} " for p in prompts)]


def score_folder(out: Path, shift: int = 0) -> ConfusionMatrix:
    """One confusion matrix (``LABELS``) over every item of a generated folder: each label map
    against the colours of its own image, or with ``shift`` those of the image ``shift`` items on
    (a baseline: what masks score that do not follow their image)."""
    classes = (out / "classes.txt").read_text().split("\n")
    table = np.array([colour_of(c) for c in classes if c], dtype=np.uint8)
    labels = sorted((out / "labels").glob("*.png"))
    cm = ConfusionMatrix(len(LABELS), IGNORE)
    for i, label_path in enumerate(labels):
        image_path = out / "images" / labels[(i + shift) % len(labels)].name
        image = np.asarray(Image.open(image_path).convert("RGB"))
        predicted = table[np.asarray(Image.open(label_path))]
        cm.update(predicted, colour_reference(image))
    return cm


def reference_check(count: int, size: int = 64) -> ConfusionMatrix:
    """The colour rule on rendered held-out scenes against their exact label maps (colour ids)."""
    cm = ConfusionMatrix(len(LABELS), IGNORE)
    names = class_names("colour_shape")
    table = np.array([colour_of(n) for n in names], dtype=np.uint8)
    for seed in heldout_seeds(count, "standard"):
        scene = make_scene(seed)
        cm.update(colour_reference(scene.render(size)), table[scene.labels(size)])
    return cm


def selfcheck(
    count: int,
    out: Path,
    *,
    words: str = "objects",
    steps: int = 20,
    seed: int = 0,
    backend="lava-shapes",
    progress: bool = True,
) -> dict:
    """Generate ``count`` captions into ``out`` and score them; returns the numbers as a dict."""
    import lava

    prompts = captions(count)
    start = time.time()
    kinds = words_of(prompts, words)
    result = lava.generate(prompts, kinds, out, backend=backend, steps=steps, seed=seed, progress=progress)
    seconds = time.time() - start
    metrics = score_folder(out).compute(LABELS)
    shifted = score_folder(out, shift=1).compute(LABELS)
    return {
        "count": count,
        "words": words,
        "steps": steps,
        "seed": seed,
        "miou": metrics.miou,
        "pixel_accuracy": metrics.pixel_accuracy,
        "per_class_iou": metrics.per_class_iou,
        "shifted_miou": shifted.miou,
        "generated": result.generated,
        "seconds": round(seconds, 1),
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--count", type=int, default=100, help="captions (held-out scenes), one image each")
    p.add_argument("--out", default="runs/selfcheck", help="the generated dataset (resumable)")
    p.add_argument(
        "--words", choices=WORD_KINDS, default="objects", help="the classes read from each caption"
    )
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the numbers here")
    args = p.parse_args(argv)
    out = Path(args.out) / args.words
    numbers = selfcheck(args.count, out, words=args.words, steps=args.steps, seed=args.seed)
    ref = reference_check(args.count).compute(LABELS)
    numbers["reference_rule"] = {"miou": ref.miou, "pixel_accuracy": ref.pixel_accuracy}
    head = f"{args.count} captions, {args.words}, {args.steps} steps"
    print(
        f"{head}: mIoU {numbers['miou']:.3f}, pixel accuracy {numbers['pixel_accuracy']:.3f} (colour "
        f"reference on rendered scenes: mIoU {ref.miou:.3f}, pixel accuracy {ref.pixel_accuracy:.3f}); "
        f"{numbers['generated']} generated in {numbers['seconds']} s"
    )
    print(f"  masks scored against the next item's image instead: mIoU {numbers['shifted_miou']:.3f}")
    ious = numbers["per_class_iou"].items()
    print("  per colour IoU: " + ", ".join(f"{k} {v:.3f}" for k, v in ious if v is not None))
    if args.json:
        Path(args.json).write_text(json.dumps(numbers, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

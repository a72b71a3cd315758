"""Procedural scenes for the ``lava-shapes`` reference model: coloured shapes on a plain background.

A scene is a few objects (circle, square or triangle in red, green, blue or yellow) of varied
size and position, possibly overlapping, on a neutral background that is plain or lightly
textured. Everything is drawn from ``numpy.random.default_rng(seed)``, so a seed *is* the scene;
geometry lives in unit coordinates and can be rendered at any size, with an exact label map.

Splits are seed ranges, so no held-out scene was ever seen in training:

* training: seeds below ``HELDOUT_START``, 1–5 objects (``OBJECT_COUNTS["train"]``);
* ``standard`` held-out: seeds from ``HELDOUT_START``, 1–3 objects;
* ``hard`` held-out: seeds from ``HARD_START``, 3–5 smaller objects, meant to be segmented with
  the full 12-class vocabulary named (most of it absent from each scene);
* ``same`` held-out: seeds from ``SAME_START``, 2–3 objects that all share one colour, so only
  the shape words tell them apart (issue #20's same-colour cell).

Two class vocabularies share one label map:

* ``"colour_shape"`` — ``background`` + the 12 names ``"red circle"`` … ``"yellow triangle"``;
* ``"shape"`` — ``background`` + ``"circle"``, ``"square"``, ``"triangle"``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 45, 40),
    "green": (45, 165, 65),
    "blue": (45, 85, 215),
    "yellow": (235, 205, 40),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
BACKGROUND = "background"
TEXTURES: tuple[str, ...] = ("plain", "gradient", "noise", "stripes")

TRAIN_SEEDS = range(0, 1_000_000)
HELDOUT_START = 1_000_000
HARD_START = 2_000_000
SAME_START = 3_000_000
SPLITS: dict[str, int] = {"standard": HELDOUT_START, "hard": HARD_START, "same": SAME_START}
VOCABS = ("colour_shape", "shape")
# How many objects a scene holds, with probabilities. ``standard`` is the generator the first
# model was measured on (kept identical so numbers stay comparable); training covers both splits.
OBJECT_COUNTS: dict[str, dict[int, float]] = {
    "standard": {1: 0.25, 2: 0.45, 3: 0.30},
    "hard": {3: 0.35, 4: 0.40, 5: 0.25},
    "train": {1: 0.15, 2: 0.25, 3: 0.25, 4: 0.20, 5: 0.15},
    "big": {1: 0.6, 2: 0.4},
    # ``standard``'s counts given at least two objects (a lone object shares its colour with nothing).
    "same": {2: 0.6, 3: 0.4},
}

# Shape outlines in units of the object's size ``s`` (its circle radius): the square's half side
# and the triangle's circumradius are chosen so the three shapes have similar areas.
_SQUARE_HALF = 0.9
_TRIANGLE_R = 1.3


def scene_words() -> tuple[str, ...]:
    """Every word a scene's captions and class names use, longest first.

    The reference tokenizer gives these words their BPE merges first, in this order, so each is
    one token (longest first keeps a short word's merge from splitting a longer one).
    """
    return tuple(sorted({*SHAPES, *COLOURS, BACKGROUND, "and", "a"}, key=lambda w: (-len(w), w)))


def split_of(seed: int) -> str:
    """``"train"``, ``"standard"``, ``"hard"`` or ``"same"``: the split a scene seed belongs to."""
    if seed >= SAME_START:
        return "same"
    if seed >= HARD_START:
        return "hard"
    return "standard" if seed >= HELDOUT_START else "train"


def class_names(vocab: str = "colour_shape") -> tuple[str, ...]:
    """Every class of a vocabulary, label id = index (0 is background)."""
    if vocab == "colour_shape":
        return (BACKGROUND, *(f"{c} {s}" for c in COLOURS for s in SHAPES))
    if vocab == "shape":
        return (BACKGROUND, *SHAPES)
    raise ValueError(f"vocab must be one of {VOCABS}, got {vocab!r}")


@dataclass(frozen=True)
class SceneObject:
    """One shape: centre ``(cx, cy)`` and size ``size`` in unit image coordinates, angle in radians."""

    colour: str
    shape: str
    cx: float
    cy: float
    size: float
    angle: float
    rgb: tuple[float, float, float]

    def name(self, vocab: str = "colour_shape") -> str:
        return f"{self.colour} {self.shape}" if vocab == "colour_shape" else self.shape

    def inside(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Boolean mask of the points ``(x, y)`` (unit coordinates, y down) covered by the shape."""
        c, s = math.cos(self.angle), math.sin(self.angle)
        dx, dy = (x - self.cx) / self.size, (y - self.cy) / self.size
        u, v = c * dx + s * dy, -s * dx + c * dy
        if self.shape == "circle":
            return u * u + v * v <= 1.0
        if self.shape == "square":
            return np.maximum(np.abs(u), np.abs(v)) <= _SQUARE_HALF
        # Equilateral triangle, apex up: inside all three edges, whose outward normals point
        # away from the opposite vertices (down, lower-left... in image coordinates, y down).
        inradius = _TRIANGLE_R / 2
        out = np.ones(np.broadcast(u, v).shape, dtype=bool)
        for a in (math.pi / 2, math.pi / 2 + 2 * math.pi / 3, math.pi / 2 + 4 * math.pi / 3):
            out &= u * math.cos(a) + v * math.sin(a) <= inradius
        return out


@dataclass(frozen=True)
class Scene:
    """Objects in drawing order (later ones on top) over a background; see ``make_scene``."""

    seed: int
    objects: tuple[SceneObject, ...]
    background_rgb: tuple[float, float, float]
    texture: str
    texture_params: tuple[float, ...]

    # ---- text ------------------------------------------------------------------------------
    def present_classes(self, vocab: str = "colour_shape") -> tuple[str, ...]:
        """Names of the objects' classes, unique, in object order (no background)."""
        return tuple(dict.fromkeys(o.name(vocab) for o in self.objects))

    def caption(self) -> str:
        """A plain-English caption, e.g. ``"a red circle and a blue triangle"``."""
        return " and ".join(f"a {o.name()}" for o in self.objects)

    # ---- pixels ----------------------------------------------------------------------------
    def object_map(self, size: int) -> np.ndarray:
        """``[size, size]`` uint8: 0 background, ``i + 1`` where object ``i`` is the top one.

        Sampled at pixel centres, the same rule the label maps use.
        """
        x, y = _grid(size, 1)
        out = np.zeros((size, size), dtype=np.uint8)
        for i, obj in enumerate(self.objects):
            out[obj.inside(x, y)] = i + 1
        return out

    def labels(self, size: int, vocab: str = "colour_shape") -> np.ndarray:
        """``[size, size]`` uint8 label map with ids indexing ``class_names(vocab)``."""
        ids = class_names(vocab)
        lut = np.array([0] + [ids.index(o.name(vocab)) for o in self.objects], dtype=np.uint8)
        return lut[self.object_map(size)]

    def render(self, size: int, supersample: int | None = None) -> np.ndarray:
        """``[size, size, 3]`` uint8 RGB; edges anti-aliased by averaging ``supersample²`` samples."""
        ss = supersample or (4 if size <= 64 else 2)
        x, y = _grid(size, ss)
        img = self._background(x, y, size * ss)
        for obj in self.objects:
            img[obj.inside(x, y)] = obj.rgb
        img = img.reshape(size, ss, size, ss, 3).mean(axis=(1, 3))
        return np.clip(np.round(img), 0, 255).astype(np.uint8)

    def _background(self, x: np.ndarray, y: np.ndarray, n: int) -> np.ndarray:
        base = np.broadcast_to(np.asarray(self.background_rgb, dtype=np.float64), (n, n, 3)).copy()
        p = self.texture_params
        if self.texture == "gradient":  # p = (amplitude, direction angle)
            base += (p[0] * ((x - 0.5) * math.cos(p[1]) + (y - 0.5) * math.sin(p[1])))[..., None]
        elif self.texture == "stripes":  # p = (amplitude, frequency in cycles per image, angle)
            phase = 2 * math.pi * p[1] * (x * math.cos(p[2]) + y * math.sin(p[2]))
            base += (p[0] * np.sin(phase))[..., None]
        elif self.texture == "noise":  # p = (amplitude,): grey per-sample noise, seeded by the scene
            rng = np.random.default_rng([self.seed, n])
            base += p[0] * rng.standard_normal((n, n, 1))
        return base


def _grid(size: int, ss: int) -> tuple[np.ndarray, np.ndarray]:
    """Unit coordinates of ``(size·ss)²`` sample points, centred in their cells: ``x, y`` ``[n, n]``."""
    n = size * ss
    c = (np.arange(n) + 0.5) / n
    return np.meshgrid(c, c, indexing="xy")


def make_scene(seed: int, same_colour: float | None = None, counts: str | None = None) -> Scene:
    """The scene of ``seed`` (deterministic): a few distinct colour+shape objects on a background.

    ``counts`` names the object-count distribution (``OBJECT_COUNTS``); by default the one of
    the seed's split. Colours and shapes are drawn independently (a repeated pair is redrawn).
    ``same_colour`` adds that chance of giving each further object the previous object's colour:
    training raises it (``TrainConfig.same_colour``) so that colour alone often does not tell the
    objects apart and the shape words have to be used; held-out scenes keep the natural rate, except
    the ``same`` split's, which default to 1 (every object has the first one's colour).
    """
    split = split_of(seed)
    if same_colour is None:
        same_colour = 1.0 if split == "same" else 0.0
    table = OBJECT_COUNTS[counts or split]
    rng = np.random.default_rng(seed)
    n = int(rng.choice(list(table), p=list(table.values())))
    combos: list[tuple[str, str]] = []
    colours, shapes = list(COLOURS), list(SHAPES)
    while len(combos) < n:
        if combos and rng.random() < same_colour:
            colour = combos[-1][0]  # same colour, another shape
        else:
            colour = colours[rng.integers(len(colours))]
        combo = (colour, shapes[rng.integers(len(shapes))])
        if combo not in combos:
            combos.append(combo)

    lo, hi = (0.13, 0.26) if n == 1 else (0.11, 0.21) if n <= 3 else (0.10, 0.17)
    if counts == "big":
        lo, hi = (0.22, 0.38) if n == 1 else (0.18, 0.28)
    objects: list[SceneObject] = []
    for colour, shape in combos:
        for _ in range(100):
            size = float(rng.uniform(lo, hi))
            cx, cy = (float(v) for v in rng.uniform(size, 1 - size, 2))
            # Partial overlaps are allowed, but centres keep apart so every object stays visible.
            if all(math.hypot(cx - o.cx, cy - o.cy) >= 0.8 * (size + o.size) for o in objects):
                break
        angle = float(rng.uniform(-0.25, 0.25)) if shape != "circle" else 0.0
        rgb = tuple(float(np.clip(v + rng.uniform(-22, 22), 0, 255)) for v in COLOURS[colour])
        objects.append(SceneObject(colour, shape, cx, cy, size, angle, rgb))

    grey = float(rng.choice([rng.uniform(35, 90), rng.uniform(110, 245)], p=[0.25, 0.75]))
    tint = rng.uniform(-12, 12, 3)
    background = tuple(float(np.clip(grey + t, 0, 255)) for t in tint)
    texture = TEXTURES[int(rng.choice(len(TEXTURES), p=[0.4, 0.2, 0.2, 0.2]))]
    params: tuple[float, ...] = {
        "plain": (),
        "gradient": (float(rng.uniform(20, 50)), float(rng.uniform(0, 2 * math.pi))),
        "noise": (float(rng.uniform(4, 12)),),
        "stripes": (float(rng.uniform(6, 14)), float(rng.uniform(2, 6)), float(rng.uniform(0, math.pi))),
    }[texture]
    return Scene(int(seed), tuple(objects), background, texture, params)


def heldout_seeds(n: int, split: str = "standard", skip: int = 0) -> list[int]:
    """``n`` seeds of a held-out split (``SPLITS``), after its first ``skip``."""
    if split not in SPLITS:
        raise ValueError(f"held-out split must be one of {sorted(SPLITS)}, got {split!r}")
    start = SPLITS[split] + skip
    return list(range(start, start + n))


# Every reported held-out number uses at most the first REPORTED_SCENES seeds of a split; defaults
# are chosen on the seeds after them (``tuning_seeds``), so no reported scene picks a setting.
REPORTED_SCENES = 200


def tuning_seeds(n: int, split: str = "standard") -> list[int]:
    """``n`` held-out seeds of ``split`` after the first ``REPORTED_SCENES``: for choosing defaults."""
    return heldout_seeds(n, split, skip=REPORTED_SCENES)


CAPTION_MIX = (0.2, 0.5, 0.3)  # English caption, colour+shape list, shape-only list


def training_caption(scene: Scene, rng: np.random.Generator, mix: Sequence[float] = CAPTION_MIX) -> str:
    """A random wording of ``scene``'s caption, as the model sees it in training.

    Three styles, drawn with probabilities ``mix``, objects in random order: the English caption
    (``"a red circle and a blue triangle"``), and lava's default prompts — class names joined by
    spaces — in either vocabulary (``"red circle blue triangle"``, ``"circle triangle"``). A
    quarter of the name lists also hold the word ``"background"`` at a random place, as a prompt
    with a background class would. Training on the very prompts lava builds means inference needs
    no template. Shape-only captions name no colour, so a pixel can only bind them through the
    shape it is part of: they get a large share. Captions name only what is in the scene, as real
    captions do; absent names are lava's problem at inference, not something the model was taught
    to ignore.
    """
    return " ".join(caption_words(scene, rng, mix)[0])


def caption_words(
    scene: Scene, rng: np.random.Generator, mix: Sequence[float] = CAPTION_MIX
) -> tuple[list[str], list[tuple[int, ...]]]:
    """``training_caption`` as its words, and for each word the objects it names (indices into
    ``scene.objects``; empty for "a", "and" and "background"). A shape-only name names every
    object of that shape."""
    order = [int(i) for i in rng.permutation(len(scene.objects))]
    style = rng.choice(3, p=list(mix))
    if style == 0:
        words: list[str] = []
        refs: list[tuple[int, ...]] = []
        for k, i in enumerate(order):
            obj = scene.objects[i]
            words += ([] if k == 0 else ["and"]) + ["a", obj.colour, obj.shape]
            refs += ([] if k == 0 else [()]) + [(), (i,), (i,)]
        return words, refs
    vocab = "colour_shape" if style == 1 else "shape"
    names = list(dict.fromkeys(scene.objects[i].name(vocab) for i in order))
    if rng.random() < 0.25:
        names.insert(int(rng.integers(len(names) + 1)), BACKGROUND)
    words, refs = [], []
    for name in names:
        named = tuple(i for i in order if scene.objects[i].name(vocab) == name)
        for word in name.split():
            words.append(word)
            refs.append(named)
    return words, refs


def save_examples(out_dir: str, seeds: Sequence[int], size: int = 128) -> list[dict]:
    """Write ``scene_<i>.png`` and its label map ``scene_<i>_truth.png`` (palette, colour+shape ids).

    Also ``examples.json``: per scene its seed, caption and class names in both vocabularies,
    and the id → name table of the label PNGs. Returns the JSON's ``scenes`` entries. The shipped
    ``lava/assets/examples`` are ``save_examples(..., [1_000_034, 1_000_010, 1_000_001])``.
    """
    import json
    import os

    from PIL import Image

    from ..viz import label_image

    os.makedirs(out_dir, exist_ok=True)
    entries = []
    for i, seed in enumerate(seeds):
        scene = make_scene(seed)
        Image.fromarray(scene.render(size)).save(os.path.join(out_dir, f"scene_{i}.png"))
        label_image(scene.labels(size)).save(os.path.join(out_dir, f"scene_{i}_truth.png"))
        entries.append(
            {
                "image": f"scene_{i}.png",
                "labels": f"scene_{i}_truth.png",
                "seed": seed,
                "caption": scene.caption(),
                "classes": list(scene.present_classes("colour_shape")),
                "shape_classes": list(scene.present_classes("shape")),
            }
        )
    with open(os.path.join(out_dir, "examples.json"), "w") as f:
        json.dump({"label_ids": list(class_names("colour_shape")), "scenes": entries}, f, indent=2)
        f.write("\n")
    return entries

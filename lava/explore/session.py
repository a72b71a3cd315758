"""The explorer's logic, without Gradio: UI values → lava calls, a per-session cache of captured
maps, and errors → one-line messages.

``Explorer`` owns the loaded backend and runs at most one model forward at a time (a lock, on
top of the server's queue). Each browser session keeps a ``MapCache`` of the attention slices it
has captured, keyed by everything that changes a forward (image, classes, timestep, seed, view,
source): a change of aggregation or mask settings (blocks already captured, token part,
normalisation, refinement, background threshold, presence floor) re-aggregates those maps and
runs no model. Settings resolve through ``lava.config.recipe`` and run through ``lava.compose``
(``capture_forwards``, ``maps_from_slices``, ``segmentation``), as ``lava.segment`` does, so a
result equals ``lava.segment`` with ``segment_kwargs(settings)`` bit for bit — the tests check it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from ..backends import Backend
from ..compose import (
    ForwardKey,
    capture_forwards,
    forward_key,
    maps_from_slices,
    prepare_prompt,
    propagates,
    segmentation,
)
from ..config import PromptConfig, Recipe, recipe
from ..errors import ImageError, LavaError
from ..errors import error_message as os_message
from ..images import load_image
from ..options import IMAGE_TO_TEXT, JOINT
from ..stages.aggregate import aggregate
from ..stages.prompts import parse_classes
from ..types import AggregateConfig, AttentionSlices, Heatmaps, PromptEncoding, Segmentation

log = logging.getLogger("lava.explore")

BACKGROUNDS = ("threshold", "none", "class")
BACKGROUND_CLASS = "background"

# Bigger uploads are refused before decoding (see ``Explorer.load``): label maps and per-class
# scores are kept at the image's own size, so pixels, not file bytes, bound a request's memory.
DEFAULT_MAX_PIXELS = 16_000_000

Progress = Callable[[float, str], None]


@dataclass(frozen=True)
class Settings:
    """One request of the explorer, validated: the classes, the background mode and the
    ``Recipe`` (``lava.config.recipe``, resolved against the model) that computes it.

    ``background``: ``"threshold"`` labels pixels whose best score is below the recipe's
    background threshold background; ``"none"`` gives every pixel a class; ``"class"`` names
    ``"background"`` in the prompt as one more class (already appended to ``classes``).
    """

    classes: tuple[str, ...]
    background: str
    recipe: Recipe

    @property
    def timestep(self) -> float:
        return self.recipe.reading.timesteps[0]

    @property
    def layers(self) -> tuple[int, ...]:
        return self.recipe.reading.layers


def _choice(name: str, value, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise LavaError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
    return value


def _unit(name: str, value) -> float | None:
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise LavaError(f"{name} must be a number between 0 and 1, got {value!r}") from None
    if not 0.0 <= number <= 1.0:  # also refuses NaN
        raise LavaError(f"{name} must be between 0 and 1 (scores are normalised to [0, 1]), got {value!r}")
    return number


def parse_blocks(backend: Backend, blocks: Sequence[str | int] | None) -> tuple[int, ...]:
    """Block indices from the UI's checked boxes (``"0"``, ``"3"``, ...), validated by the backend."""
    if not blocks:
        raise LavaError(f"no block selected: tick at least one of {backend.name}'s blocks to read")
    try:
        indices = [int(b) for b in blocks]
    except (TypeError, ValueError):
        raise LavaError(f"blocks must be block numbers like 0, 3, 9, got {list(blocks)!r}") from None
    return backend.check_layers(indices)


def parse_timesteps(backend: Backend, text: str) -> tuple[float, ...]:
    """Comma-separated timesteps for the grid, each in the model's range, in the order given."""
    items = [t.strip() for t in str(text or "").split(",") if t.strip()]
    if not items:
        raise LavaError("no timesteps for the grid: enter comma-separated timesteps like 100,300,500")
    try:
        values = [float(t) for t in items]
    except ValueError:
        raise LavaError(
            f"timesteps must be numbers separated by commas like 100,300,500, got {text!r}"
        ) from None
    for t in values:
        backend.check_timestep(t)
    return tuple(dict.fromkeys(values))


def settings_from_ui(
    backend: Backend,
    *,
    classes: str,
    timestep,
    blocks: Sequence[str | int] | None,
    source: str = "attention",
    direction: str = IMAGE_TO_TEXT,
    softmax: str = JOINT,
    tokens: str = "all",
    seed=0,
    normalize: str | None = None,
    background: str = "threshold",
    background_threshold=None,
    min_presence=None,
    refine: str | None = None,
) -> Settings:
    """Validated ``Settings`` from the widgets' values; raises ``LavaError`` naming the bad one.

    ``normalize``/``refine`` accept ``"default"``/``"none"`` as the UI shows them; a normalisation,
    threshold or presence floor of ``None`` means the model's default (see ``lava models``), and the
    returned settings hold the values in force (a presence floor of ``0`` becomes ``None``: none).
    """
    names = parse_classes(classes if classes is not None else "")
    if timestep is None:
        raise LavaError(f"no timestep given: expected a number in [0, {backend.num_train_timesteps})")
    try:
        t = float(timestep)
    except (TypeError, ValueError):
        raise LavaError(f"timestep must be a number, got {timestep!r}") from None
    layers = parse_blocks(backend, blocks)
    _choice("background", background, BACKGROUNDS)
    try:
        seed_value = int(seed)
    except (TypeError, ValueError):
        raise LavaError(f"seed must be a whole number, got {seed!r}") from None
    if float(seed) != seed_value:
        raise LavaError(f"seed must be a whole number, got {seed!r}")
    threshold = _unit("background threshold", background_threshold)
    if background == "threshold" and threshold is None and backend.defaults.background_threshold is None:
        raise LavaError(f"the background threshold is empty and {backend.name} has no default: enter one")
    if background == "class":
        if not any(n.lower() == BACKGROUND_CLASS for n in names):  # names are unique without case
            names = (*names, BACKGROUND_CLASS)
        threshold = 0.0  # none: the named class takes the background
    elif background == "none":
        threshold = 0.0
    elif BACKGROUND_CLASS in names:
        raise LavaError(
            f"a class is named {BACKGROUND_CLASS!r} while the background is a threshold: choose the "
            "background option 'class' to let the named class compete, or drop that class"
        )
    # "default" (or empty) is the model's own normalisation and refinement, as None is everywhere.
    plan = recipe(
        backend,
        classes=names,
        timestep=t,
        layers=layers,
        source=source,
        direction=direction,
        softmax=softmax,
        tokens=tokens,
        seed=seed_value,
        normalize=None if normalize in (None, "", "default") else normalize,
        refine=None if refine in (None, "", "default") else refine,
        background_threshold=threshold,
        min_presence=_unit("min presence", min_presence),
    )
    return Settings(classes=names, background=background, recipe=plan)


def segment_kwargs(settings: Settings) -> dict:
    """The ``lava.segment`` keywords that compute what the explorer shows for ``settings``."""
    return dict(classes=list(settings.classes), recipe=settings.recipe)


# ---- the per-session cache ----------------------------------------------------------------------


@dataclass(frozen=True)
class CacheKey:
    """Everything that changes what one forward pass captures (blocks aside: see ``MapCache``):
    the image, the classes, the forward (``lava.compose.ForwardKey``), the view read, whether the
    image q/k are kept (propagation) and the text keys the presence rule reads."""

    image: str  # digest of the RGB pixels
    classes: tuple[str, ...]
    forward: ForwardKey
    view: tuple[str, str]
    image_qk: bool
    presence: str
    layout: PromptConfig = dataclasses.field(default_factory=PromptConfig)  # the classes' prompt layout


class MapCache:
    """The attention slices one session has captured, most recent last, at most ``size`` of them.

    An entry serves any request for blocks it holds; a request for more blocks runs one forward
    over the union of the old and new blocks and replaces the entry. Prompt encodings are kept
    per class list (cheap, but they need the text encoders).
    """

    def __init__(self, size: int = 8):
        self.size = size
        self._slices: OrderedDict[CacheKey, AttentionSlices] = OrderedDict()
        self._prompts: OrderedDict[tuple[tuple[str, ...], PromptConfig], PromptEncoding] = OrderedDict()

    def __len__(self) -> int:
        return len(self._slices)

    def get(self, key: CacheKey, layers: Sequence[int]) -> AttentionSlices | None:
        found = self._slices.get(key)
        if found is None or not set(layers) <= set(found.maps):
            return None
        self._slices.move_to_end(key)
        return found

    def held_layers(self, key: CacheKey) -> tuple[int, ...]:
        found = self._slices.get(key)
        return found.layers if found is not None else ()

    def put(self, key: CacheKey, slices: AttentionSlices) -> None:
        self._slices[key] = slices
        self._slices.move_to_end(key)
        while len(self._slices) > self.size:
            self._slices.popitem(last=False)

    def prompt(
        self, classes: tuple[str, ...], layout: PromptConfig, make: Callable[[], PromptEncoding]
    ) -> PromptEncoding:
        found = self._prompts.get((classes, layout))
        if found is None:
            found = self._prompts[(classes, layout)] = make()
            while len(self._prompts) > self.size:
                self._prompts.popitem(last=False)
        return found


# ---- results ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Result:
    """One explored image: its segmentation (labels at the image's size) and the class heatmaps
    it came from (the maps before the mask stage, after refinement if any)."""

    segmentation: Segmentation
    heatmaps: Heatmaps
    image: Image.Image
    settings: Settings
    forwards: int  # model forwards this request ran: 0 when every map came from the cache


@dataclass(frozen=True)
class Grid:
    """One class's map ``[h, w]`` (per-class min-max, on the token grid) at each
    ``(timestep, column)``; a column is a block index or ``"mean"`` (mean of the blocks)."""

    class_name: str
    timesteps: tuple[float, ...]
    columns: tuple[int | str, ...]
    maps: dict[tuple[float, int | str], torch.Tensor]
    image: Image.Image
    forwards: int


def image_digest(image: Image.Image) -> str:
    return hashlib.sha1(f"{image.size}".encode() + image.tobytes()).hexdigest()


# ---- the explorer -------------------------------------------------------------------------------


class Explorer:
    """The model of one server and the calls the app makes on it.

    ``root`` is the app's own temporary folder: the only place an image path from a client may
    point into (Gradio stores uploads there). ``max_pixels`` bounds an image's size.
    """

    def __init__(
        self,
        backend: Backend,
        root: str | os.PathLike | None = None,
        *,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        cache_size: int = 8,
    ):
        self.backend = backend
        self.root = Path(root).resolve() if root is not None else None
        self.max_pixels = max_pixels
        self.cache_size = cache_size
        self.forwards = 0  # model forwards run by this explorer, over all sessions
        self._lock = threading.Lock()

    def new_cache(self) -> MapCache:
        return MapCache(self.cache_size)

    def default_settings(self, classes: str) -> Settings:
        """The model's own defaults (what ``lava segment`` uses with no options) for ``classes``."""
        d = self.backend.defaults
        return settings_from_ui(
            self.backend,
            classes=classes,
            timestep=d.timestep,
            blocks=list(d.layers),
            background="threshold" if d.background_threshold is not None else "none",
            background_threshold=d.background_threshold,
            min_presence=d.min_presence,
        )

    # -- inputs ---------------------------------------------------------------------------------
    def load(self, path: str | os.PathLike | None) -> Image.Image:
        """The RGB image at ``path``, which must lie inside the app's folder (``root``)."""
        if path is None or str(path) == "":
            raise ImageError("no image: upload one or pick a shipped example")
        resolved = Path(path).resolve()
        if self.root is not None and not resolved.is_relative_to(self.root):
            raise ImageError("that image is not one this app received: upload it or pick an example")
        try:
            with Image.open(resolved) as probe:
                width, height = probe.size
        except (OSError, SyntaxError, Image.DecompressionBombError) as err:
            raise ImageError(f"cannot read the upload as an image (PNG, JPEG, ...): {err}") from None
        if width * height > self.max_pixels:
            raise ImageError(
                f"the image is {width}x{height} px ({width * height / 1e6:.1f} megapixels); the explorer "
                f"takes at most {self.max_pixels / 1e6:g} megapixels: make it smaller"
            )
        return load_image(resolved)

    # -- the model ------------------------------------------------------------------------------
    def _slices(
        self,
        cache: MapCache,
        image: Image.Image,
        digest: str,
        settings: Settings,
        plan: Recipe,
        progress: Progress | None,
    ) -> tuple[PromptEncoding, AttentionSlices, int]:
        """Prompt and slices of ``plan``'s blocks at its timestep: from the cache, or one forward
        (``lava.compose.capture_forwards``, as ``lava.segment`` captures them)."""
        b = self.backend
        ((t, seed),) = plan.reading.runs
        key = CacheKey(
            digest,
            settings.classes,
            forward_key(plan, t, seed),
            plan.reading.view,
            propagates(plan),
            plan.aggregate.presence,
            plan.prompt,
        )
        layers = plan.reading.layers
        with self._lock:
            prompt = cache.prompt(
                settings.classes, plan.prompt, lambda: prepare_prompt(b, settings.classes, plan.prompt)
            )
            found = cache.get(key, layers)
            if found is not None:
                return prompt, found, 0
            # one pass over every block this key has needed so far, so going back to any is free
            wanted = tuple(sorted(set(layers) | set(cache.held_layers(key))))
            if progress is not None:
                progress(0.0, f"running {b.name} at t={t:g} (blocks {', '.join(map(str, wanted))})")
            captured = capture_forwards(b, [image], prompt, [plan.replace(layers=wanted)])
            slices = captured[key.forward][key.view]
            self.forwards += 1
            cache.put(key, slices)
            return prompt, slices, 1

    def run(
        self, cache: MapCache, image_path, settings: Settings, progress: Progress | None = None
    ) -> Result:
        """Segment the image at ``image_path`` as ``lava.segment(**segment_kwargs(settings))`` does
        (the same composition, ``lava.compose``), re-using the session's captured maps when the
        forward inputs are unchanged."""
        image = self.load(image_path)
        plan = settings.recipe
        prompt, slices, ran = self._slices(cache, image, image_digest(image), settings, plan, progress)
        heat = maps_from_slices([slices], prompt, plan, [image])
        seg = segmentation(heat, plan, [image])
        return Result(segmentation=seg, heatmaps=heat, image=image, settings=settings, forwards=ran)

    def grid(
        self,
        cache: MapCache,
        image_path,
        settings: Settings,
        class_name: str,
        timesteps: Sequence[float],
        layers: Sequence[int],
        progress: Progress | None = None,
    ) -> Grid:
        """``class_name``'s map at every timestep × block (plus the mean of the blocks when there
        are several): one forward per timestep captures every block (none when cached)."""
        if class_name not in settings.classes:
            raise LavaError(f"class {class_name!r} is not among the classes {list(settings.classes)}")
        layers = self.backend.check_layers(layers)
        image = self.load(image_path)
        digest = image_digest(image)
        columns: list[int | str] = [*layers, *(["mean"] if len(layers) > 1 else [])]
        maps: dict[tuple[float, int | str], torch.Tensor] = {}
        ran = 0
        # each map on its own scale
        agg = AggregateConfig(tokens=settings.recipe.aggregate.tokens, normalize="minmax")
        for i, t in enumerate(timesteps):
            if progress is not None:
                progress(i / len(timesteps), f"timestep {t:g} ({i + 1} of {len(timesteps)})")
            plan = settings.recipe.replace(timestep=float(t), layers=layers)
            prompt, slices, n = self._slices(cache, image, digest, settings, plan, None)
            ran += n
            c = prompt.classes.index(class_name)
            for col in columns:
                chosen = tuple(layers) if col == "mean" else (col,)
                heat = aggregate(slices, prompt, dataclasses.replace(agg, layers=chosen))
                maps[(float(t), col)] = heat.scores[0, c]
        return Grid(class_name, tuple(float(t) for t in timesteps), tuple(columns), maps, image, ran)


# ---- errors -------------------------------------------------------------------------------------


def error_message(err: BaseException) -> str:
    """What the page shows for ``err``: lava's own message for bad input; for anything else (a
    bug) a short note, the traceback going to the server log only."""
    if isinstance(err, (LavaError, ValueError)):
        return str(err)
    if isinstance(err, OSError):
        return os_message(err)
    if isinstance(err, torch.cuda.OutOfMemoryError):
        return "out of device memory: try a smaller image or fewer blocks"
    log.exception("lava explore: unexpected error", exc_info=err)
    return f"internal error ({type(err).__name__}); the server log has the details"

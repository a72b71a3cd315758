"""The frozen values passed between lava's stages.

``noise → NoisyLatents``, ``encode_prompt → PromptEncoding``, ``capture → AttentionSlices``,
``aggregate → Heatmaps``, ``to_mask → Segmentation``. Each is a plain frozen dataclass so a
stage can be called alone, replaced, or fed a value built by hand.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

import torch

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

from .options import IMAGE_TO_TEXT, JOINT, SOURCES


@dataclass(frozen=True)
class VariantDefaults:
    """Recommended settings for one model variant, with where they come from.

    ``timestep``/``layers``/``resolution``: where and how the attention is read (``source``).
    ``normalize``/``background_threshold``/``min_presence``: how heatmaps become labels, the
    ``AggregateConfig`` and ``MaskConfig`` settings ``lava.segment``, ``lava segment``, ``lava eval`` and
    ``lava sweep`` use unless told otherwise (``mask_source`` says where they come from);
    a ``None`` threshold labels no pixel background. ``max_classes_per_prompt``: how many class
    names one prompt holds unless told otherwise (``None``: as many as fit the text window).
    """

    timestep: float
    layers: tuple[int, ...]
    resolution: int
    source: str
    normalize: str = "minmax"
    background_threshold: float | None = None
    min_presence: float | None = None
    mask_source: str = "lava's generic mask settings, not measured for this model"
    refine: str | None = None
    presence: str = "peak"  # AggregateConfig.presence: "peak" or "null" (against the filler tokens)
    max_classes_per_prompt: int | None = None  # PromptConfig's default (None: as many as fit)

    def describe_mask(self) -> str:
        bg = "none" if self.background_threshold is None else f"threshold {self.background_threshold:g}"
        presence = "" if self.min_presence is None else f", min presence {self.min_presence:g}"
        if self.min_presence is not None and self.presence != "peak":
            presence += f" ({self.presence} presence)"
        refine = "" if self.refine is None else f", refine {self.refine}"
        return f"normalize {self.normalize}, background {bg}{presence}{refine}"


@dataclass(frozen=True)
class NoisyLatents:
    """Images encoded by the VAE and noised to one flow-matching time.

    ``latents = (1 - sigma) * clean + sigma * noise``; all three are ``[B, C, h, w]``.
    ``grid`` is the image-token grid ``(h / patch, w / patch)`` the transformer sees, and
    ``input_size`` the pixel size the images were resized to before encoding.
    """

    latents: torch.Tensor
    clean: torch.Tensor
    noise: torch.Tensor
    sigma: float
    timestep: float
    seed: int
    image_sizes: tuple[tuple[int, int], ...]
    input_size: tuple[int, int]
    grid: tuple[int, int]

    @property
    def batch_size(self) -> int:
        return self.latents.shape[0]


@dataclass(frozen=True)
class PromptEncoding:
    """Prompts naming the classes, their embeddings, and where each class sits in its prompt.

    A vocabulary too long for one prompt window is split over several prompts (``texts``, one
    per *row*); ``capture`` runs the rows as batch rows over the same noised latents. ``embeds``:
    ``[P, T, D]``, one joint text sequence per row (CLIP part of ``clip_len`` tokens first, then
    the T5 part); ``pooled``: ``[P, Dp]``. ``rows[c]`` is the row that names class ``c`` (0 when
    absent from the mapping). Positions in ``clip_spans``/``t5_spans`` are counted in that row's
    text sequence ``0 … T-1`` (so T5 positions start at ``clip_len``), never in the joint
    image+text sequence. ``template``/``separator`` are how the names were joined into each text.

    ``text_mask`` ``[P, T]`` bool marks the positions the model attends to, for families that
    pad each prompt to ``T`` and mask the padding (Chroma, Qwen-Image, Z-Image); ``None``: all.

    ``positions``/``columns`` return *keys* ``row · text_len + position``: one index over the
    text tokens of every row, which is what ``AttentionSlices.columns`` holds. With a single
    prompt a key is simply the position.
    """

    classes: tuple[str, ...]
    texts: tuple[str, ...]
    embeds: torch.Tensor
    pooled: torch.Tensor
    clip_spans: Mapping[str, tuple[int, ...]]
    t5_spans: Mapping[str, tuple[int, ...]]
    clip_len: int
    text_len: int
    rows: Mapping[str, int] = field(default_factory=dict)
    template: str = "{}"
    separator: str = " "
    text_mask: torch.Tensor | None = None

    @property
    def num_prompts(self) -> int:
        return len(self.texts)

    @property
    def text(self) -> str:
        """The prompt text, when there is one prompt (see ``texts`` for several)."""
        if len(self.texts) != 1:
            raise ValueError(f"this encoding holds {len(self.texts)} prompts; read .texts")
        return self.texts[0]

    def row(self, cls: str) -> int:
        """The prompt row that names ``cls``."""
        return self.rows.get(cls, 0)

    def classes_in_row(self, row: int) -> tuple[str, ...]:
        return tuple(c for c in self.classes if self.row(c) == row)

    @property
    def spans(self) -> dict[str, tuple[int, ...]]:
        """Every text position of each class in its row: CLIP part first, then T5 part."""
        return {c: self.clip_spans[c] + self.t5_spans.get(c, ()) for c in self.classes}

    def positions(self, cls: str, tokens: str = "all") -> tuple[int, ...]:
        """Keys of ``cls``'s tokens in the part ``tokens`` (``"all"``, ``"clip"`` or ``"t5"``)."""
        if tokens == "clip":
            local = self.clip_spans[cls]
        elif tokens == "t5":
            local = self.t5_spans.get(cls, ())
        elif tokens == "all":
            local = self.spans[cls]
        else:
            raise ValueError(f"tokens must be 'all', 'clip' or 't5', got {tokens!r}")
        offset = self.row(cls) * self.text_len
        return tuple(offset + p for p in local)

    def columns(self, tokens: str = "all") -> tuple[int, ...]:
        """Sorted union of the class keys: the only text columns a capture needs."""
        return tuple(sorted({p for c in self.classes for p in self.positions(c, tokens)}))

    def text_keys(self) -> tuple[int, ...]:
        """Every text key of every prompt row (class and filler tokens alike)."""
        return tuple(range(self.num_prompts * self.text_len))

    def keys_for(self, presence: str, source: str = "attention") -> tuple[int, ...]:
        """The text keys a capture keeps for presence rule ``presence``: every key for ``"null"``
        (it compares the class keys with the filler keys), the class keys otherwise. The concept
        view holds no probabilities over filler tokens; its presence is the peak rule."""
        return self.text_keys() if presence == "null" and source == "attention" else self.columns()


@dataclass(frozen=True)
class CapturePlan:
    """What one forward pass records.

    ``layers``: transformer block indices. ``columns``: text keys to keep (``None`` = every text
    token of every row). ``direction``/``softmax``/``heads``: see ``lava.kernels.attention_slice``.
    ``early_exit`` stops the forward after the deepest captured block. ``extra_views`` are more
    ``(direction, softmax)`` pairs read from the same q, k (no extra forward pass).

    ``prompt_rows``: the prompt rows in this forward's batch, in order (the batch is
    ``images × prompt_rows``, image-major); a key ``k`` is position ``k % text_len`` of row
    ``k // text_len``, so ``text_len`` is needed when there is more than one row.

    ``source``: ``"attention"`` reads the attention probabilities (the views above);
    ``"concept"`` reads the concept view instead (``lava.stages.concept``: image attention outputs ·
    concept-token attention outputs), which has no direction or softmax domain of its own.
    ``keep_image_qk`` also keeps each captured block's image queries and keys (what
    ``lava.propagate`` needs): ``O(N_img · H · D)`` per block, never ``N×N``; off by default.
    """

    layers: tuple[int, ...]
    columns: tuple[int, ...] | None = None
    direction: str = IMAGE_TO_TEXT
    softmax: str = JOINT
    heads: str = "mean"
    impl: str = "auto"
    early_exit: bool = True
    extra_views: tuple[tuple[str, str], ...] = ()
    prompt_rows: tuple[int, ...] = (0,)
    text_len: int | None = None
    source: str = "attention"

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {self.source!r}")

    keep_image_qk: bool = False

    @property
    def views(self) -> tuple[tuple[str, str], ...]:
        """Every ``(direction, softmax)`` pair captured, the primary one first."""
        primary = (self.direction, self.softmax)
        return (primary, *(v for v in dict.fromkeys(self.extra_views) if v != primary))


@dataclass(frozen=True)
class AttentionSlices:
    """Text↔image attention probabilities read from chosen blocks at one timestep.

    ``maps[block]``: float32 ``[B, H or 1, N_img, K]`` for both directions; entry ``[b, h, i, c]``
    relates image token ``i`` (row-major over ``grid``) and text key ``columns[c]`` (a position
    of prompt row ``columns[c] // text_len``; see ``PromptEncoding``). Each key's probability
    comes from the forward of its own prompt row, in that row's softmax.

    With ``source="concept"`` the entries are instead the dot products of image token ``i``'s
    attention output with the concept token of key ``columns[c]`` (``lava.stages.concept``): logits,
    softmaxed over the classes by ``lava.aggregate``.
    ``image_qk[block]``, only when the capture was asked to keep them (``keep_image_qk``):
    the image queries and keys of that block's joint attention (after qk-norm), each
    ``[B, R, H, N_img, D]`` in the model's dtype, one entry on ``R`` per prompt row that ran.
    """

    maps: Mapping[int, torch.Tensor]
    columns: tuple[int, ...]
    grid: tuple[int, int]
    direction: str
    softmax: str
    heads: str
    timestep: float
    sigma: float
    image_sizes: tuple[tuple[int, int], ...]
    source: str = "attention"
    image_qk: Mapping[int, tuple[torch.Tensor, torch.Tensor]] | None = None
    # The capturing model's defaults, so the stages after capture default as that model does.
    defaults: VariantDefaults | None = None

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(sorted(self.maps))

    def column_indices(self, positions: tuple[int, ...]) -> list[int]:
        """Indices into the last axis of ``maps`` for the given text keys."""
        where = {p: i for i, p in enumerate(self.columns)}
        missing = [p for p in positions if p not in where]
        if missing:
            raise ValueError(f"text keys {missing} were not captured; captured: {list(self.columns)}")
        return [where[p] for p in positions]


@dataclass(frozen=True)
class AggregateConfig:
    """How slices become one heatmap per class.

    ``layers``: blocks to average (``None`` = every captured block). ``tokens``: which part of
    each class's span to average: ``"all"``, ``"clip"`` or ``"t5"``. ``normalize``:
    ``"minmax"`` rescales each class map to [0, 1] per image (an absent class's weak map is
    stretched as much as a present one's), ``"global"`` rescales all class maps of an image
    together to [0, 1] (relative strengths kept), ``"classes"`` divides by the sum over classes
    at each pixel, ``"none"`` keeps the mean probabilities. ``presence``: how
    ``Heatmaps.presence`` is judged: ``"peak"`` (each class's peak over the strongest class's) or
    ``"null"`` (1 where the class's tokens beat its prompt row's filler tokens somewhere,
    ``lava.stages.presence.null_presence``; the capture must keep every text key, and concept-view
    slices, which hold no probabilities, keep the peak rule).
    """

    layers: tuple[int, ...] | None = None
    tokens: str = "all"
    normalize: str = "minmax"
    presence: str = "peak"

    @classmethod
    def for_model(cls, defaults: VariantDefaults | None) -> AggregateConfig:
        """A model's own settings (``VariantDefaults``); these class defaults without one."""
        if defaults is None:
            return cls()
        return cls(normalize=defaults.normalize, presence=defaults.presence)


@dataclass(frozen=True)
class Heatmaps:
    """One score map per class on the image-token grid: ``scores`` is ``[B, C, h, w]`` float32.

    ``presence`` ``[B, C]`` in [0, 1] says how strongly each class shows in each image: by default
    the peak of its map before normalisation divided by the largest peak in that image (1 for the
    strongest class). ``MaskConfig.min_presence`` keeps classes below it from taking pixels.
    """

    scores: torch.Tensor
    classes: tuple[str, ...]
    image_sizes: tuple[tuple[int, int], ...]
    normalize: str
    presence: torch.Tensor | None = None
    # The model's defaults (from the slices), so refine and to_mask default as that model does.
    defaults: VariantDefaults | None = None

    def plot(self, index: int = 0, image: Image.Image | None = None):
        """A matplotlib figure with one heatmap per class (over ``image`` if given)."""
        from .viz import heatmap_figure

        return heatmap_figure(self, index=index, image=image)


@dataclass(frozen=True)
class MaskConfig:
    """How heatmaps become labels.

    ``background_threshold``: when set, a pixel whose best score is below it is labelled
    background (label 0, and ``"background"`` is prepended to the classes); meaningful with
    scores in [0, 1] (``normalize="minmax"`` or ``"global"``). ``None`` assigns every pixel to
    its best class. ``min_presence``: a class whose ``Heatmaps.presence`` in an image is below
    it takes no pixels there (``None``: every class competes).
    """

    background_threshold: float | None = None
    background_name: str = "background"
    min_presence: float | None = None

    @classmethod
    def for_model(cls, defaults: VariantDefaults | None, classes: Sequence[str] = ()) -> MaskConfig:
        """A model's own settings (``VariantDefaults``; these class defaults without one). Its
        default background threshold gives way to a class among ``classes`` named like the
        background label: both would label pixels "background"."""
        if defaults is None:
            return cls()
        mask = cls(background_threshold=defaults.background_threshold, min_presence=defaults.min_presence)
        if mask.background_name in classes:
            mask = cls(min_presence=defaults.min_presence)
        return mask


class SegmentationArrays(NamedTuple):
    """One image's result as numpy arrays (``Segmentation.numpy``): ``labels`` ``[H, W]``,
    ``scores`` ``[C, H, W]`` float32, and the ``classes`` the label values index."""

    labels: np.ndarray
    scores: np.ndarray
    classes: tuple[str, ...]


@dataclass(frozen=True)
class Segmentation:
    """Label maps at each image's original size.

    ``labels[i]``: ``[H_i, W_i]`` (uint8 when the classes fit, else int32) with values indexing
    ``classes``; ``scores[i]``: ``[C, H_i, W_i]`` float32 per-class scores (the classes given,
    without the background entry).
    """

    labels: tuple[torch.Tensor, ...]
    scores: tuple[torch.Tensor, ...]
    classes: tuple[str, ...]
    images: tuple[Image.Image | None, ...] = field(default=(), repr=False)

    def __len__(self) -> int:
        return len(self.labels)

    def numpy(self, index: int = 0) -> SegmentationArrays:
        """Image ``index``'s labels ``[H, W]`` and scores ``[C, H, W]`` as numpy arrays, for code
        that never touches torch: ``labels, scores, classes = seg.numpy(0)``.

        The arrays are read-only views of the result's tensors (no copy; they stay valid as long
        as you hold them); ``np.array(...)`` gives a writable copy.
        """
        labels, scores = _readonly(self.labels[index]), _readonly(self.scores[index])
        return SegmentationArrays(labels=labels, scores=scores, classes=self.classes)

    @property
    def has_background(self) -> bool:
        """Whether label 0 is the ``"background"`` a background threshold added (then ``classes``
        has one entry more than ``scores`` has maps)."""
        return bool(self.scores) and len(self.classes) == self.scores[0].shape[0] + 1

    def to_coco(
        self, file_names: Sequence[str] | None = None, image_ids: Sequence[int] | None = None
    ) -> dict:
        """The label maps as a COCO dataset dict (``json.dump`` it): one category per class (ids
        ``1 … C`` in class order; a threshold's background label is none), one annotation per
        class present in an image, its pixels as compressed RLE (``lava.coco``; what
        ``pycocotools`` reads), with ``area`` and ``bbox``. ``file_names`` default to
        ``image_0.png`` …, ``image_ids`` to ``1 … B``."""
        from .coco import CocoBuilder

        n = len(self.labels)
        names = list(file_names) if file_names is not None else [f"image_{i}.png" for i in range(n)]
        ids = list(image_ids) if image_ids is not None else list(range(1, n + 1))
        if len(names) != n or len(ids) != n:
            raise ValueError(f"got {len(names)} file names and {len(ids)} image ids for {n} label maps")
        coco = CocoBuilder(self.classes, background=self.has_background)
        for labels, name, image_id in zip(self.labels, names, ids):
            coco.add(labels, name, image_id)
        return coco.dataset()

    def label_image(self, index: int = 0) -> Image.Image:
        """The label map as a PNG-ready image whose pixel value i is class i: a palette image
        (colour i = class i) for up to 256 classes, else 16-bit grayscale (mode ``"I;16"``)."""
        from .viz import label_image

        return label_image(self.labels[index], num_labels=len(self.classes))

    def overlay(
        self, index: int = 0, image: Image.Image | None = None, alpha: float = 0.5, legend: bool = True
    ) -> Image.Image:
        """The label colours blended over the image (the one segmented, unless given) at the label
        map's size, with a legend of the classes present: in a corner where it covers only the
        "background" label, else beside the image on a canvas widened to the right, so it hides no
        object (``legend=False``: none; see ``lava.viz.overlay``)."""
        from .viz import overlay

        base = image if image is not None else (self.images[index] if index < len(self.images) else None)
        if base is None:
            raise ValueError("overlay needs the image: pass image=..., or segment through lava.segment()")
        return overlay(base, self.labels[index], self.classes, alpha=alpha, legend=legend)


def _readonly(tensor: torch.Tensor) -> np.ndarray:
    array = tensor.detach().cpu().numpy()
    array.flags.writeable = False
    return array

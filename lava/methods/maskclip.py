"""MaskCLIP (Zhou, Loy & Dai, ECCV 2022), the training-free variant, as a lava segmenter.

Dense features: the CLIP ViT image tower runs as usual up to its last block; there the
query-key attention is skipped and each patch token takes its own *value* instead:
``v = x + out_proj(v_proj(ln_1(x)))``, ``v = v + mlp(ln_2(v))`` (the block's residual and MLP
kept), then the final layer norm ``post_layernorm`` and the projection ``visual_projection``
map it to the joint image-text space. This is MaskCLIP's public code (``mmseg/models/
backbones/vit.py``: ``TransformerEncoderLayer.forward(return_qkv=True)`` and ``final_norm``
applied to ``v``; ``MaskClipHead`` applies the projection). Each class's score at a patch is
the cosine similarity of that feature with the class's text embedding.

Text: each class name is put in CLIP's 80 ImageNet prompt templates (``IMAGENET_TEMPLATES``,
Radford et al. 2021, "Prompt_Engineering_for_ImageNet"); each prompt's projected end-of-text
feature is L2-normalised, the 80 are averaged and normalised again (CLIP's zero-shot ensemble).

Inference (``SlideWindow``): the image is resized (aspect kept) to a short side of 336 px and
read in 224×224 windows with a stride of 112 px; each window's score map is bilinearly
upsampled to the window and the overlapping windows averaged. This is the protocol under which
the MaskCLIP numbers in SCLIP (Wang et al., ECCV 2024) and ClearCLIP (Lan et al., ECCV 2024)
were produced for ViT-B/16 (VOC20 74.9, Context-59 26.4, COCO-Object 20.6, all classes named).
MaskCLIP's own configs read the whole image at the dataset's test scale
(``test_cfg=dict(mode='whole')``); ``SlideWindow(short_side=..., window=None)`` does that.
MaskCLIP's optional key smoothing and prompt denoising are not part of this baseline.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from PIL import Image

from ..backends.base import VariantDefaults
from ..errors import LavaError
from ..types import Heatmaps
from .base import to_heatmaps

# CLIP's 80 ImageNet prompt templates (openai/CLIP, notebooks/Prompt_Engineering_for_ImageNet).
IMAGENET_TEMPLATES: tuple[str, ...] = (
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
)

# OpenAI CLIP's input normalisation (its preprocessor config).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

HUB_IDS = {"clip-vit-b16": "openai/clip-vit-base-patch16"}


@dataclass(frozen=True)
class SlideWindow:
    """Sliding-window inference: resize to ``short_side`` (aspect kept), then windows of
    ``window`` px moved by ``stride`` px (mmseg's ``slide`` mode: the last window of a row or
    column is shifted back to end at the border). ``window=None`` reads the whole image at once."""

    short_side: int = 336
    window: int | None = 224
    stride: int = 112

    def __post_init__(self) -> None:
        if self.short_side <= 0 or (self.window is not None and (self.window <= 0 or self.stride <= 0)):
            raise LavaError(f"sliding window sizes must be positive, got {self}")


DEFAULTS = VariantDefaults(
    timestep=0.0,
    layers=(-1,),
    resolution=336,
    source="MaskCLIP (ECCV 2022) value path of the last block; short side 336, 224 windows, stride 112 "
    "(the SCLIP/ClearCLIP evaluation of MaskCLIP ViT-B/16)",
    normalize="none",
    mask_source="MaskCLIP: raw cosine similarities, argmax over the classes (no background threshold)",
)


@torch.no_grad()
def dense_features(model, pixels: torch.Tensor) -> torch.Tensor:
    """MaskCLIP's dense features ``[B, D, h, w]`` (projected, not normalised) of ``pixels``
    ``[B, 3, H, W]`` (CLIP-normalised; sides multiples of the patch size). ``model`` is a
    transformers ``CLIPModel``; position embeddings are interpolated (bicubic) to ``h × w``."""
    vision = model.vision_model
    patch = vision.config.patch_size
    h, w = pixels.shape[-2] // patch, pixels.shape[-1] // patch
    x = vision.embeddings(pixels, interpolate_pos_encoding=True)
    x = vision.pre_layrnorm(x)
    for layer in vision.encoder.layers[:-1]:
        x = layer(x, attention_mask=None)
    last = vision.encoder.layers[-1]
    # The last block without query-key attention: each token attends only to itself, so the
    # attention output is its own value through the output projection.
    v = x + last.self_attn.out_proj(last.self_attn.v_proj(last.layer_norm1(x)))
    v = v + last.mlp(last.layer_norm2(v))
    v = model.visual_projection(vision.post_layernorm(v[:, 1:]))  # class token dropped
    return rearrange(v, "b (h w) d -> b d h w", h=h, w=w)


@torch.no_grad()
def text_embeddings(
    model, tokenizer, classes: Sequence[str], templates: Sequence[str] = IMAGENET_TEMPLATES
) -> torch.Tensor:
    """``[C, D]`` unit-norm text embeddings: per class, the mean of its normalised template
    embeddings, normalised again (CLIP's prompt ensemble)."""
    device = model.text_projection.weight.device
    out = []
    for name in classes:
        texts = [t.format(name) for t in templates]
        tok = tokenizer(
            texts,
            padding="max_length",
            truncation=True,
            max_length=tokenizer.model_max_length,
            return_tensors="pt",
        )
        pooled = model.text_model(
            input_ids=tok["input_ids"].to(device), attention_mask=tok["attention_mask"].to(device)
        ).pooler_output
        feats = F.normalize(model.text_projection(pooled).float(), dim=-1)
        out.append(F.normalize(feats.mean(0), dim=-1))
    return torch.stack(out)


def window_starts(length: int, window: int, stride: int) -> list[int]:
    """Start offsets of windows of ``window`` px along a side of ``length`` px, mmseg's slide
    rule: ``ceil((length - window) / stride) + 1`` windows, the last one ending at the border."""
    if length <= window:
        return [0]
    count = math.ceil((length - window) / stride) + 1
    return [min(i * stride, length - window) for i in range(count)]


@torch.no_grad()
def window_scores(model, pixels: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Cosine scores ``[C, H, W]`` of one window ``[1, 3, H, W]`` (any size: padded at the bottom
    and right to the patch grid, as mmseg's PatchEmbed does, and cropped back)."""
    patch = model.vision_model.config.patch_size
    h, w = pixels.shape[-2:]
    ph, pw = -h % patch, -w % patch
    padded = F.pad(pixels, (0, pw, 0, ph)) if ph or pw else pixels
    feats = F.normalize(dense_features(model, padded).float(), dim=1)[0]  # [D, h', w']
    scores = torch.einsum("dhw,cd->chw", feats, text.to(feats))
    up = F.interpolate(scores[None], size=padded.shape[-2:], mode="bilinear", align_corners=False)[0]
    return up[:, :h, :w]


@torch.no_grad()
def slide_scores(
    model, pixels: torch.Tensor, text: torch.Tensor, window: int | None, stride: int
) -> torch.Tensor:
    """Class scores ``[C, H, W]`` over ``pixels`` ``[1, 3, H, W]``: the mean of every window
    covering each pixel (``window=None``: one window, the whole image)."""
    h, w = pixels.shape[-2:]
    if window is None:
        return window_scores(model, pixels, text)
    total = torch.zeros(text.shape[0], h, w, device=pixels.device)
    count = torch.zeros(1, h, w, device=pixels.device)
    for y in window_starts(h, window, stride):
        for x in window_starts(w, window, stride):
            crop = pixels[..., y : y + window, x : x + window]
            total[:, y : y + crop.shape[-2], x : x + crop.shape[-1]] += window_scores(model, crop, text)
            count[:, y : y + crop.shape[-2], x : x + crop.shape[-1]] += 1
    return total / count


def preprocess(image: Image.Image, short_side: int, device, dtype) -> torch.Tensor:
    """``[1, 3, H', W']`` CLIP-normalised pixels, resized (bicubic, aspect kept) so the short
    side is ``short_side`` px."""
    scale = short_side / min(image.height, image.width)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    arr = torch.frombuffer(bytearray(image.resize(size, Image.BICUBIC).tobytes()), dtype=torch.uint8)
    x = arr.view(size[1], size[0], 3).permute(2, 0, 1).float() / 255.0
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    return ((x - mean) / std)[None].to(device, dtype)


@dataclass
class MaskCLIP:
    """A CLIP model read the MaskCLIP way (see the module docstring). Backend-like: the
    evaluation harness and ``lava.segment`` run it through the same mask stage and metrics."""

    name: str
    variant: str
    model: Any
    tokenizer: Any
    defaults: VariantDefaults
    device: torch.device
    dtype: torch.dtype
    window: SlideWindow = field(default_factory=SlideWindow)
    templates: tuple[str, ...] = IMAGENET_TEMPLATES
    info: dict[str, Any] = field(default_factory=dict)
    method: str = "maskclip"
    # Text embeddings per class name: under the present-classes protocol every image names another
    # subset of the same dataset classes, and each name costs 80 text-encoder rows.
    _text_cache: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def num_blocks(self) -> int:
        return len(self.model.vision_model.encoder.layers)

    def check_timestep(self, timestep: float) -> None:
        if float(timestep) != self.defaults.timestep:
            raise LavaError(f"maskclip reads no diffusion timestep: leave --timestep unset, got {timestep:g}")

    def check_layers(self, layers: Sequence[int]) -> tuple[int, ...]:
        norm = tuple(sorted({int(i) % self.num_blocks for i in layers}))
        if norm != (self.num_blocks - 1,):
            raise LavaError(
                f"maskclip reads the last vision block only (block {self.num_blocks - 1} of {self.name}): "
                f"leave --layers unset, got {list(layers)}"
            )
        return norm

    def class_embeddings(self, classes: Sequence[str]) -> torch.Tensor:
        """``[C, D]`` unit-norm text embeddings of ``classes`` (``text_embeddings``), cached by name."""
        missing = [c for c in dict.fromkeys(classes) if c not in self._text_cache]
        if missing:
            new = text_embeddings(self.model, self.tokenizer, missing, self.templates)
            self._text_cache.update(zip(missing, new))
        return torch.stack([self._text_cache[c] for c in classes])

    def heatmaps(
        self,
        image: Image.Image,
        classes: Sequence[str],
        *,
        timestep: float | None = None,
        layer_groups: Sequence[tuple[int, ...]] = ((-1,),),
        normalize: str | None = None,
        seed: int = 0,
        resolution: int | str | None = None,
        template: str | None = None,
        separator: str | None = None,
        max_classes_per_prompt: int | None = None,
    ) -> list[Heatmaps]:
        """One ``Heatmaps`` per layer group (all the same: MaskCLIP has one reading) of ``image``
        into ``classes``: scores ``[1, C, H', W']`` at the resized image (short side
        ``resolution``, default the window's ``short_side``).

        ``seed`` is unused (nothing is noised); ``template``/``separator``/
        ``max_classes_per_prompt`` too: each class name is put in the 80 ``templates`` on its
        own (the harness passes its prompt settings to every method)."""
        if timestep is not None:
            self.check_timestep(timestep)
        for group in layer_groups:
            self.check_layers(group)
        if resolution == "original":
            short = min(image.height, image.width)
        elif resolution is None:
            short = self.window.short_side
        elif isinstance(resolution, int) and resolution > 0:
            short = resolution
        else:
            raise LavaError(
                f"resolution must be a positive number of pixels, None or 'original', got {resolution!r}"
            )
        pixels = preprocess(image, short, self.device, self.dtype)
        scores = slide_scores(
            self.model, pixels, self.class_embeddings(classes), self.window.window, self.window.stride
        )
        heat = to_heatmaps(scores, classes, image, normalize or self.defaults.normalize)
        return [heat for _ in layer_groups]

    def prediction_settings(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "window": dataclasses.asdict(self.window),
            "templates": len(self.templates),
            "input_resolution": self.window.short_side,
        }

    def describe(self) -> str:
        win = self.window
        how = "whole image" if win.window is None else f"{win.window} px windows, stride {win.stride}"
        return (
            f"{self.name} (maskclip): {self.num_blocks} vision blocks, value path of the last, "
            f"short side {win.short_side} px, {how}, {len(self.templates)} prompt templates"
        )


def load_maskclip(
    source: str = "openai/clip-vit-base-patch16",
    *,
    device=None,
    dtype=None,
    window: SlideWindow | None = None,
    **kw,
) -> MaskCLIP:
    """MaskCLIP over a transformers ``CLIPModel`` from a hub id or local folder."""
    from transformers import CLIPModel, CLIPTokenizer

    from ..backends.base import resolve_device, resolve_dtype
    from ..errors import ModelError

    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    source = HUB_IDS.get(source, source)
    try:
        model = CLIPModel.from_pretrained(source, dtype=dt, **kw)
        tokenizer = CLIPTokenizer.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise ModelError(f"could not load CLIP weights from {source!r}: {err}") from err
    model = model.to(dev).eval().requires_grad_(False)
    return MaskCLIP(
        name=source,
        variant="clip",
        model=model,
        tokenizer=tokenizer,
        defaults=DEFAULTS,
        device=dev,
        dtype=dt,
        window=window or SlideWindow(),
    )

"""StableSeg-style segmentation from a Stable Diffusion UNet's cross-attention (SD 1.5 / 2.1).

One forward of ``UNet2DConditionModel`` on the noised image latent, with a prompt naming the
classes: every chosen cross-attention layer (``attn2``: image queries over the 77 CLIP text
keys) records the softmax probabilities of the class tokens' columns (``[B, heads, N, K]``,
cheap: the full matrix is only ``N × 77``). Class maps are aggregated DAAM-style (Tang et al.,
ACL 2023, castorini/daam): per layer, heads averaged and the class's tokens averaged, the
layer's map upsampled bicubically to the latent grid and clamped at 0, then averaged over layers.
The mask stage is lava's.

Layers are the UNet's cross-attention layers numbered in execution order (down blocks, mid
block, up blocks). SD 1.5 and 2.1 have 16; at 512 px input (a 64×64 latent) their grids are
down 0-5: 64, 64, 32, 32, 16, 16; mid 6: 8; up 7-15: 16, 16, 16, 32, 32, 32, 64, 64, 64.
Defaults: every layer (DAAM aggregates all of them) at
timestep 100 of the 1000-step DDPM schedule (lava's choice, unmeasured: DAAM sums over all the
sampling steps of a generation, which a single forward on a real image does not have; sweep it
with ``lava sweep --method stableseg``). Noise: ``x_t = sqrt(ᾱ_t)·x_0 + sqrt(1-ᾱ_t)·ε`` (the
scheduler's own ``add_noise``), ``ε`` seeded on the CPU as lava's noise stage does.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from ..backends.base import VariantDefaults
from ..errors import ClassNameError, LavaError, ModelError
from ..images import fit_to_grid
from ..stages.prompts import DEFAULT_SEPARATOR, DEFAULT_TEMPLATE, build_prompt, parse_classes, token_spans
from ..types import Heatmaps
from .base import to_heatmaps

HUB_IDS = {
    "sd1.5": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "sd2.1-base": "stabilityai/stable-diffusion-2-1-base",
}

DEFAULT_TIMESTEP = 100.0
PROMPT_CACHE_SIZE = 64  # vocabularies kept encoded (a present-protocol eval has one per class subset)


def defaults_for(num_layers: int, resolution: int, source: str | None = None) -> VariantDefaults:
    return VariantDefaults(
        timestep=DEFAULT_TIMESTEP,
        layers=tuple(range(num_layers)),
        resolution=resolution,
        source=source
        or "DAAM (ACL 2023): every cross-attention layer, heads and tokens averaged, bicubic upsampling; "
        "timestep 100 is unmeasured (sweep it)",
    )


def cross_attention_layers(unet) -> list[tuple[str, Any]]:
    """``(name, Attention)`` of every cross-attention layer of ``unet`` in execution order
    (down blocks, mid block, up blocks)."""
    found = [
        (n, m)
        for n, m in unet.named_modules()
        if n.endswith("attn2") and getattr(m, "is_cross_attention", False)
    ]
    rank = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}
    return sorted(found, key=lambda item: rank.get(item[0].split(".")[0], 3))  # stable: keeps block order


class CaptureCrossAttention:
    """An attention processor that computes exactly what diffusers' ``AttnProcessor`` computes
    and also stores the probabilities of the text keys ``columns``: ``[B, heads, N, K]`` float32
    in ``store[index]``."""

    def __init__(self, index: int, columns: Sequence[int], store: dict[int, torch.Tensor]):
        self.index = index
        self.columns = list(columns)
        self.store = store

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **_):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch, length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        attention_mask = attn.prepare_attention_mask(attention_mask, length, batch)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        query, key, value = (attn.head_to_batch_dim(t) for t in (query, key, value))
        probs = attn.get_attention_scores(query, key, attention_mask)  # [B·heads, N, 77]
        # Only the class columns are kept: [B, heads, N, K].
        self.store[self.index] = probs[..., self.columns].float().unflatten(0, (-1, attn.heads))
        hidden_states = attn.batch_to_head_dim(torch.bmm(probs, value))
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


@contextmanager
def capturing_cross_attention(
    unet, layers: Sequence[int], columns: Sequence[int]
) -> Iterator[dict[int, torch.Tensor]]:
    """Install ``CaptureCrossAttention`` on the cross-attention ``layers`` for the duration of the
    context (the original processors come back on exit, also on error); yields the store that
    each forward fills ``{layer: [B, heads, N_layer, K]}``."""
    modules = cross_attention_layers(unet)
    store: dict[int, torch.Tensor] = {}
    originals = {i: modules[i][1].processor for i in layers}
    try:
        for i in layers:
            modules[i][1].set_processor(CaptureCrossAttention(i, columns, store))
        yield store
    finally:
        for i, proc in originals.items():
            modules[i][1].set_processor(proc)


def layer_grid(tokens: int, latent: tuple[int, int]) -> tuple[int, int]:
    """The ``(h, w)`` grid of a layer with ``tokens`` image tokens on a ``latent`` grid halved
    some number of times (UNet downsampling)."""
    h, w = latent
    while h * w > tokens and h > 0:
        h, w = (h + 1) // 2, (w + 1) // 2
    if h * w != tokens:
        raise LavaError(f"cannot place {tokens} attention tokens on the latent grid {latent} halved")
    return h, w


@dataclass(frozen=True)
class UNetPrompt:
    """Prompts naming the classes for a UNet: ``embeds`` ``[P, 77, D]`` (one row per prompt),
    ``rows[c]`` the row naming class ``c`` and ``spans[c]`` its token positions in that row."""

    classes: tuple[str, ...]
    texts: tuple[str, ...]
    embeds: torch.Tensor
    rows: dict[str, int]
    spans: dict[str, tuple[int, ...]]

    @property
    def columns(self) -> tuple[int, ...]:
        return tuple(sorted({p for c in self.classes for p in self.spans[c]}))


@dataclass
class StableSeg:
    """A Stable Diffusion UNet read through its cross-attention (see the module docstring).

    ``pipe`` is a diffusers ``StableDiffusionPipeline`` (or any object with ``unet``, ``vae``,
    ``text_encoder``, ``tokenizer`` and a DDPM-style ``scheduler`` with ``alphas_cumprod``)."""

    name: str
    variant: str
    pipe: Any
    defaults: VariantDefaults
    device: torch.device
    dtype: torch.dtype
    info: dict[str, Any] = field(default_factory=dict)
    method: str = "stableseg"
    # Encoded prompts by (classes, template, separator, cap): eval and sweep ask again for every
    # image, timestep and seed; the few most recent vocabularies are kept (oldest dropped first).
    _prompt_cache: dict[tuple, UNetPrompt] = field(default_factory=dict, repr=False)

    @property
    def unet(self):
        return self.pipe.unet

    @property
    def num_blocks(self) -> int:
        return len(cross_attention_layers(self.unet))

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.pipe.vae.config.block_out_channels) - 1)

    @property
    def grid_unit(self) -> int:
        """Pixels per cell of the coarsest UNet grid (the input must halve exactly down to it)."""
        return self.vae_scale_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)

    @property
    def num_train_timesteps(self) -> int:
        return int(self.pipe.scheduler.config.num_train_timesteps)

    def check_timestep(self, timestep: float) -> None:
        n = self.num_train_timesteps
        if not 0 <= float(timestep) < n or float(timestep) != int(timestep):
            raise LavaError(f"a UNet timestep must be a whole number in [0, {n}), got {timestep:g}")

    def check_layers(self, layers: Sequence[int]) -> tuple[int, ...]:
        layers = tuple(int(i) for i in layers)
        n = self.num_blocks
        if not layers:
            raise LavaError("layers must name at least one cross-attention layer")
        bad = [i for i in layers if not -n <= i < n]
        if bad:
            raise LavaError(
                f"layer index {bad[0]} is out of range: {self.name} has {n} cross-attention layers "
                f"(0..{n - 1})"
            )
        return tuple(sorted({i % n for i in layers}))

    # ---- prompt --------------------------------------------------------------------------
    def split(
        self, classes: Sequence[str], template: str, separator: str, cap: int | None
    ) -> list[tuple[str, ...]]:
        """Consecutive groups of class names whose prompts fit the 77-token window (greedy)."""
        limit = int(self.pipe.tokenizer.model_max_length) - 1  # the last slot holds the end token

        def fits(names: list[str]) -> bool:
            text, chars = build_prompt(names, template, separator)
            spans = token_spans(self.pipe.tokenizer, text, chars)
            return all(pos and max(pos) < limit for pos in spans.values())

        groups: list[list[str]] = []
        for name in classes:
            if groups and (cap is None or len(groups[-1]) < cap) and fits([*groups[-1], name]):
                groups[-1].append(name)
            elif fits([name]):
                groups.append([name])
            else:
                raise ClassNameError(
                    f"class {name!r} does not fit one {limit + 1}-token prompt on its own: use a shorter name"
                )
        return [tuple(g) for g in groups]

    @torch.no_grad()
    def encode_prompt(
        self,
        classes: str | Sequence[str],
        template: str = DEFAULT_TEMPLATE,
        separator: str = DEFAULT_SEPARATOR,
        max_classes_per_prompt: int | None = None,
    ) -> UNetPrompt:
        """``UNetPrompt`` of the classes: CLIP text encoder states of each prompt (77 tokens)."""
        names = parse_classes(classes)
        if max_classes_per_prompt is not None and max_classes_per_prompt < 0:
            raise ClassNameError(
                f"max_classes_per_prompt must be positive (0: as many as fit), got {max_classes_per_prompt}"
            )
        key = (names, template, separator, max_classes_per_prompt)
        if key not in self._prompt_cache:
            if len(self._prompt_cache) >= PROMPT_CACHE_SIZE:
                del self._prompt_cache[next(iter(self._prompt_cache))]
            self._prompt_cache[key] = self._encode(names, template, separator, max_classes_per_prompt)
        return self._prompt_cache[key]

    @torch.no_grad()
    def _encode(self, names: tuple[str, ...], template: str, separator: str, cap: int | None) -> UNetPrompt:
        texts, rows, spans = [], {}, {}
        for row, group in enumerate(self.split(names, template, separator, cap)):
            text, chars = build_prompt(group, template, separator)
            spans.update(token_spans(self.pipe.tokenizer, text, chars))
            rows.update(dict.fromkeys(group, row))
            texts.append(text)
        tok = self.pipe.tokenizer(
            texts, padding="max_length", max_length=self.pipe.tokenizer.model_max_length, return_tensors="pt"
        )
        encoder = self.pipe.text_encoder
        embeds = encoder(tok["input_ids"].to(encoder.device))[0]
        return UNetPrompt(names, tuple(texts), embeds.to(self.device, self.dtype), rows, spans)

    # ---- noise and forward ---------------------------------------------------------------
    @torch.no_grad()
    def noisy_latents(
        self, image: Image.Image, timestep: float, seed: int = 0, resolution: int | str | None = None
    ) -> torch.Tensor:
        """``[1, C, h, w]``: the VAE latent (posterior mean, scaled) noised to ``timestep`` with
        the scheduler's ``add_noise``; the image is resized (aspect kept, long side
        ``resolution``, default the model's) to sides the UNet halves exactly."""
        from diffusers.image_processor import VaeImageProcessor

        self.check_timestep(timestep)
        if resolution is None:
            resolution = self.defaults.resolution
        elif resolution == "original":
            resolution = max(image.height, image.width)
        elif not isinstance(resolution, int) or resolution <= 0:
            raise LavaError(
                f"resolution must be a positive number of pixels, None or 'original', got {resolution!r}"
            )
        h, w = fit_to_grid((image.height, image.width), int(resolution), self.grid_unit)
        vae = self.pipe.vae
        pixels = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor).preprocess(
            [image], height=h, width=w
        )
        clean = vae.encode(pixels.to(self.device, vae.dtype)).latent_dist.mean * vae.config.scaling_factor
        gen = torch.Generator(device="cpu").manual_seed(int(seed))
        eps = torch.randn(clean.shape, generator=gen, dtype=torch.float32).to(clean.device, clean.dtype)
        t = torch.tensor([int(timestep)], device=clean.device)
        return self.pipe.scheduler.add_noise(clean, eps, t).to(self.dtype)

    @torch.no_grad()
    def capture(self, latents: torch.Tensor, timestep: float, prompt: UNetPrompt, layers: Sequence[int]):
        """One UNet forward (the latent repeated for each prompt row); ``{layer: [P, heads, N_l, K]}``
        for the prompt's class columns."""
        rows = prompt.embeds.shape[0]
        with capturing_cross_attention(self.unet, layers, prompt.columns) as store:
            self.unet(latents.expand(rows, -1, -1, -1), int(timestep), encoder_hidden_states=prompt.embeds)
        return dict(store)

    # ---- aggregate ---------------------------------------------------------------------
    def class_maps(
        self,
        maps: dict[int, torch.Tensor],
        prompt: UNetPrompt,
        layers: Sequence[int],
        latent: tuple[int, int],
    ) -> torch.Tensor:
        """``[C, h, w]`` on the latent grid: per layer heads and class tokens averaged, upsampled
        bicubically to the latent grid and clamped at 0 (DAAM), then averaged over ``layers``."""
        where = {p: i for i, p in enumerate(prompt.columns)}
        per_layer = []
        for layer in layers:
            m = maps[layer].mean(1)  # [P, N_l, K]
            grid = layer_grid(m.shape[1], latent)
            cls = torch.stack(
                [m[prompt.rows[c], :, [where[p] for p in prompt.spans[c]]].mean(-1) for c in prompt.classes]
            )
            up = F.interpolate(cls.view(1, -1, *grid), size=latent, mode="bicubic", align_corners=False)[0]
            per_layer.append(up.clamp_min(0))
        return torch.stack(per_layer).mean(0)

    def heatmaps(
        self,
        image: Image.Image,
        classes: Sequence[str],
        *,
        timestep: float | None = None,
        layer_groups: Sequence[tuple[int, ...]] | None = None,
        normalize: str | None = None,
        seed: int = 0,
        resolution: int | str | None = None,
        template: str = DEFAULT_TEMPLATE,
        separator: str = DEFAULT_SEPARATOR,
        max_classes_per_prompt: int | None = None,
    ) -> list[Heatmaps]:
        """One ``Heatmaps`` (scores ``[1, C, h, w]`` on the latent grid) per group of layers, all
        from one UNet forward at ``timestep``."""
        timestep = self.defaults.timestep if timestep is None else timestep
        groups = [self.check_layers(g) for g in (layer_groups or [self.defaults.layers])]
        prompt = self.encode_prompt(classes, template, separator, max_classes_per_prompt)
        latents = self.noisy_latents(image, timestep, seed, resolution)
        maps = self.capture(latents, timestep, prompt, sorted({i for g in groups for i in g}))
        latent = tuple(latents.shape[-2:])
        how = normalize or self.defaults.normalize
        return [
            to_heatmaps(self.class_maps(maps, prompt, g, latent), prompt.classes, image, how) for g in groups
        ]

    def prediction_settings(self) -> dict[str, Any]:
        return {"method": self.method, "cross_attention_layers": self.num_blocks}

    def describe(self) -> str:
        d = self.defaults
        return (
            f"{self.name} (stableseg): {self.num_blocks} cross-attention layers, default timestep "
            f"{d.timestep:g}, layers {list(d.layers)}, resolution {d.resolution}"
        )


def load_stableseg(source: str = "sd1.5", *, device=None, dtype=None, **kw) -> StableSeg:
    """StableSeg over a Stable Diffusion 1.x/2.x pipeline from a hub id or local folder."""
    from diffusers import StableDiffusionPipeline

    from ..backends.base import resolve_device, resolve_dtype

    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    hub = HUB_IDS.get(source, source)
    try:
        pipe = StableDiffusionPipeline.from_pretrained(
            hub, dtype=dt, safety_checker=None, requires_safety_checker=False, **kw
        )
    except (OSError, ValueError) as err:
        raise ModelError(f"could not load Stable Diffusion weights from {hub!r}: {err}") from err
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.to(dev).eval().requires_grad_(False)
    resolution = int(pipe.unet.config.sample_size) * 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    return StableSeg(
        name=hub,
        variant="sd2" if "stable-diffusion-2" in hub else "sd1",
        pipe=pipe,
        defaults=defaults_for(len(cross_attention_layers(pipe.unet)), resolution),
        device=dev,
        dtype=dt,
    )

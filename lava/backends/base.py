"""A backend adapts one MM-DiT family to lava's stages.

It owns the modules (VAE, text encoders, transformer, scheduler), knows the token layout,
patch size, block count and which blocks have joint attention, and carries the recommended
defaults for its variant. Stages take a backend as an argument; it holds no per-call state.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import LavaError, ModelError
from ..types import VariantDefaults
from .family import SD3

__all__ = ["Backend", "VariantDefaults", "resolve_device", "resolve_dtype", "vae_factor"]


def vae_factor(vae) -> int:
    """Pixels per latent cell along one side of a diffusers VAE (1 without one: pixel space; a
    video VAE such as Qwen-Image's, whose config has no ``block_out_channels``, states its own
    ``spatial_compression_ratio``)."""
    if vae is None:
        return 1
    if "block_out_channels" not in vae.config and hasattr(vae, "spatial_compression_ratio"):
        return int(vae.spatial_compression_ratio)
    return 2 ** (len(vae.config.block_out_channels) - 1)


@dataclass
class Backend:
    """One loaded MM-DiT model, ready for the stages.

    ``pipe`` is a diffusers ``StableDiffusion3Pipeline`` or ``FluxPipeline`` (or any object with
    the same components and ``encode_prompt``); ``family`` is its adapter
    (``lava.backends.family``: what differs between SD3 and Flux). Text encoders may live on
    ``text_device`` (CPU offload) while the VAE and transformer live on ``device``.
    ``guidance`` is the guidance-embedding value fed to guidance-distilled models (FLUX.1-dev),
    ``None`` for models without one.
    """

    name: str
    variant: str
    pipe: Any
    defaults: VariantDefaults
    device: torch.device
    dtype: torch.dtype
    text_device: torch.device
    max_sequence_length: int = 256
    info: dict[str, Any] = field(default_factory=dict)
    family: Any = SD3
    guidance: float | None = None

    # ---- modules ---------------------------------------------------------------------------
    @property
    def transformer(self):
        return self.pipe.transformer

    @property
    def vae(self):
        return self.pipe.vae

    @property
    def scheduler(self):
        return self.pipe.scheduler

    @property
    def blocks(self) -> list:
        """Every transformer block in execution order; lava's block numbers index this list
        (Flux: double-stream blocks first, then single-stream ones)."""
        return self.family.blocks(self.transformer)

    @property
    def block_kinds(self) -> list[str]:
        """``"joint"`` (SD3), ``"double"``/``"single"`` (Flux) for every block of ``blocks``."""
        return self.family.block_kinds(self.transformer)

    # ---- layout ----------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def joint_blocks(self) -> tuple[int, ...]:
        """Blocks whose ``attn`` is a joint text+image attention (all of them in SD3 and Flux)."""
        return tuple(i for i, b in enumerate(self.blocks) if self.family.has_joint_attention(b))

    @property
    def patch_size(self) -> int:
        """Latent pixels per image token along one side (Flux: 2, its 2x2 packing)."""
        return self.family.patch_size(self.transformer)

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent along one side (1 for a pixel-space model without a VAE)."""
        return vae_factor(self.vae)

    @property
    def grid_unit(self) -> int:
        """Pixels per image token along one side."""
        return self.vae_scale_factor * self.patch_size

    @property
    def max_resolution(self) -> int | None:
        """Largest image side in pixels the position embedding covers."""
        m = self.transformer.config.get("pos_embed_max_size")
        return None if m is None else int(m) * self.grid_unit

    @property
    def clip_len(self) -> int:
        """CLIP tokens in the joint text sequence (SD3: 77; Flux: 0, CLIP gives the pooled vector only)."""
        return self.family.clip_len(self.pipe)

    @property
    def t5_tokenizer(self):
        return self.family.t5_tokenizer(self.pipe)

    @property
    def span_tokenizer(self):
        """The tokenizer whose window bounds a prompt: CLIP where its tokens are in the sequence, else T5."""
        return self.pipe.tokenizer if self.clip_len else self.t5_tokenizer

    @property
    def sequence_encoder(self) -> str:
        """The name of the encoder after the CLIP part (``"T5"``, or an LLM's), for messages."""
        return self.family.encoder_name

    @property
    def has_t5(self) -> bool:
        return getattr(self.pipe, self.family.t5_module, None) is not None

    @property
    def text_len(self) -> int:
        """Text tokens in the joint sequence: CLIP part + T5 part (zeros when T5 is dropped)."""
        return self.clip_len + self.max_sequence_length

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler.config.num_train_timesteps)

    # ---- time ------------------------------------------------------------------------------
    def sigma_for_timestep(self, timestep: float) -> float:
        """σ of the model's timestep: SD3's flow-matching schedule feeds ``t = σ · 1000``.

        The scheduler's shift only decides which σ an N-step schedule visits
        (``timestep_for_step``); the map between the model's own ``t`` and σ is linear.
        """
        self.check_timestep(timestep)
        return float(timestep) / self.num_train_timesteps

    def timestep_for_sigma(self, sigma: float) -> float:
        if not 0.0 <= float(sigma) < 1.0:
            raise LavaError(f"sigma must be in [0, 1), got {sigma}")
        return float(sigma) * self.num_train_timesteps

    def timestep_for_step(self, step: int, num_steps: int, image_seq_len: int | None = None) -> float:
        """The model timestep of ``step`` in the scheduler's own ``num_steps`` schedule (with shift).

        Seg4Diff reads SD3-medium at ``timesteps[-8]`` of a 28-step schedule with shift 3. A
        scheduler with dynamic shifting (FLUX.1-dev) shifts by the image token count
        ``image_seq_len``, as ``FluxPipeline`` does (σ from 1 to 1/num_steps, ``calculate_shift``).
        """
        sched = type(self.scheduler).from_config(self.scheduler.config)
        if sched.config.get("use_dynamic_shifting"):
            if image_seq_len is None:
                raise LavaError(
                    f"{self.name}'s scheduler shifts by the image size: give image_seq_len (image tokens, "
                    "e.g. 4096 at 1024 px) to timestep_for_step"
                )
            import numpy as np
            from diffusers.pipelines.flux.pipeline_flux import calculate_shift

            c = sched.config
            mu = calculate_shift(
                image_seq_len,
                c.get("base_image_seq_len", 256),
                c.get("max_image_seq_len", 4096),
                c.get("base_shift", 0.5),
                c.get("max_shift", 1.15),
            )
            sched.set_timesteps(num_steps, sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=mu)
        else:
            sched.set_timesteps(num_steps)
        try:
            return float(sched.timesteps[step])
        except IndexError as err:
            raise LavaError(f"step {step} is outside a {num_steps}-step schedule") from err

    def check_timestep(self, timestep: float) -> None:
        n = self.num_train_timesteps
        if not 0.0 <= float(timestep) < n:
            raise LavaError(f"timestep must be in [0, {n}), got {timestep}")

    def check_layers(self, layers) -> tuple[int, ...]:
        """Validated block indices (negative indices count from the end)."""
        layers = tuple(int(i) for i in layers)
        if not layers:
            raise LavaError("layers must name at least one transformer block")
        n = self.num_blocks
        bad = [i for i in layers if not -n <= i < n]
        if bad:
            raise LavaError(
                f"layer index {bad[0]} is out of range: {self.name} has {n} blocks (0..{n - 1}"
                + self.block_scheme()
                + ")"
            )
        norm = tuple(sorted({i % n for i in layers}))
        not_joint = [i for i in norm if i not in self.joint_blocks]
        if not_joint:
            raise LavaError(f"blocks {not_joint} of {self.name} have no joint text-image attention")
        return norm

    def block_scheme(self) -> str:
        """``", double-stream 0-18, single-stream 19-56"`` for Flux; empty for one kind of block."""
        kinds = self.block_kinds
        if len(set(kinds)) == 1:
            return ""
        d = kinds.count("double")
        return f", double-stream 0-{d - 1}, single-stream {d}-{len(kinds) - 1}"

    # ---- modules at work -------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """VAE latents of ``pixels`` ``[B, 3, H, W]`` in [-1, 1], as the family encodes them
        (``Family.encode_images``; SD3/Flux: ``(mean - shift) · scale``).

        The posterior mean (not a sample) keeps the clean latent deterministic; randomness
        enters only through the seeded flow-matching noise. A model without a VAE works in
        pixel space: its "latents" are the pixels themselves.
        """
        vae = self.vae
        if vae is None:
            return pixels.to(self.device, self.dtype)
        return self.family.encode_images(vae, pixels.to(self.device, vae.dtype))

    @torch.no_grad()
    def encode_text(self, text: str | list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Joint text embeddings ``[P, T, D]``, pooled ``[P, Dp]`` (``[P, 0]`` for a family without
        one) and the text mask ``[P, T]`` bool (``None`` where the model attends to every text
        position) of ``P`` prompts (1 for a str), via the pipeline's own ``encode_prompt``."""
        texts = [text] if isinstance(text, str) else list(text)
        embeds, pooled, mask = self.family.encode_text(
            self.pipe, texts, self.text_device, self.max_sequence_length
        )
        mask = None if mask is None else mask.to(self.device, torch.bool)
        return embeds.to(self.device, self.dtype), pooled.to(self.device, self.dtype), mask

    @property
    def text_encoders(self) -> str:
        """``"CLIP+T5"``, or ``"CLIP"`` when T5 was dropped or the model has none; Flux:
        ``"T5 (+CLIP pooled)"``; a family that says otherwise, its own words (``Family.text_summary``)."""
        own = self.family.text_summary(self)
        if own is not None:
            return own
        if self.family.name == "flux":
            return "T5 (+CLIP pooled)"
        return "CLIP+T5" if self.has_t5 else "CLIP"

    def describe(self) -> str:
        d = self.defaults
        t5 = "CLIP+T5" if self.has_t5 else "CLIP, T5 dropped"
        if "no_t5" in self.info:
            t5 = "CLIP, no T5 in the model"
        blocks = f"{self.num_blocks} blocks"
        if self.block_scheme():
            blocks += f" ({self.block_scheme()[2:]})"
        if self.family.name == "flux":
            t5 = "T5 only; CLIP gives the pooled vector"
        if self.family.text_summary(self) is not None:
            t5 = self.family.text_summary(self)
        if self.guidance is not None:
            t5 += f"; guidance {self.guidance:g}"
        return (
            f"{self.name} ({self.variant}): {blocks}, patch {self.patch_size}, "
            f"text tokens {self.text_len} ({t5}), "
            f"default timestep {d.timestep:g}, layers {list(d.layers)}, resolution {d.resolution}"
        )


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise ModelError(f"unknown device {device!r}: expected 'cpu', 'cuda' or 'cuda:N'") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"device {device!r} asked for, but no CUDA device is available here")
    return dev


DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[str(dtype).lower()]
    except KeyError as err:
        raise ModelError(f"unknown dtype {dtype!r}: expected one of {sorted(DTYPES)}") from err

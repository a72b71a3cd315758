"""An already-loaded pipeline as a ``Backend``: its modules placed on a device and dtype, its
family, variant and defaults read from the transformer."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ..errors import ModelError
from . import chroma, flux, flux2, qwen, sd3, zimage
from .base import Backend, VariantDefaults, resolve_device, resolve_dtype, vae_factor
from .chroma import CHROMA
from .families import family_of
from .family import FLUX
from .flux2 import FLUX2
from .sd3 import DEFAULTS, detect_variant


def _place(pipe, device: torch.device, dtype: torch.dtype, offload_text_encoders: bool) -> torch.device:
    """Move modules; text encoders stay on CPU when offloaded. Returns the text device."""
    text_device = torch.device("cpu") if offload_text_encoders else device

    def move(module, dev: torch.device, dt: torch.dtype) -> None:
        # Casting only when needed keeps diffusers' fp32-module bookkeeping out of the way.
        if module.dtype != dt:
            module.to(dtype=dt)
        module.to(dev)

    move(pipe.transformer, device, dtype)
    if pipe.vae is not None:
        move(pipe.vae, device, dtype)
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        module = getattr(pipe, name, None)
        if module is not None:
            move(module, text_device, text_dtype(text_device, dtype))
    return text_device


def text_dtype(text_device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The dtype text encoders run in: CPU matmuls in half precision are slow or unsupported, so on
    the CPU (offloaded, or everything on the CPU) they stay float32."""
    return torch.float32 if text_device.type == "cpu" else dtype


def from_pipeline(
    pipe: Any,
    *,
    name: str | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    offload_text_encoders: bool = False,
    max_sequence_length: int | None = None,
    defaults: VariantDefaults | None = None,
    guidance: float | None = None,
    move: bool = True,
) -> Backend:
    """Wrap an already-loaded ``StableDiffusion3Pipeline``, ``FluxPipeline`` or ``ZImagePipeline``
    (its modules are used, not copied).

    ``device``/``dtype`` default to where the transformer already is; the VAE and text encoders are
    moved there (text encoders on the CPU stay float32). ``move=False`` leaves every module where
    and as it is (``lava.trace`` wraps the user's pipeline so: its images must not change), and
    ``device``/``dtype``/``offload_text_encoders`` must then be left out. ``max_sequence_length``
    (T5 tokens; Qwen-Image and Z-Image: their LLM's tokens, chat template included) defaults to
    256 for SD3, 512 for FLUX.1-dev, Chroma and Z-Image, 256 for schnell and Qwen-Image (after the
    cropped system prompt, ``qwen.MAX_SEQUENCE_LENGTH``); ``guidance``
    (guidance-distilled Flux only) to 3.5, Seg4Diff's value.
    """
    for part in ("transformer", "scheduler", "tokenizer", "text_encoder", "encode_prompt"):
        if not hasattr(pipe, part) or getattr(pipe, part) is None:
            raise ModelError(
                f"expected a StableDiffusion3Pipeline- or FluxPipeline-like object with .{part}, "
                f"got {type(pipe).__name__}"
            )
    family = family_of(pipe.transformer)
    if family is FLUX and getattr(pipe, "text_encoder_2", None) is None:
        raise ModelError(
            "a Flux pipeline needs its T5 encoder (text_encoder_2): Flux's text sequence is T5 only"
        )
    param = next(pipe.transformer.parameters())
    if move:
        dev = resolve_device(device) if device is not None else param.device
        dt = resolve_dtype(dtype, dev) if dtype is not None else param.dtype
        text_device = _place(pipe, dev, dt, offload_text_encoders)
    else:
        if device is not None or dtype is not None or offload_text_encoders:
            raise ModelError("move=False keeps the modules where they are: give no device, dtype or offload")
        dev, dt = param.device, param.dtype
        encoder = getattr(pipe, "text_encoder", None)
        text_device = next(encoder.parameters()).device if encoder is not None else dev
    hint = name or str(getattr(pipe, "name_or_path", "") or pipe.transformer.config.get("_name_or_path", ""))
    if family is CHROMA:
        variant = chroma.detect_variant(pipe.transformer.config, hint)
        table, seq_len = chroma.DEFAULTS, chroma.MAX_SEQUENCE_LENGTH
    elif family is FLUX2:
        config = getattr(pipe, "config", None)
        distilled = config.get("is_distilled") if hasattr(config, "get") else None
        variant = flux2.detect_variant(pipe.transformer.config, hint, distilled)
        table, seq_len = flux2.DEFAULTS, flux2.MAX_SEQUENCE_LENGTH
        if guidance is None and pipe.transformer.config.get("guidance_embeds"):
            guidance = flux2.DEV_GUIDANCE
    elif family is zimage.ZIMAGE:
        variant = zimage.detect_variant(pipe.transformer.config, hint)
        table, seq_len = zimage.DEFAULTS, zimage.MAX_SEQUENCE_LENGTH
        if defaults is None:  # a Z-Image of another depth reads at the same relative depth
            defaults = zimage.defaults_for(pipe.transformer.config)
    elif family is FLUX:
        variant = flux.detect_variant(pipe.transformer.config, hint)
        table, seq_len = flux.DEFAULTS, flux.MAX_SEQUENCE_LENGTH[variant]
        if guidance is None and pipe.transformer.config.get("guidance_embeds"):
            guidance = flux.SEG4DIFF_FLUX_GUIDANCE
    elif family is qwen.QWEN:
        variant = qwen.detect_variant(pipe.transformer.config, hint)
        table, seq_len = qwen.DEFAULTS, qwen.MAX_SEQUENCE_LENGTH
        if defaults is None:  # a model of another depth reads as its family
            defaults = qwen.fitted_defaults(pipe.transformer.config)
    else:
        variant = detect_variant(pipe.transformer.config, hint)
        table, seq_len = DEFAULTS, 256
        if defaults is None and variant in sd3.BLOCKS:  # a model of another size reads as its family
            native = pipe.transformer.config.sample_size * vae_factor(getattr(pipe, "vae", None))
            defaults = sd3.fitted_defaults(variant, pipe.transformer.config, native)
    if guidance is not None and not pipe.transformer.config.get("guidance_embeds"):
        raise ModelError(f"guidance={guidance} given, but {variant} has no guidance embedding")
    return Backend(
        name=name or variant,
        variant=variant,
        pipe=pipe,
        defaults=defaults or table[variant],
        device=dev,
        dtype=dt,
        text_device=text_device,
        max_sequence_length=max_sequence_length or seq_len,
        family=family,
        guidance=guidance,
    )


def place(
    backend: Backend,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    offload_text_encoders: bool | None = None,
) -> Backend:
    """The same backend (same modules, name, defaults) moved to another device/dtype/offload."""
    dev = resolve_device(device) if device is not None else backend.device
    dt = resolve_dtype(dtype, dev) if dtype is not None else backend.dtype
    offload = (
        backend.text_device != backend.device if offload_text_encoders is None else offload_text_encoders
    )
    text_device = _place(backend.pipe, dev, dt, offload)
    return dataclasses.replace(
        backend, device=dev, dtype=dt, text_device=text_device, info=dict(backend.info)
    )

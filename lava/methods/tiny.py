"""``tiny-clip`` and ``tiny-sd15``: the comparison methods' models at toy size, built offline.

Like ``tiny-sd3`` (``lava.backends.tiny``), every component is the real transformers/diffusers
class (``CLIPModel``; ``UNet2DConditionModel``, ``AutoencoderKL``, ``CLIPTextModel``,
``DDPMScheduler``) with a tiny config and seeded random weights, and the CLIP BPE tokenizer is
built locally by rule. Random weights give meaningless masks: these exist for tests.
"""

from __future__ import annotations

from ..backends.base import VariantDefaults, resolve_device, resolve_dtype
from ..backends.tiny import build_tokenizers, seeded, tiny_clip_text_config


def _clip_tokenizer():
    return build_tokenizers()[0]


def build_tiny_clip(seed: int = 0):
    """``(CLIPModel, CLIPTokenizer)``: ViT with 8 px patches on 32 px images, 3 blocks."""
    from transformers import CLIPConfig, CLIPModel

    tok = _clip_tokenizer()
    config = CLIPConfig(
        text_config=tiny_clip_text_config(tok, hidden=12),
        vision_config=dict(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=3,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=8,
    )
    with seeded(seed):
        model = CLIPModel(config)
    return model.eval().requires_grad_(False), tok


TOY_SOURCE = "toy model with random weights: any setting is as good as any other"


def tiny_clip_defaults() -> VariantDefaults:
    from .maskclip import DEFAULTS

    return VariantDefaults(
        timestep=DEFAULTS.timestep,
        layers=DEFAULTS.layers,
        resolution=32,
        source=TOY_SOURCE,
        normalize=DEFAULTS.normalize,
    )


def load_tiny_clip(*, device=None, dtype=None, seed: int = 0, **_):
    from .maskclip import MaskCLIP, SlideWindow

    dev = resolve_device(device if device is not None else "cpu")
    dt = resolve_dtype(dtype or "float32", dev)
    model, tok = build_tiny_clip(seed)
    return MaskCLIP(
        name="tiny-clip",
        variant="tiny-clip",
        model=model.to(dev, dt),
        tokenizer=tok,
        defaults=tiny_clip_defaults(),
        device=dev,
        dtype=dt,
        # 32 px windows moved by 16 px, so a test image is read in several overlapping windows.
        window=SlideWindow(short_side=32, window=32, stride=16),
        info={"random_weights": True},
    )


def build_tiny_sd15(seed: int = 0):
    """A ``StableDiffusionPipeline`` at toy size: VAE factor 2, a two-level UNet (one
    downsampling) with cross-attention in the first down block, the mid block and the last up
    block (4 cross-attention layers), a 2-layer CLIP text encoder, SD 1.5's DDPM schedule."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tok = _clip_tokenizer()
    hidden = 12

    with seeded(seed):
        unet = UNet2DConditionModel(
            sample_size=16,
            in_channels=4,
            out_channels=4,
            block_out_channels=(8, 16),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=hidden,
            attention_head_dim=4,
            norm_num_groups=4,
        )
        # Unlike tiny_vae (SD3/Flux): SD 1.5's scaling, no shift, with its quant convs.
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            latent_channels=4,
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            block_out_channels=(8, 16),
            layers_per_block=1,
            norm_num_groups=4,
            sample_size=32,
            scaling_factor=0.18215,
        )
        text = CLIPTextModel(CLIPTextConfig(**tiny_clip_text_config(tok, hidden)))

    # SD 1.5's training schedule (its scheduler_config.json).
    scheduler = DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        clip_sample=False,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=tok,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    for module in (unet, vae, text):
        module.eval().requires_grad_(False)
    return pipe


def load_tiny_sd15(*, device=None, dtype=None, seed: int = 0, **_):
    from .stableseg import StableSeg, cross_attention_layers, defaults_for

    dev = resolve_device(device if device is not None else "cpu")
    dt = resolve_dtype(dtype or "float32", dev)
    pipe = build_tiny_sd15(seed)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        # Cast only when needed: keeps diffusers' fp32-module bookkeeping quiet.
        if module.dtype != dt:
            module.to(dtype=dt)
        module.to(dev)
    n = len(cross_attention_layers(pipe.unet))
    defaults = defaults_for(n, 32, TOY_SOURCE)
    return StableSeg(
        name="tiny-sd15",
        variant="tiny-sd15",
        pipe=pipe,
        defaults=defaults,
        device=dev,
        dtype=dt,
        info={"random_weights": True},
    )

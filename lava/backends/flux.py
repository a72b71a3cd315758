"""The ``flux`` backend family: FLUX.1 dev and schnell (``FluxPipeline``).

Block numbers run in execution order: double-stream blocks ``0-18``, then single-stream blocks
``19-56`` (the numbering of Seg4Diff's ``flux_backbone.py``: ``layer_id = l`` for the double
blocks, ``l + 19`` for the single ones). The variant is read from the loaded transformer's
config (a guidance embedding means dev), not from the name it was loaded under.

The memory planner sizes FLUX.1 — and Chroma, which keeps FLUX.1's transformer layout, VAE and
T5 — from the released configs below, built on the meta device and counted (``meta_modules``):
nothing is downloaded and no weights are read.
"""

from __future__ import annotations

import dataclasses

from .base import VariantDefaults

HUB_IDS = {
    "flux-dev": "black-forest-labs/FLUX.1-dev",
    "flux-schnell": "black-forest-labs/FLUX.1-schnell",
}

# Seg4Diff (NeurIPS 2025; seg4diff/modeling/backbone/flux_backbone.py, configs/eval_ovss.yaml)
# reads FLUX.1-dev at 1024 px, guidance 3.5, T5 text (max_sequence_length 77), the image
# queries' softmax over all joint keys after RoPE, heads averaged, and takes timesteps[-8]
# (NOISE_STEPS 8) of a 50-step schedule (σ from 1 to 1/50) shifted with mu = calculate_shift(16):
# its code passes the latent *channel* count (shape[1]) as image_seq_len, so the shift is 0.459
# rather than 1.15 for 4096 tokens. That schedule gives t = 231.68 (σ ≈ 0.232); the published
# numbers come from it (with mu for 4096 tokens it would be t = 375.61).
SEG4DIFF_FLUX_T = 231.68
SEG4DIFF_FLUX_GUIDANCE = 3.5

DEFAULTS = {
    "flux-dev": VariantDefaults(
        timestep=SEG4DIFF_FLUX_T,
        layers=(12, 17),
        resolution=1024,
        source=(
            "Seg4Diff (NeurIPS 2025): double-stream blocks 12 and 17 of FLUX.1-dev read best (VOC20 83.1, "
            "COCO-Obj 50.6, PC59 38.2, ADE 23.9, City 17.1, present classes); timesteps[-8] of 50 steps "
            "as its code shifts them (t=231.68), guidance 3.5"
        ),
    ),
    # Nothing public reads schnell's cross-attention for semantic segmentation: unmeasured.
    "flux-schnell": VariantDefaults(
        timestep=500.0,
        layers=(12, 17),
        resolution=1024,
        source=(
            "unmeasured: Seg4Diff's FLUX.1-dev blocks 12 and 17 carried over; t=500 is where "
            "ConceptAttention reads schnell (2nd of 4 steps), not a cross-attention measurement"
        ),
    ),
    "tiny-flux": VariantDefaults(
        timestep=500.0,
        layers=(1, 2),
        resolution=32,
        source="toy model with random weights: any setting is as good as any other",
    ),
}

# FluxPipeline's own limits: dev was trained with 512 T5 tokens, schnell with 256.
MAX_SEQUENCE_LENGTH = {"flux-dev": 512, "flux-schnell": 256}


def detect_variant(transformer_config, hint: str = "") -> str:
    """``flux-dev`` (guidance embedding) or ``flux-schnell`` (none) from a transformer config."""
    return "flux-dev" if transformer_config.get("guidance_embeds") else "flux-schnell"


# FLUX.1's VAE (also Chroma's and Z-Image's): 16 latent channels, 8x down, no quant convs; the
# memory planner builds it without storage.
VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=16,
    norm_num_groups=32,
    sample_size=1024,
    scaling_factor=0.3611,
    shift_factor=0.1159,
    use_quant_conv=False,
    use_post_quant_conv=False,
)


# ---- sizes for the memory planner ----------------------------------------------------------------
# The released configs (FLUX.1-dev's and FLUX.1-schnell's transformer/, text_encoder/ and
# text_encoder_2/config.json), so `lava segment --dry-run/--max-memory` plans FLUX.1 without a
# download. The two transformers differ only in the guidance embedding.
TRANSFORMER_CONFIG = dict(
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    axes_dims_rope=(16, 56, 56),
)
GUIDANCE_EMBEDS = {"flux-dev": True, "flux-schnell": False}

# T5-XXL v1.1's encoder (google/t5-v1_1-xxl): FLUX.1's text_encoder_2, Chroma's text_encoder.
T5_XXL_CONFIG = dict(
    vocab_size=32128,
    d_model=4096,
    d_kv=64,
    d_ff=10240,
    num_layers=24,
    num_heads=64,
    feed_forward_proj="gated-gelu",
    relative_attention_num_buckets=32,
)

# CLIP ViT-L/14's text tower (openai/clip-vit-large-patch14, CLIPTextModel): FLUX.1's text_encoder,
# read for its pooled vector only.
CLIP_L_CONFIG = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    projection_dim=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
)


def meta_modules(transformer_class, transformer_config: dict, *, clip: bool):
    """A full-size FLUX.1-layout model with no storage (meta tensors), for
    ``lava.model_spec.spec_from_pipeline``: an object with ``transformer``
    (``transformer_class(**transformer_config)``), ``vae`` (FLUX.1's) and the text encoders —
    with ``clip``, FLUX.1's CLIP-L ``text_encoder`` and T5-XXL ``text_encoder_2``; without, T5-XXL
    as ``text_encoder`` (Chroma)."""
    from types import SimpleNamespace

    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    with init_empty_weights(include_buffers=True):
        t5 = T5EncoderModel(T5Config(**T5_XXL_CONFIG))
        parts = dict(transformer=transformer_class(**transformer_config), vae=AutoencoderKL(**VAE_CONFIG))
        if clip:
            parts.update(text_encoder=CLIPTextModel(CLIPTextConfig(**CLIP_L_CONFIG)), text_encoder_2=t5)
        else:
            parts.update(text_encoder=t5)
    return SimpleNamespace(**parts, tokenizer=None)


def full_size_modules(variant: str = "flux-dev"):
    """FLUX.1-dev or -schnell (``variant``) at its real size with no storage: ``meta_modules`` with
    ``FluxTransformer2DModel`` at the released config (19 + 38 blocks, 24 heads × 128, guidance
    embedding for dev only), CLIP-L and T5-XXL."""
    from diffusers import FluxTransformer2DModel

    config = {**TRANSFORMER_CONFIG, "guidance_embeds": GUIDANCE_EMBEDS[variant]}
    return meta_modules(FluxTransformer2DModel, config, clip=True)


def planning_geometry(spec, max_sequence_length: int):
    """A ``ModelSpec`` read from a FLUX.1-layout folder's files (FLUX.1, Chroma) with the layout's
    token geometry: 2×2 packed latents (the config's patch size is 1) and a text sequence of
    ``max_sequence_length`` T5 tokens alone (CLIP gives only the pooled vector, Chroma has none)."""
    return dataclasses.replace(spec, patch_size=2 * spec.patch_size, clip_len=0, t5_len=max_sequence_length)

"""The ``flux`` backend family: FLUX.1 dev and schnell (``FluxPipeline``).

Block numbers run in execution order: double-stream blocks ``0-18``, then single-stream blocks
``19-56`` (the numbering of Seg4Diff's ``flux_backbone.py``: ``layer_id = l`` for the double
blocks, ``l + 19`` for the single ones). The variant is read from the loaded transformer's
config (a guidance embedding means dev), not from the name it was loaded under.
"""

from __future__ import annotations

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

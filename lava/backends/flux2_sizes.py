"""FLUX.2's sizes for the memory planner (``lava segment --dry-run/--max-memory``): the released
models' configs, counted on the meta device. Apart from ``lava.backends.flux2`` so that the family
adapter does not import the planner's ``ModelSpec`` (which imports the loaders, which import the
families)."""

from __future__ import annotations

from .flux2 import MAX_SEQUENCE_LENGTH

# ---- sizes for the memory planner ----------------------------------------------------------------
# The released models' configs (their hub folders' transformer/config.json and
# text_encoder/config.json: dev's Mistral-Small-3.1 24B with its Pixtral vision tower, klein's
# Qwen3-4B and Qwen3-8B), so `lava segment --dry-run/--max-memory` plans them without a download.
# Parameters are counted from modules built without storage, never from weights.
TRANSFORMER_CONFIGS = {
    "dev": dict(
        num_layers=8,
        num_single_layers=48,
        num_attention_heads=48,
        attention_head_dim=128,
        joint_attention_dim=15360,
        guidance_embeds=True,
    ),
    "klein-4b": dict(
        num_layers=5,
        num_single_layers=20,
        num_attention_heads=24,
        attention_head_dim=128,
        joint_attention_dim=7680,
        guidance_embeds=False,
    ),
    "klein-9b": dict(
        num_layers=8,
        num_single_layers=24,
        num_attention_heads=32,
        attention_head_dim=128,
        joint_attention_dim=12288,
        guidance_embeds=False,
    ),
}
_QWEN3 = dict(
    num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936
)
TEXT_ENCODER_CONFIGS = {
    "dev": dict(
        text_config=dict(
            model_type="mistral",
            hidden_size=5120,
            intermediate_size=32768,
            num_hidden_layers=40,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=128,
            vocab_size=131072,
        ),
        vision_config=dict(
            model_type="pixtral",
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=24,
            num_attention_heads=16,
            image_size=1540,
            patch_size=14,
        ),
    ),
    "klein-4b": dict(_QWEN3, hidden_size=2560, intermediate_size=9728, tie_word_embeddings=True),
    "klein-9b": dict(_QWEN3, hidden_size=4096, intermediate_size=12288, tie_word_embeddings=False),
}


def size_of(variant: str) -> str:
    """``"dev"``, ``"klein-4b"`` or ``"klein-9b"``: the architecture of a registry variant."""
    if variant == "flux2-dev":
        return "dev"
    return "klein-9b" if variant.endswith("9b") else "klein-4b"


def _counted(module) -> tuple[int, int]:
    sizes = [t.numel() for t in [*module.parameters(), *module.buffers()] if t.is_floating_point()]
    return sum(sizes), max(sizes)


def planner_spec(variant: str, max_sequence_length: int = MAX_SEQUENCE_LENGTH):
    """The memory planner's ``ModelSpec`` of a released FLUX.2 model, from the configs above (modules
    built on the meta device and counted; nothing downloaded, no weights read)."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel

    from ..model_spec import ModelSpec

    size = size_of(variant)
    cfg = TRANSFORMER_CONFIGS[size]
    with init_empty_weights(include_buffers=True):
        parts = {
            "transformer": _counted(Flux2Transformer2DModel(**cfg)),
            "vae": _counted(AutoencoderKLFlux2()),
            "text_encoder": _counted(_text_encoder(size)),
        }
    return ModelSpec(
        params={name: n for name, (n, _) in parts.items()},
        heads=cfg["num_attention_heads"],
        head_dim=cfg["attention_head_dim"],
        patch_size=2,  # 2x2 latents per token, as lava counts it (Family.patch_size)
        joint_dim=cfg["joint_attention_dim"],
        vae_scale=8,
        vae_channels=128,
        vae_sample_size=1024,
        clip_len=0,
        t5_len=max_sequence_length,
        largest=max(big for _, big in parts.values()),
    )


def _text_encoder(size: str):
    if size == "dev":
        from transformers import Mistral3Config, Mistral3ForConditionalGeneration

        return Mistral3ForConditionalGeneration(Mistral3Config(**TEXT_ENCODER_CONFIGS["dev"]))
    from transformers import Qwen3Config, Qwen3ForCausalLM

    return Qwen3ForCausalLM(Qwen3Config(**TEXT_ENCODER_CONFIGS[size]))


def planner_geometry(spec, max_sequence_length: int = MAX_SEQUENCE_LENGTH):
    """A ``ModelSpec`` read from a FLUX.2 folder or pipeline with FLUX.2's token geometry: 2×2
    latents per token and a text sequence of ``max_sequence_length`` LLM tokens (no CLIP part)."""
    from dataclasses import replace

    return replace(spec, patch_size=2, clip_len=0, t5_len=max_sequence_length)

"""A Qwen-Image pipeline folder of configs only (no weights), for the memory planner offline.

    python -m scripts.qwen_image_configs /tmp/qwen-image-configs
    lava segment photo.jpg --classes cat,dog --model /tmp/qwen-image-configs --dry-run \
        --device cuda --dtype bf16

The planner sizes a folder from its configs and safetensors headers; without safetensors it
builds each module without storage and counts its parameters, so this folder gives the same
sizes as the real ``Qwen/Qwen-Image`` (whose JSON files ``lava segment --model qwen-image
--dry-run`` fetches itself, with network). The values are Qwen-Image's as published:

* transformer: ``QwenImageTransformer2DModel``'s defaults in diffusers are Qwen-Image's own
  (60 blocks, 24 heads × 128, joint attention dim 3584, patch 2, 64 input channels);
* VAE: ``AutoencoderKLQwenImage``'s defaults (base 96 channels, z 16, factor 8);
* text encoder: Qwen2.5-VL-7B-Instruct (language model 28 layers × 3584, MLP 18944, 28 heads,
  4 key/value heads, vocabulary 152064, untied embeddings; vision tower 32 blocks × 1280);
* tokenizer: a Qwen2 tokenizer whose ``model_max_length`` (131072) is not a CLIP window.
"""

from __future__ import annotations

import argparse
import json
import os

QWEN25_VL_7B_TEXT = dict(
    vocab_size=152064,
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    max_position_embeddings=128000,
    rms_norm_eps=1e-6,
    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
    bos_token_id=151643,
    eos_token_id=151645,
)
QWEN25_VL_7B_VISION = dict(
    depth=32,
    hidden_size=1280,
    intermediate_size=3420,
    num_heads=16,
    out_hidden_size=3584,
    fullatt_block_indexes=[7, 15, 23, 31],
    window_size=112,
    tokens_per_second=2,
)


def write_config_folder(folder: str) -> str:
    """Write ``model_index.json`` and each component's config into ``folder``; returns it."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig

    os.makedirs(folder, exist_ok=True)
    with init_empty_weights():
        QwenImageTransformer2DModel().save_config(os.path.join(folder, "transformer"))
        AutoencoderKLQwenImage().save_config(os.path.join(folder, "vae"))
    Qwen2_5_VLConfig(
        text_config=dict(QWEN25_VL_7B_TEXT),
        vision_config=dict(QWEN25_VL_7B_VISION),
        tie_word_embeddings=False,
    ).save_pretrained(os.path.join(folder, "text_encoder"))
    os.makedirs(os.path.join(folder, "tokenizer"), exist_ok=True)
    with open(os.path.join(folder, "tokenizer", "tokenizer_config.json"), "w") as fh:
        json.dump({"tokenizer_class": "Qwen2Tokenizer", "model_max_length": 131072}, fh)
    index = {
        "_class_name": "QwenImagePipeline",
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "Qwen2_5_VLForConditionalGeneration"],
        "tokenizer": ["transformers", "Qwen2Tokenizer"],
        "transformer": ["diffusers", "QwenImageTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKLQwenImage"],
    }
    with open(os.path.join(folder, "model_index.json"), "w") as fh:
        json.dump(index, fh, indent=2)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder")
    print(write_config_folder(parser.parse_args().folder))


if __name__ == "__main__":
    main()

"""``tiny-qwen-image``: the Qwen-Image architecture at toy size, built offline in about a second.

Every component is the real diffusers/transformers class — ``QwenImageTransformer2DModel``,
``AutoencoderKLQwenImage`` (the 3-D causal VAE, fed one frame), ``Qwen2_5_VLForConditionalGeneration``
(a 2-layer language model with a 1-block vision tower the pipeline never calls),
``FlowMatchEulerDiscreteScheduler`` — with a tiny config and seeded random weights, wrapped in a
real ``QwenImagePipeline``: prompts go through the pipeline's own chat template and its crop of
the first ``prompt_template_encode_start_idx`` (34) hidden states.

The tokenizer is a ``Qwen2Tokenizer`` (byte-level BPE behind Qwen's pre-tokenizer, with the
``<|im_start|>``/``<|im_end|>`` special tokens) whose merges are built here by rule: the words of
the pipeline's system prompt and of the tiny models' word list are single tokens (with and
without a leading space), so the system prompt is exactly 34 tokens as with Qwen's real tokenizer,
and any other word falls apart into several tokens.

Random weights give meaningless masks: this backend exists for tests and benchmarks.
"""

from __future__ import annotations

import re
from functools import lru_cache

from .tiny import (
    _CORPUS_WORDS,
    QWEN_SPECIAL_TOKENS,
    byte_alphabet,
    chain_merges,
    frozen,
    rule_bpe,
    seeded,
)

_LATENT_CHANNELS = 4  # the tiny VAE's z_dim (Qwen-Image's own VAE has 16)
# Per-channel latent statistics of the tiny VAE (the real VAE's config carries 16 such values):
# not 0/1, so a test sees whether encode_images applies them.
_LATENTS_MEAN = (-0.5, 0.25, 0.75, -0.125)
_LATENTS_STD = (2.0, 1.5, 0.5, 1.25)
TINY_QWEN_MAX_SEQUENCE_LENGTH = 64


@lru_cache(maxsize=1)
def pipeline_template() -> tuple[str, int]:
    """``(prompt_template_encode, prompt_template_encode_start_idx)`` as ``QwenImagePipeline`` sets
    them (read from a pipeline built without modules, so a diffusers change is followed)."""
    from diffusers import QwenImagePipeline

    pipe = QwenImagePipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, transformer=None)
    return pipe.prompt_template_encode, int(pipe.prompt_template_encode_start_idx)


@lru_cache(maxsize=1)
def _vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level BPE vocabulary and merges, by rule (deterministic in every process).

    Each word gets the merges that assemble it left to right, after a space (``"Ġword"``) and bare
    (at the start of a line). Space-led merges all rank first: inside a space-led word only its own
    chain can fire, so every listed word after a space is one token. Bare merges follow, longer
    ones before two-character ones, and the template's bare words (``system``, ``Describe``,
    ``user``, ``assistant``) start the list, so they are single tokens too and the pipeline's
    system prompt is exactly 34 tokens. Other bare words (the first class name of a prompt) may
    fall apart into pieces, as rarer words do.
    """
    template, _ = pipeline_template()
    for special in QWEN_SPECIAL_TOKENS:
        template = template.replace(special, "\n")
    # Words at the start of a line of the template (system, Describe, user, assistant) are bare.
    bare_first = re.findall(r"(?m)^[A-Za-z]+", template)
    words = list(dict.fromkeys([*re.findall(r"[A-Za-z]+", template), *sorted(set(_CORPUS_WORDS))]))
    spaced = [m for w in words for m in chain_merges("Ġ" + w)]
    bare = [m for w in dict.fromkeys([*bare_first, *words]) for m in chain_merges(w)]
    long_bare = [m for m in bare if len(m[0]) > 1]
    short_bare = [m for m in bare if len(m[0]) == 1]
    return rule_bpe({ch: i for i, ch in enumerate(byte_alphabet())}, [*spaced, *long_bare, *short_bare])


def build_tokenizer():
    """The tiny ``Qwen2Tokenizer``; checks that the pipeline's system prompt is 34 tokens with it."""
    from transformers import Qwen2Tokenizer

    vocab, merges = _vocab()
    tok = Qwen2Tokenizer(vocab=dict(vocab), merges=list(merges))
    tok.add_special_tokens({"additional_special_tokens": list(QWEN_SPECIAL_TOKENS[1:])})
    template, drop = pipeline_template()
    prefix = template.split("{}")[0]
    n = len(tok(prefix)["input_ids"])
    if n != drop:
        raise RuntimeError(f"the tiny Qwen tokenizer makes the system prompt {n} tokens, not {drop}")
    return tok


def build_tiny_qwen_pipeline(
    *,
    seed: int = 0,
    num_layers: int = 3,
    heads: int = 2,
    head_dim: int = 16,
    text_width: int = 32,
):
    """A ``QwenImagePipeline`` with toy-size components and seeded random weights (``tiny-qwen-image``).

    Transformer: ``num_layers`` double-stream blocks of ``heads × head_dim`` (RoPE axes 4+6+6 over
    frame, row, column), joint attention dim ``text_width``. VAE factor 2 with 4 latent channels,
    packed 2×2 into 16 channels: a 32 px image is 16×16 latents, 8×8 = 64 image tokens. Text
    encoder: a 2-layer Qwen2.5-VL language model of width ``text_width`` (multimodal RoPE sections
    2+3+3) whose last hidden layer the pipeline reads.
    """
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tok = build_tokenizer()
    with seeded(seed):
        transformer = QwenImageTransformer2DModel(
            patch_size=2,
            in_channels=4 * _LATENT_CHANNELS,
            out_channels=_LATENT_CHANNELS,
            num_layers=num_layers,
            attention_head_dim=head_dim,
            num_attention_heads=heads,
            joint_attention_dim=text_width,
            axes_dims_rope=(4, 6, 6),
        )
        vae = AutoencoderKLQwenImage(
            base_dim=8,
            z_dim=_LATENT_CHANNELS,
            dim_mult=[1, 2],
            num_res_blocks=1,
            temperal_downsample=[False],
            latents_mean=list(_LATENTS_MEAN),
            latents_std=list(_LATENTS_STD),
        )
        config = Qwen2_5_VLConfig(
            text_config=dict(
                vocab_size=len(tok),
                hidden_size=text_width,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=2,
                num_key_value_heads=1,
                max_position_embeddings=512,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
                bos_token_id=None,
                eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
                pad_token_id=tok.pad_token_id,
            ),
            vision_config=dict(
                depth=1,
                hidden_size=16,
                intermediate_size=32,
                num_heads=2,
                out_hidden_size=text_width,
                fullatt_block_indexes=[0],
            ),
            image_token_id=len(tok) + 10,
            video_token_id=len(tok) + 11,
            vision_start_token_id=len(tok) + 12,
            vision_end_token_id=len(tok) + 13,
        )
        text_encoder = Qwen2_5_VLForConditionalGeneration(config)

    # Qwen-Image's scheduler: dynamic shifting by the image token count.
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=1.0,
        use_dynamic_shifting=True,
        base_image_seq_len=256,
        max_image_seq_len=8192,
        base_shift=0.5,
        max_shift=0.9,
        shift_terminal=0.02,
        time_shift_type="exponential",
    )
    pipe = QwenImagePipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tok, transformer=transformer
    )
    return frozen(pipe)

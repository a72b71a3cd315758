"""``tiny-z-image``: the Z-Image architecture at toy size, built offline in well under a second.

Every component is the real class (``ZImageTransformer2DModel``, ``Qwen3Model``, ``AutoencoderKL``,
``FlowMatchEulerDiscreteScheduler``, transformers' ``Qwen2Tokenizer``) with a tiny config and
seeded random weights, wrapped in a real ``ZImagePipeline``. The tokenizer is a byte-level BPE
built here by rule (every byte is a token; each word of a fixed list gets the merges that make it,
with and without its leading space, one token), with Qwen's pre-tokenizer and a chat template
written for it that lays a user turn out as Qwen3's does, so rare words split into several
tokens and the prompt sits inside template tokens, as with the real model.

Random weights give meaningless masks: this backend exists for tests and for trying the pipeline
offline, not for segmenting photos.
"""

from __future__ import annotations

from .tiny import (
    _LATENT_CHANNELS,
    QWEN3_CHAT_TEMPLATE,
    QWEN_SPECIAL_TOKENS,
    _words,
    frozen,
    qwen_bpe,
    seeded,
    tiny_flux_vae,
)


def build_tokenizer():
    """The rule-built Qwen-style tokenizer with its chat template (deterministic, offline)."""
    from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

    vocab, merges = qwen_bpe((*_words(), "user", "assistant"), QWEN_SPECIAL_TOKENS)
    tok = Qwen2Tokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=131072)
    tok.add_special_tokens({"additional_special_tokens": list(QWEN_SPECIAL_TOKENS[1:])})
    tok.chat_template = QWEN3_CHAT_TEMPLATE
    # A word that is a whole vocabulary entry stays one token, whatever merges other words brought
    # (rule-built merges of different words would otherwise cut into each other).
    tok.backend_tokenizer.model.ignore_merges = True
    return tok


def build_tiny_zimage_pipeline(*, seed: int = 0, num_layers: int = 4, heads: int = 2, head_dim: int = 16):
    """A ``ZImagePipeline`` with toy-size components and seeded random weights (``tiny-z-image``).

    Transformer: ``num_layers`` main blocks (lava blocks 0..num_layers-1) after one noise-refiner
    and one context-refiner block, 2 heads × 16 (RoPE axes 4+6+6), patch 2. VAE factor 2 with 4
    latent channels: a 32 px image is 16×16 latents, 8×8 = 64 image tokens (two multiples of 32:
    no image pad tokens; other sizes get some). Text encoder: a 2-layer ``Qwen3Model`` of width 32;
    the pipeline reads its second-to-last hidden states. The learned pad tokens get random values
    (zeros in a fresh model) so that a test can tell them apart.
    """
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    tokenizer = build_tokenizer()
    width = 32
    with seeded(seed):
        transformer = ZImageTransformer2DModel(
            all_patch_size=(2,),
            all_f_patch_size=(1,),
            in_channels=_LATENT_CHANNELS,
            dim=heads * head_dim,
            n_layers=num_layers,
            n_refiner_layers=1,
            n_heads=heads,
            n_kv_heads=heads,
            cap_feat_dim=width,
            axes_dims=[4, 6, 6],
            axes_lens=[1024, 128, 128],
        )
        with torch.no_grad():
            transformer.x_pad_token.normal_()
            transformer.cap_pad_token.normal_()
        vae = tiny_flux_vae()  # Z-Image uses FLUX.1's VAE numbers
        text_encoder = Qwen3Model(
            Qwen3Config(
                vocab_size=len(tokenizer),
                hidden_size=width,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                head_dim=8,
                max_position_embeddings=1024,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
    # Z-Image-Turbo's scheduler: shift 3, no dynamic shifting.
    pipe = ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )
    return frozen(pipe)

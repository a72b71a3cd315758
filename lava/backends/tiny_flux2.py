"""``tiny-flux2``: FLUX.2 klein at toy size, built offline in about a second.

Every component is the real diffusers/transformers class with a tiny config and seeded random
weights, wrapped in a real ``Flux2KleinPipeline`` (the klein variant: its text encoder is a plain
``Qwen3ForCausalLM`` with a ``Qwen2Tokenizer``, simpler to build than FLUX.2-dev's Mistral-3 with its
Pixtral processor, and the pipeline's own ``encode_prompt`` runs unchanged):

* ``Flux2Transformer2DModel``: 2 double-stream and 2 parallel single-stream blocks (lava blocks
  0-1 and 2-3), 2 heads × 16, four RoPE axes of 4, no guidance embedding (klein);
* ``Qwen3ForCausalLM`` with 27 layers of width 16, so the pipeline's own hidden-state layers
  (9, 18, 27) exist: the text features are 3 × 16 = 48 wide;
* a byte-level BPE ``Qwen2Tokenizer`` built by rule from a word list (deterministic in every
  process) with the chat special tokens and a chat template of the same shape as Qwen3's
  (``<|im_start|>user ... <|im_end|>`` then the assistant turn with an empty think block);
* ``AutoencoderKLFlux2`` of factor 2 with 4 latent channels and seeded batch-norm statistics
  (patchified 2×2 into the transformer's 16 input channels): a 32 px image is 16×16 latents,
  8×8 = 64 image tokens.

Random weights give meaningless masks: this backend exists for tests and benchmarks.
"""

from __future__ import annotations

import torch

from .tiny import _LATENT_CHANNELS, QWEN3_CHAT_TEMPLATE, QWEN_SPECIAL_TOKENS, _words, frozen, qwen_bpe, seeded

TINY_FLUX2_MAX_SEQUENCE_LENGTH = 128
_TEXT_WIDTH = 16

_THINK = ("<think>", "</think>")


def build_qwen_tokenizer():
    """The toy ``Qwen2Tokenizer`` (fast, with character offsets) and its chat template."""
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    vocab, merges = qwen_bpe((*_words(), "user", "assistant", "system"))
    tok = Qwen2Tokenizer(
        vocab=dict(vocab),
        merges=list(merges),
        model_max_length=TINY_FLUX2_MAX_SEQUENCE_LENGTH * 8,
    )
    tok.add_tokens([AddedToken(t, special=True) for t in QWEN_SPECIAL_TOKENS[1:]], special_tokens=True)
    tok.add_tokens([AddedToken(t, special=False) for t in _THINK])
    tok.chat_template = QWEN3_CHAT_TEMPLATE
    return tok


def tiny_flux2_vae():
    """``AutoencoderKLFlux2`` of factor 2, 4 latent channels, with seeded batch-norm statistics
    (built under the caller's seed) so the pipeline's latent normalisation is not the identity."""
    from diffusers import AutoencoderKLFlux2

    vae = AutoencoderKLFlux2(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=_LATENT_CHANNELS,
        norm_num_groups=4,
        sample_size=32,
    )
    n = vae.bn.num_features
    vae.bn.running_mean.copy_(0.3 * torch.randn(n))
    vae.bn.running_var.copy_(0.5 + torch.rand(n))
    return vae


def build_tiny_flux2_pipeline(
    *,
    seed: int = 0,
    num_layers: int = 2,
    num_single_layers: int = 2,
    heads: int = 2,
    head_dim: int = 16,
    guidance_embeds: bool = False,
):
    """A ``Flux2KleinPipeline`` with toy-size components and seeded random weights (``tiny-flux2``)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Transformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tok = build_qwen_tokenizer()
    with seeded(seed):
        transformer = Flux2Transformer2DModel(
            patch_size=1,
            in_channels=4 * _LATENT_CHANNELS,  # the pipeline's 2x2 patchified latents
            num_layers=num_layers,
            num_single_layers=num_single_layers,
            attention_head_dim=head_dim,
            num_attention_heads=heads,
            joint_attention_dim=3 * _TEXT_WIDTH,  # three stacked hidden-state layers
            timestep_guidance_channels=32,
            axes_dims_rope=(head_dim // 4,) * 4,
            guidance_embeds=guidance_embeds,
        )
        vae = tiny_flux2_vae()
        text_encoder = Qwen3ForCausalLM(
            Qwen3Config(
                vocab_size=len(tok),
                hidden_size=_TEXT_WIDTH,
                intermediate_size=32,
                num_hidden_layers=27,
                num_attention_heads=2,
                num_key_value_heads=1,
                head_dim=8,
                max_position_embeddings=1024,
                pad_token_id=tok.pad_token_id,
                tie_word_embeddings=True,
            )
        )
    # FLUX.2's scheduler: shifted by the pipeline's own empirical mu for the image size.
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, time_shift_type="exponential"
    )
    pipe = Flux2KleinPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tok,
        transformer=transformer,
        is_distilled=True,
    )
    return frozen(pipe)

"""``tiny-chroma``: Chroma1's architecture at toy size, built offline in well under a second.

The real classes (``ChromaTransformer2DModel``, ``AutoencoderKL``, ``T5EncoderModel``,
``FlowMatchEulerDiscreteScheduler``) with tiny configs and seeded random weights, in a real
``ChromaPipeline``; the T5 unigram tokenizer is the rule-built one of ``lava.backends.tiny``. Random
weights give meaningless masks: this backend is for tests and benchmarks.
"""

from __future__ import annotations

from .tiny import _LATENT_CHANNELS, build_tokenizers, frozen, seeded, tiny_flux_vae, tiny_t5


def build_tiny_chroma_pipeline(
    *,
    seed: int = 0,
    num_layers: int = 2,
    num_single_layers: int = 2,
    heads: int = 2,
    head_dim: int = 16,
):
    """A ``ChromaPipeline`` with toy-size components and seeded random weights.

    Transformer: 2 double-stream and 2 single-stream blocks (lava blocks 0-1 and 2-3), 2 heads × 16,
    ``axes_dims_rope`` [4, 4, 8], a one-layer approximator 8 → 16 wide. VAE factor 2 with 4 latent
    channels, packed 2×2 into 16: a 32 px image is 8×8 = 64 image tokens. Text: T5 only, padded to
    the window and masked as ``ChromaPipeline`` masks it.
    """
    from diffusers import ChromaPipeline, ChromaTransformer2DModel, FlowMatchEulerDiscreteScheduler

    _, _, t5_tok = build_tokenizers()
    joint_dim = 32

    with seeded(seed):
        transformer = ChromaTransformer2DModel(
            patch_size=1,
            in_channels=4 * _LATENT_CHANNELS,  # 2x2 latent patches packed into one token
            num_layers=num_layers,
            num_single_layers=num_single_layers,
            attention_head_dim=head_dim,
            num_attention_heads=heads,
            joint_attention_dim=joint_dim,
            axes_dims_rope=(4, 4, 8),
            approximator_num_channels=8,
            approximator_hidden_dim=16,
            approximator_layers=1,
        )
        vae = tiny_flux_vae()
        text_encoder = tiny_t5(t5_tok, joint_dim)

    # Chroma1-HD's scheduler config: a static shift of 3, no dynamic shifting (the pipeline passes
    # a mu, which this config ignores).
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=False,
        base_image_seq_len=256,
        max_image_seq_len=4096,
        base_shift=0.5,
        max_shift=1.15,
    )
    pipe = ChromaPipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=t5_tok, transformer=transformer
    )
    return frozen(pipe)

"""``tiny-sd3``: the SD3 architecture at toy size, built offline in well under a second.

Every component is the real diffusers/transformers class (``SD3Transformer2DModel``,
``AutoencoderKL``, ``CLIPTextModelWithProjection`` ×2, ``T5EncoderModel``,
``FlowMatchEulerDiscreteScheduler``) with a tiny config and seeded random weights, wrapped in a
real ``StableDiffusion3Pipeline``. The CLIP BPE and T5 unigram tokenizers are built here by
rule from a fixed word list (deterministically, in every process), so they split rare words
into several tokens just as the real ones do.

Random weights give meaningless masks: this backend exists for tests, benchmarks and for
trying the pipeline offline, not for segmenting photos.
"""

from __future__ import annotations

import string
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache

import torch

# Words the tokenizers learn merges from; anything else still tokenizes, in smaller pieces.
_CORPUS_WORDS = """
a an the of and with in on photo picture image scene background foreground
person people man woman child cat dog horse sheep cow bird elephant bear zebra giraffe
car bus truck train boat aeroplane airplane bicycle motorbike motorcycle road street sidewalk
building house wall fence sky tree grass plant potted flower water sea river mountain floor
chair sofa table dining bed tv monitor bottle cup bowl book clock vase window door
traffic light sign stop pole red green blue yellow black white orange purple circle square
triangle shape
""".split()

_CLIP_MAX_LEN = 77
_LATENT_CHANNELS = 4  # the tiny VAE's (``tiny_vae``)


def _words() -> list[str]:
    return sorted(set(_CORPUS_WORDS))


def chain_merges(word) -> list[tuple[str, str]]:
    """The BPE merges that assemble ``word`` (a string, or a list of its symbols) left to right."""
    merges, left = [], word[0]
    for right in word[1:]:
        merges.append((left, right))
        left += right
    return merges


def rule_bpe(vocab: dict[str, int], merges) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A BPE built by rule rather than trained: ``vocab`` (the base symbols), then what each merge
    of ``merges`` makes, in order; a merge given twice counts once.

    (Training with ``tokenizers`` is not reproducible across processes: ties between equally
    frequent pairs are broken by hash order.)
    """
    kept: dict[tuple[str, str], None] = {}
    for pair in merges:
        if pair not in kept:
            kept[pair] = None
            vocab.setdefault(pair[0] + pair[1], len(vocab))
    return vocab, list(kept)


def byte_alphabet() -> list[str]:
    """The 256 byte symbols of byte-level BPE, sorted."""
    from tokenizers import pre_tokenizers

    return sorted(pre_tokenizers.ByteLevel.alphabet())


@lru_cache(maxsize=4)
def _clip_vocab(first: tuple[str, ...] = ()) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level BPE in CLIP's format, built by rule (``rule_bpe``).

    Every byte exists inside a word and word-final (``"x</w>"``), and each corpus word gets the
    merges that assemble it left to right, so corpus words are single tokens — unless an earlier
    word's merge splits them first — and any other word falls apart into several tokens, as rare
    words do in the real CLIP vocabulary. The words in ``first`` get their merges ahead of the
    corpus, so each of them is always a single token.
    """
    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in byte_alphabet():
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    words = [*first, *_words()]
    return rule_bpe(vocab, [m for w in words for m in chain_merges([*w[:-1], w[-1] + "</w>"])])


# Qwen's chat markers (added tokens of the real Qwen2.5/Qwen3 tokenizers); ``<|endoftext|>`` pads.
QWEN_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

# The layout of a Qwen3 chat turn as Flux2KleinPipeline and ZImagePipeline render it (user turns,
# the generation prompt, thinking switched off): written for the toy tokenizers, not copied from
# Qwen's file.
QWEN3_CHAT_TEMPLATE = (
    "{%- for m in messages -%}"
    "{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and not enable_thinking -%}"
    "{{- '<think>\\n\\n</think>\\n\\n' -}}"
    "{%- endif -%}"
    "{%- endif -%}"
)


@lru_cache(maxsize=4)
def qwen_bpe(
    words: tuple[str, ...], specials: tuple[str, ...] = ()
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level BPE in Qwen's format (no end-of-word marks, a leading space is ``Ġ``), by rule:
    ``specials``, then every byte; each of ``words``, bare and after a space, gets the merges that
    assemble it left to right, so listed words are one token and others split."""
    vocab = {token: i for i, token in enumerate(specials)}
    for ch in byte_alphabet():
        vocab.setdefault(ch, len(vocab))
    return rule_bpe(vocab, [m for w in words for piece in (w, "Ġ" + w) for m in chain_merges(piece)])


@lru_cache(maxsize=1)
def _t5_vocab() -> list[tuple[str, float]]:
    """A SentencePiece-style unigram vocabulary, built by rule (deterministic, like ``_clip_vocab``).

    Whole corpus words (``"▁word"``) score far above single characters, so they stay one piece;
    any other word is spelled out in characters.
    """
    vocab: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -5.0)]
    vocab += [(f"▁{w}", -1.0 - 0.01 * i) for i, w in enumerate(_words())]
    chars = string.ascii_letters + string.digits + string.punctuation
    vocab += [(c, -10.0) for c in chars] + [(f"▁{c}", -10.5) for c in chars]
    return vocab


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run the block under ``torch.manual_seed(seed)``, leaving the global (CPU) generator as it was:
    the tiny models build their modules inside it, so their random weights depend on ``seed`` alone."""
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.random.set_rng_state(state)


def tiny_t5(tokenizer, width: int):
    """A 2-layer T5 encoder of ``width`` for the tiny test models (built under their seeded RNG)."""
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer),
            d_model=width,
            d_kv=8,
            d_ff=48,
            num_layers=2,
            num_heads=4,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            decoder_start_token_id=0,
        )
    )


def tiny_clip_text_config(tokenizer, hidden: int = 12, **extra) -> dict:
    """The 2-layer CLIP text encoder config of the tiny test models, as ``CLIPTextConfig`` keywords
    (``extra`` adds or overrides entries, e.g. ``projection_dim``)."""
    return {
        "vocab_size": len(tokenizer),
        "hidden_size": hidden,
        "intermediate_size": 24,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "max_position_embeddings": _CLIP_MAX_LEN,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        **extra,
    }


def tiny_vae(scaling_factor: float, shift_factor: float):
    """The tiny models' ``AutoencoderKL``: factor 2, 4 latent channels, no quant convs (as SD3/Flux)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=_LATENT_CHANNELS,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=32,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def tiny_flux_vae():
    """``tiny_vae`` with FLUX.1's latent scaling and shift (``flux.VAE_CONFIG``), which Chroma and
    Z-Image share."""
    from .flux import VAE_CONFIG

    return tiny_vae(scaling_factor=VAE_CONFIG["scaling_factor"], shift_factor=VAE_CONFIG["shift_factor"])


def frozen(pipe):
    """``pipe`` with every module it holds in eval mode and its gradients off (the tiny models are
    built for inference only)."""
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval().requires_grad_(False)
    return pipe


def build_tokenizers():
    """CLIP BPE (×2, as SD3 has) and T5 unigram tokenizers, built locally and deterministically."""
    from transformers import CLIPTokenizer, T5Tokenizer

    vocab, merges = _clip_vocab()
    clip = CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=_CLIP_MAX_LEN)
    clip_2 = CLIPTokenizer(
        vocab=dict(vocab), merges=list(merges), model_max_length=_CLIP_MAX_LEN, pad_token="!"
    )
    t5 = T5Tokenizer(vocab=list(_t5_vocab()), extra_ids=0)
    return clip, clip_2, t5


# Two variants: SD3-medium-like (plain joint blocks) and SD3.5-like (dual attention in the first
# blocks, qk RMS-norm). Sizes are chosen so a CPU forward takes milliseconds.
TINY_CONFIGS = {
    "sd3": dict(dual_attention_layers=(), qk_norm=None),
    "sd3.5": dict(dual_attention_layers=(0, 1), qk_norm="rms_norm"),
}


def build_tiny_pipeline(
    variant: str = "sd3",
    *,
    seed: int = 0,
    num_layers: int = 4,
    heads: int = 2,
    head_dim: int = 8,
    t5: bool = True,
    pos_embed_max_size: int = 32,
):
    """A ``StableDiffusion3Pipeline`` with toy-size components and seeded random weights.

    Image side 32 px (VAE factor 2, patch 2 → 8×8 = 64 image tokens); text tokens 77 + 128;
    the position embedding covers up to ``pos_embed_max_size · 4`` px.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    if variant not in TINY_CONFIGS:
        raise ValueError(f"tiny variant must be one of {sorted(TINY_CONFIGS)}, got {variant!r}")
    clip_tok, clip_tok_2, t5_tok = build_tokenizers()
    inner = heads * head_dim
    clip_hidden, clip_proj, joint_dim = 12, 16, 32

    with seeded(seed):
        transformer = SD3Transformer2DModel(
            sample_size=16,
            patch_size=2,
            in_channels=4,
            out_channels=4,
            num_layers=num_layers,
            attention_head_dim=head_dim,
            num_attention_heads=heads,
            joint_attention_dim=joint_dim,
            caption_projection_dim=inner,
            pooled_projection_dim=2 * clip_proj,
            pos_embed_max_size=pos_embed_max_size,
            **TINY_CONFIGS[variant],
        )
        vae = tiny_vae(scaling_factor=1.5305, shift_factor=0.0609)

        def clip_encoder(pad_id: int):
            # Both encoders share clip_tok's vocabulary; only the pad token differs (clip_tok_2's "!").
            cfg = tiny_clip_text_config(clip_tok, clip_hidden, projection_dim=clip_proj, pad_token_id=pad_id)
            return CLIPTextModelWithProjection(CLIPTextConfig(**cfg))

        text_encoder = clip_encoder(clip_tok.pad_token_id)
        text_encoder_2 = clip_encoder(clip_tok_2.pad_token_id)
        text_encoder_3 = None
        if t5:
            text_encoder_3 = tiny_t5(t5_tok, joint_dim)

    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tok,
        text_encoder_2=text_encoder_2,
        tokenizer_2=clip_tok_2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=t5_tok if t5 else None,
    )
    return frozen(pipe)


TINY_MAX_SEQUENCE_LENGTH = 128


def build_tiny_flux_pipeline(
    *,
    seed: int = 0,
    num_layers: int = 2,
    num_single_layers: int = 2,
    heads: int = 2,
    head_dim: int = 16,
    guidance_embeds: bool = True,
):
    """A ``FluxPipeline`` with toy-size components and seeded random weights (``tiny-flux``).

    The transformer follows diffusers' own Flux model test (2 heads × 16, ``axes_dims_rope``
    [4, 4, 8]) with 2 double-stream and 2 single-stream blocks (lava blocks 0-1 and 2-3) and a
    guidance embedding, like FLUX.1-dev. VAE factor 2 with 4 latent channels, packed 2×2 into 16
    channels: a 32 px image is 16×16 latents, 8×8 = 64 image tokens. The text sequence is T5
    only (``TINY_MAX_SEQUENCE_LENGTH`` tokens); CLIP gives the pooled vector.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel

    clip_tok, _, t5_tok = build_tokenizers()
    clip_hidden, joint_dim = 12, 32

    with seeded(seed):
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=4 * _LATENT_CHANNELS,  # 2x2 latent patches packed into one token
            num_layers=num_layers,
            num_single_layers=num_single_layers,
            attention_head_dim=head_dim,
            num_attention_heads=heads,
            joint_attention_dim=joint_dim,
            pooled_projection_dim=clip_hidden,
            guidance_embeds=guidance_embeds,
            axes_dims_rope=(4, 4, 8),
        )
        vae = tiny_flux_vae()
        text_encoder = CLIPTextModel(CLIPTextConfig(**tiny_clip_text_config(clip_tok, clip_hidden)))
        text_encoder_2 = tiny_t5(t5_tok, joint_dim)

    # FLUX.1-dev's scheduler: dynamic shifting by the image token count.
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_image_seq_len=256,
        max_image_seq_len=4096,
        base_shift=0.5,
        max_shift=1.15,
    )
    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tok,
        text_encoder_2=text_encoder_2,
        tokenizer_2=t5_tok,
        transformer=transformer,
    )
    return frozen(pipe)

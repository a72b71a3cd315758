"""The ``lava-shapes`` architecture: a small SD3 MM-DiT in pixel space with two small CLIP encoders.

Every part is the stock diffusers/transformers class, so lava reads it through its ordinary SD3
path (``StableDiffusion3Pipeline.encode_prompt``, ``SD3Transformer2DModel`` joint attention):

* ``SD3Transformer2DModel`` on **pixels** (``vae=None``: the "latents" are RGB in [-1, 1], 3
  channels, 32×32 px, patch 2 → a 16×16 grid of 256 image tokens). A VAE would add a second
  model to train and ship and blur the 32-px shapes; at this size pixel space is cheap.
* Two ``CLIPTextModelWithProjection`` with **one** layer each. SD3 feeds the transformer the
  penultimate hidden state, which with one layer is the token + position embedding: every text
  key is a plain word vector, and all context mixing happens inside the MM-DiT's text stream.
  Their pooled output (end token, projected) is held at **zero**: SD3 adds it to the timestep
  embedding, where it would hand every image token a bag-of-words summary of the caption. A small
  model trained briefly then leans on that global shortcut and barely needs to look up the words
  where they apply; without it the joint attention is the only way text reaches the image, and
  that attention is exactly what lava reads.
* No T5: ``encode_prompt`` then appends ``max_sequence_length`` zero vectors, which the
  transformer sees (identically at training and inference) as a few constant "null" tokens.
* ``lava.backends.tiny``'s rule-built CLIP BPE with a 32-token window, so the joint sequence stays
  short (256 + 32 + 8 tokens). Every word of the scenes (``scenes.scene_words()``: colours,
  shapes, "background", "a", "and") gets its merges first and is one token, so a prompt naming
  all 12 colour+shape classes is 24 tokens (26 with begin and end) and fits one window. (The
  first shipped model used the plain rule, under which "triangle" fell into 6 pieces and the
  12 names needed two prompts.)
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "lava-shapes"
CONFIG_FILE = "lava-shapes.json"


@dataclass(frozen=True)
class ReferenceConfig:
    """Sizes of the reference model (defaults = the shipped model)."""

    resolution: int = 32  # image side in pixels (training and inference)
    patch_size: int = 2
    num_layers: int = 4
    num_heads: int = 4
    head_dim: int = 32
    qk_norm: str | None = "rms_norm"  # SD3.5's qk RMS-norm keeps attention logits tame at a high lr
    clip_max_length: int = 32  # tokens per CLIP window, begin/end tokens included
    text_hidden: int = 64  # CLIP-L stand-in width
    text_hidden_2: int = 32  # CLIP-G stand-in width
    text_proj: int = 32  # pooled projection per encoder
    t5_tokens: int = 8  # zero "T5" tokens appended (max_sequence_length)
    # False: the pooled CLIP projections are zero and frozen, so the caption reaches the image
    # only through the joint attention (see the module docstring).
    pooled_text: bool = False
    # Blocks with SD3.5's extra image-only self-attention (MMDiT-X); () is SD3-medium's plain blocks.
    dual_attention_layers: tuple[int, ...] = ()
    # The transformer's input: RGB pixels (3 channels, factor 1, the first model) or the latents of
    # a VAE with ``latent_channels`` channels, ``vae_factor`` pixels per latent cell per side.
    latent_channels: int = 3
    vae_factor: int = 1

    @property
    def inner_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def grid(self) -> int:
        """Image tokens per side."""
        return self.resolution // (self.vae_factor * self.patch_size)

    @property
    def token_pixels(self) -> int:
        """Pixels per image token side."""
        return self.vae_factor * self.patch_size

    @property
    def joint_attention_dim(self) -> int:
        # Both CLIP hidden states are concatenated per token; no padding is needed.
        return self.text_hidden + self.text_hidden_2

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ReferenceConfig:
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        if "dual_attention_layers" in kw:
            kw["dual_attention_layers"] = tuple(kw["dual_attention_layers"])  # a list in JSON
        return cls(**kw)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def build_tokenizers(config: ReferenceConfig):
    """The two CLIP tokenizers (same BPE as ``tiny-sd3``, window ``clip_max_length``).

    Like SD3's, the first pads with the end token and the second with ``"!"``.
    """
    from transformers import CLIPTokenizer

    from ..backends.tiny import _clip_vocab
    from .scenes import scene_words

    vocab, merges = _clip_vocab(scene_words())
    n = config.clip_max_length
    tok = CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=n)
    tok_2 = CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=n, pad_token="!")
    return tok, tok_2


def build_pipeline(config: ReferenceConfig | None = None, *, seed: int = 0, vae=None):
    """An untrained ``StableDiffusion3Pipeline`` of ``config`` with seeded initial weights, on the
    latents of ``vae`` (a trained ``AutoencoderKL``, kept as it is) or on pixels (``vae=None``).

    Components are in train mode with gradients on; ``train.py`` trains transformer and both
    text encoders together.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    config = config or ReferenceConfig()
    tok, tok_2 = build_tokenizers(config)
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        grid = config.grid
        transformer = SD3Transformer2DModel(
            sample_size=config.resolution // config.vae_factor,
            patch_size=config.patch_size,
            in_channels=config.latent_channels,
            out_channels=config.latent_channels,
            num_layers=config.num_layers,
            attention_head_dim=config.head_dim,
            num_attention_heads=config.num_heads,
            joint_attention_dim=config.joint_attention_dim,
            caption_projection_dim=config.inner_dim,
            pooled_projection_dim=2 * config.text_proj,
            pos_embed_max_size=grid,
            qk_norm=config.qk_norm,
            dual_attention_layers=config.dual_attention_layers,
        )

        def clip(hidden: int, pad_id: int) -> CLIPTextModelWithProjection:
            cfg = CLIPTextConfig(
                vocab_size=len(tok),
                hidden_size=hidden,
                intermediate_size=2 * hidden,
                projection_dim=config.text_proj,
                num_hidden_layers=1,
                num_attention_heads=2,
                max_position_embeddings=config.clip_max_length,
                hidden_act="gelu",
                bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id,
                pad_token_id=pad_id,
            )
            return CLIPTextModelWithProjection(cfg)

        text_encoder = clip(config.text_hidden, tok.pad_token_id)
        text_encoder_2 = clip(config.text_hidden_2, tok_2.pad_token_id)
        if not config.pooled_text:
            for enc in (text_encoder, text_encoder_2):
                enc.text_projection.weight.data.zero_()
                enc.text_projection.requires_grad_(False)
    finally:
        torch.random.set_rng_state(state)
    return StableDiffusion3Pipeline(
        transformer=transformer,
        # Training samples σ logit-normally with no shift; shift 1 keeps the scheduler's own
        # N-step schedules (lava's ``timestep_for_step``) consistent with that.
        scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tok,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tok_2,
        text_encoder_3=None,
        tokenizer_3=None,
    )


def text_embeddings(pipe, captions: list[str], config: ReferenceConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """``([B, clip_max_length + t5_tokens, joint_dim], [B, 2·text_proj])`` exactly as lava encodes.

    This *is* ``StableDiffusion3Pipeline.encode_prompt`` (penultimate CLIP hidden states of both
    encoders, concatenated, zero T5 part), called with gradients on so training sees precisely
    the embedding inference uses.
    """
    embeds, _, pooled, _ = pipe.encode_prompt(
        prompt=captions,
        prompt_2=None,
        prompt_3=None,
        device=pipe.transformer.device,
        do_classifier_free_guidance=False,
        max_sequence_length=config.t5_tokens,
    )
    return embeds, pooled


def save_pipeline(pipe, out_dir: str | os.PathLike, config: ReferenceConfig, meta: dict[str, Any]) -> None:
    """Write the pipeline as a stock diffusers folder (``model_index.json``, fp16 safetensors of the
    trained modules, tokenizers, scheduler; the VAE where there is one) plus ``lava-shapes.json``
    (``config`` and ``meta``), so ``StableDiffusion3Pipeline.from_pretrained(out_dir)`` loads it."""
    from diffusers.utils import logging as diffusers_logging

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # diffusers warns on every ``.to(float16)`` of a model that lists no fp32-only modules.
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    # fp16 halves the transformer and VAE files; diffusers loads them back as fp32 unless asked
    # otherwise. The text encoders (a few hundred kB) stay fp32: transformers loads a checkpoint in
    # its stored dtype, and fp16 prompt embeddings would make the stock pipeline's latents fp16.
    halved = [m for m in (pipe.transformer, pipe.vae) if m is not None]
    try:
        for module in halved:
            module.to(torch.float16)
        pipe.save_pretrained(out, safe_serialization=True)
    finally:
        for module in halved:
            module.to(torch.float32)
        diffusers_logging.set_verbosity(verbosity)
    with open(out / CONFIG_FILE, "w") as f:
        json.dump({"model": config.to_dict(), **meta}, f, indent=2)
        f.write("\n")


def read_config(path: str | os.PathLike = ASSET_DIR) -> tuple[ReferenceConfig, dict[str, Any]]:
    """``(ReferenceConfig, the rest of the JSON)`` of a saved model folder."""
    with open(Path(path) / CONFIG_FILE) as f:
        raw = json.load(f)
    return ReferenceConfig.from_dict(raw.pop("model")), raw


def load_pipeline(path: str | os.PathLike = ASSET_DIR, dtype: torch.dtype = torch.float32):
    """The saved pipeline (eval mode, no gradients), weights cast to ``dtype``."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    from ..errors import ModelError

    path = Path(path)
    if not (path / CONFIG_FILE).is_file():
        raise ModelError(
            f"no lava-shapes weights in {path}: regenerate them with "
            "`python -m scripts.train --out lava/assets/lava-shapes`"
        )
    if (path / "model_index.json").is_file():  # a stock folder (every model since v2)
        # No T5: the folder lists none, and diffusers wants that said (as for SD3 without T5).
        pipe = StableDiffusion3Pipeline.from_pretrained(
            path, dtype=dtype, text_encoder_3=None, tokenizer_3=None
        )
        for module in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
            if module is not None:
                module.eval().requires_grad_(False)
        return pipe
    pipe = StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel.from_pretrained(path / "transformer", torch_dtype=dtype),
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(path / "scheduler"),
        vae=None,
        text_encoder=CLIPTextModelWithProjection.from_pretrained(path / "text_encoder", dtype=dtype),
        tokenizer=CLIPTokenizer.from_pretrained(path / "tokenizer"),
        text_encoder_2=CLIPTextModelWithProjection.from_pretrained(path / "text_encoder_2", dtype=dtype),
        tokenizer_2=CLIPTokenizer.from_pretrained(path / "tokenizer_2"),
        text_encoder_3=None,
        tokenizer_3=None,
    )
    for module in (pipe.transformer, pipe.text_encoder, pipe.text_encoder_2):
        module.eval().requires_grad_(False)
    return pipe

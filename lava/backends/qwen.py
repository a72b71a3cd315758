"""The ``qwen-image`` family: Qwen-Image (``QwenImagePipeline``, ``QwenImageTransformer2DModel``).

What the adapter follows, read from diffusers' ``transformer_qwenimage.py`` and
``pipeline_qwenimage.py``:

* 60 double-stream blocks (lava blocks 0-59 in execution order), each one joint attention
  (``QwenDoubleStreamAttnProcessor2_0``) over ``[text; image]``: text first.
* q/k/v per stream (``to_q/k/v`` for the image, ``add_q/k/v_proj`` for the text), heads split by
  ``inner_dim // heads``, per-head RMS norms (``norm_q/k``, ``norm_added_q/k``), then the
  multimodal RoPE of ``QwenEmbedRope`` applied per stream *before* concatenation: image tokens
  rotate by (frame, row, column) with rows and columns centred on the image (``scale_rope``),
  text token ``i`` by position ``max(h/2, w/2) + i`` on all three axes (it starts after the
  image's largest index). Probabilities are taken after RoPE, as the model attends.
* The joint mask is built from ``encoder_hidden_states_mask`` (``[B, T]``, 1 = a real token):
  ``[mask; ones]`` as a ``[B, 1, 1, N]`` bool key mask. Padded text keys take no probability from
  any query; padded text queries still attend (their rows never reach the image stream).
* Text: the prompt is wrapped in the pipeline's chat template (a system prompt describing images),
  run through Qwen2.5-VL, and the last hidden layer kept without the template's first
  ``prompt_template_encode_start_idx`` = 34 tokens (the system prompt and ``<|im_start|>user``),
  up to ``max_sequence_length`` tokens, each prompt as long as its own tokens, with a mask. lava
  pads every prompt to ``max_sequence_length`` (default 256) with zeros under a false mask, so the
  model computes exactly what it computes on the unpadded prompt.
* Latents: a 16-channel 3-D causal VAE (``AutoencoderKLQwenImage``, factor 8) fed one frame,
  normalised per channel by ``latents_mean``/``latents_std`` (the img2img pipeline's
  ``_encode_vae_image``), packed 2×2 into 64-channel tokens as Flux packs them.
* Timestep: ``t / 1000`` (the model scales it by 1000 again); no guidance embedding, no pooled
  vector.
"""

from __future__ import annotations

import dataclasses

import torch
from einops import rearrange

from ..errors import ClassNameError, LavaError
from .base import VariantDefaults
from .family import Family, JointQKV
from .tokens import token_spans

HUB_IDS = {"qwen-image": "Qwen/Qwen-Image"}

# The pipeline crops and pads to max_sequence_length (its default 512, at most 1024). Padding is
# masked out of every softmax, so the window changes no probability of a prompt that fits it; it
# bounds how many class tokens fit one prompt and adds T text tokens to every joint attention.
# 256 holds 251 tokens of class names (the template's closing 5 tokens stay inside; longer lists
# are split over prompts) and adds 6% to the 4096 image tokens of a 1024 px image, 25% at 1024.
MAX_SEQUENCE_LENGTH = 256
PACK = 2  # QwenImagePipeline packs 2x2 latent patches into one token (_pack_latents)

# No published study reads Qwen-Image's joint attention for segmentation (Seg4Diff reads SD3,
# SD3.5 and FLUX.1; ConceptAttention FLUX.1 and SD3.5), so the reading is a stated rule.
DEFAULTS = {
    "qwen-image": VariantDefaults(
        timestep=500.0,
        layers=(22,),
        resolution=1024,
        source=(
            "unmeasured: Seg4Diff's SD3-medium relative depth 9/24 scaled to Qwen-Image's 60 blocks "
            "(block 22), t=500 (σ=0.5, mid-trajectory); no published reading of Qwen-Image"
        ),
    ),
    "tiny-qwen-image": VariantDefaults(
        timestep=500.0,
        layers=(1, 2),
        resolution=32,
        source="toy model with random weights: any setting is as good as any other",
    ),
}


BLOCKS = 60  # Qwen-Image's double-stream blocks


def fitted_defaults(transformer_config) -> VariantDefaults:
    """``DEFAULTS["qwen-image"]`` for a model of this family with another block count (a fine-tune
    or a model trained from scratch): the block at the same relative depth."""
    d = DEFAULTS["qwen-image"]
    n = int(transformer_config.num_layers)
    if n == BLOCKS:
        return d
    layers = tuple(sorted({min(n - 1, round(layer * n / BLOCKS)) for layer in d.layers}))
    return dataclasses.replace(
        d,
        layers=layers,
        source=f"unmeasured: qwen-image's reading ({d.source}) at the same relative depth of {n} blocks",
    )


def detect_variant(transformer_config, hint: str = "") -> str:
    """``qwen-image``: the one published text-to-image variant (the Edit and Layered models use
    other pipelines)."""
    return "qwen-image"


class QwenImageFamily(Family):
    """Qwen-Image (``QwenImageTransformer2DModel``): double-stream blocks only, text first,
    multimodal RoPE, padded text masked, a Qwen2.5-VL encoder behind a chat template."""

    name = "qwen-image"
    transformer_classes = ("QwenImageTransformer2DModel",)
    encoder_name = "Qwen2.5-VL"
    t5_module = "text_encoder"  # the encoder whose tokens make the text sequence
    t5_prompt_arg = "prompt"
    clip_in_sequence = False

    # ---- blocks ---------------------------------------------------------------------------------
    def blocks(self, transformer) -> list:
        return list(transformer.transformer_blocks)

    def block_kinds(self, transformer) -> list[str]:
        return ["double"] * len(transformer.transformer_blocks)

    def has_joint_attention(self, block) -> bool:
        return True

    # ---- layout and text ------------------------------------------------------------------------
    def patch_size(self, transformer) -> int:
        return PACK

    def clip_len(self, pipe) -> int:
        return 0

    def t5_tokenizer(self, pipe):
        return getattr(pipe, "tokenizer", None)

    def text_summary(self, backend) -> str:
        return f"{self.encoder_name} only (chat template, first {template(backend.pipe)[1]} tokens cropped)"

    def sequence_spans(self, backend, text: str, chars: dict) -> dict:
        """Token positions of each character range of ``text`` in the sequence the transformer sees:
        the templated prompt tokenized as the pipeline tokenizes it, minus the cropped prefix."""
        tmpl, drop = template(backend.pipe)
        offset = tmpl.index("{}")
        shifted = {key: (a + offset, b + offset) for key, (a, b) in chars.items()}
        spans = token_spans(self.t5_tokenizer(backend.pipe), tmpl.format(text), shifted)
        out = {key: tuple(p - drop for p in pos) for key, pos in spans.items()}
        cropped = [key for key, pos in out.items() if pos and min(pos) < 0]
        if cropped:
            raise ClassNameError(
                f"{cropped[0]!r} shares tokens with the chat template's prefix that the pipeline crops; "
                "start the prompt with a word"
            )
        return out

    def sequence_window(self, backend) -> int:
        """Positions that can hold a class: the window less the template's closing tokens
        (``<|im_end|>``, a newline, ``<|im_start|>assistant``, a newline), which stay in it."""
        tmpl, _ = template(backend.pipe)
        tail = tmpl.split("{}")[1]
        closing = len(self.t5_tokenizer(backend.pipe)(tail, add_special_tokens=False)["input_ids"])
        return backend.max_sequence_length - closing

    def encode_text(self, pipe, texts: list[str], device, max_sequence_length: int):
        """``QwenImagePipeline.encode_prompt``'s embeddings ``[P, L, D]`` (``L`` = the longest
        prompt's tokens after the crop) padded with zeros to ``max_sequence_length``, the mask
        ``[P, T]`` true at each prompt's own tokens, and an empty pooled ``[P, 0]``."""
        embeds, mask = pipe.encode_prompt(
            prompt=texts, device=device, max_sequence_length=max_sequence_length
        )
        p, length, _ = embeds.shape
        full = torch.zeros(p, max_sequence_length, dtype=torch.bool, device=embeds.device)
        full[:, :length] = True if mask is None else mask.to(full.device, torch.bool)
        padded = embeds.new_zeros(p, max_sequence_length, embeds.shape[-1])
        padded[:, :length] = embeds
        return padded, embeds.new_zeros(p, 0), full

    def encode_images(self, vae, pixels: torch.Tensor) -> torch.Tensor:
        """``[B, C, h, w]`` latents of ``pixels`` ``[B, 3, H, W]``: one frame through the 3-D VAE,
        the posterior mean normalised per channel as ``QwenImageImg2ImgPipeline._encode_vae_image``
        does (``(z - latents_mean) · (1 / latents_std)``)."""
        z = vae.encode(pixels.unsqueeze(2)).latent_dist.mean  # [B, C, 1, h, w]
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(shape).to(z.device, z.dtype)
        inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(shape).to(z.device, z.dtype)
        return ((z - mean) * inv_std)[:, :, 0]

    # ---- one attention call ---------------------------------------------------------------------
    def qkv(self, attn, hidden_states, encoder_hidden_states, rotary=None, text_len=None, **call) -> JointQKV:
        """q, k, v as ``QwenDoubleStreamAttnProcessor2_0`` builds them (same ops, same
        ``[B, N, H, D]`` layout, so bitwise the ones the model attends with), as ``[B, H, N, D]``
        views, and the joint key mask from ``encoder_hidden_states_mask``."""
        from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen

        if encoder_hidden_states is None:
            raise LavaError("a Qwen-Image joint attention call needs the text hidden states; got none")
        if call.get("attention_mask") is not None:
            raise LavaError(
                "Qwen-Image builds its joint mask from encoder_hidden_states_mask, not attention_mask"
            )
        head_dim = attn.inner_dim // attn.heads

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.unflatten(-1, (-1, head_dim))

        q, k, v = (heads(p(hidden_states)) for p in (attn.to_q, attn.to_k, attn.to_v))
        ctx = encoder_hidden_states
        cq, ck, cv = (heads(p(ctx)) for p in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        if attn.norm_added_q is not None:
            cq = attn.norm_added_q(cq)
        if attn.norm_added_k is not None:
            ck = attn.norm_added_k(ck)
        if rotary is not None:
            img_freqs, txt_freqs = rotary
            q = apply_rotary_emb_qwen(q, img_freqs, use_real=False)
            k = apply_rotary_emb_qwen(k, img_freqs, use_real=False)
            cq = apply_rotary_emb_qwen(cq, txt_freqs, use_real=False)
            ck = apply_rotary_emb_qwen(ck, txt_freqs, use_real=False)
        q, k, v = torch.cat([cq, q], dim=1), torch.cat([ck, k], dim=1), torch.cat([cv, v], dim=1)
        mask = call.get("encoder_hidden_states_mask")
        if mask is not None:
            image = torch.ones(hidden_states.shape[:2], dtype=torch.bool, device=hidden_states.device)
            mask = torch.cat([mask.to(torch.bool), image], dim=1)[:, None, None, :]
        return JointQKV(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0, int(ctx.shape[1]), mask=mask
        )

    def finish(self, attn, out: torch.Tensor, joint: JointQKV, single_stream: bool):
        """``(image, text)`` outputs through ``to_out`` and ``to_add_out``, as the processor returns."""
        t = joint.text_len
        context, hidden = out[:, :t], out[:, t:]
        hidden = attn.to_out[0](hidden.contiguous())
        if len(attn.to_out) > 1:
            hidden = attn.to_out[1](hidden)
        return hidden, attn.to_add_out(context.contiguous())

    # ---- the transformer call -------------------------------------------------------------------
    def inputs(self, latents, embeds, pooled, timestep, *, guidance=None, text_mask=None) -> dict:
        """Packed latents, the image shape for RoPE (one frame), the text mask and ``t / 1000``."""
        if guidance is not None:
            raise LavaError("Qwen-Image has no guidance embedding: leave guidance out")
        h, w = latents.shape[-2:]
        if h % PACK or w % PACK:
            raise LavaError(
                f"Qwen-Image packs 2x2 latent patches: latent size {h}x{w} must be even on both sides"
            )
        packed = rearrange(latents, "b c (h p) (w q) -> b (h w) (c p q)", p=PACK, q=PACK)
        return dict(
            hidden_states=packed,
            encoder_hidden_states=embeds,
            encoder_hidden_states_mask=text_mask,
            timestep=timestep / 1000,
            img_shapes=[[(1, h // PACK, w // PACK)]] * latents.shape[0],
        )

    def output_latents(self, sample: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        return rearrange(sample, "b (h w) (c p q) -> b c (h p) (w q)", h=grid[0], w=grid[1], p=PACK, q=PACK)

    # ---- a pipeline's own calls (lava.trace) ----------------------------------------------------
    def prompt_outputs(self, result) -> tuple[torch.Tensor, torch.Tensor]:
        """``(embeds, [P, 0])`` from ``QwenImagePipeline.encode_prompt``'s ``(embeds, mask)``."""
        embeds = result[0]
        return embeds, embeds.new_zeros(embeds.shape[0], 0)

    def call_info(self, transformer, inputs: dict) -> tuple[tuple[int, int], float]:
        """The grid from ``img_shapes`` (``[[(frames, rows, columns)]]`` per batch entry) and the
        timestep the pipeline passed as ``t / 1000`` back in lava's units."""
        shape = inputs["img_shapes"][0]
        _, rows, cols = shape[0] if isinstance(shape, list) else shape
        return (int(rows), int(cols)), float(inputs["timestep"].flatten()[0]) * 1000


def template(pipe) -> tuple[str, int]:
    """The pipeline's chat template and how many of its leading tokens the pipeline crops."""
    return pipe.prompt_template_encode, int(pipe.prompt_template_encode_start_idx)


QWEN = QwenImageFamily()

"""The ``zimage`` backend family: Z-Image (``ZImagePipeline``, ``ZImageTransformer2DModel``).

Z-Image is a single-stream DiT. Before its main blocks, two kinds of refiner blocks run apart:
``noise_refiner`` on the image tokens alone and ``context_refiner`` on the caption tokens alone;
neither has any text↔image attention, so lava never captures them and does not number them.
lava's block numbers are the main blocks ``transformer.layers`` in execution order (Z-Image-Turbo:
0-29), each of which attends over one sequence holding the image and the caption together.

One main-block attention call, as diffusers' ``ZSingleStreamAttnProcessor`` runs it:

* the sequence of each batch entry is ``[image; caption]`` (``_build_unified_sequence``, non-omni
  mode): the image's patch tokens in row-major order, padded with the learned ``x_pad_token`` to
  a multiple of ``SEQ_MULTI_OF`` (32), then the caption's tokens (the pipeline has already dropped
  the masked ones) padded with the learned ``cap_pad_token`` to a multiple of 32; entries are
  then padded to the longest one and those positions masked (``attention_mask`` ``[B, N]``);
  the pad tokens inside an entry are *not* masked: the model attends to them;
* q, k, v from ``to_q/to_k/to_v`` of the whole sequence, per-head RMS norms on q and k, then
  RoPE (``freqs_cis``, complex, 3 axes) on q and k: probabilities are taken after RoPE;
* SDPA with the mask, then ``to_out``.

For the slice op the text range is everything after the image grid: the image's pad tokens
(``text_offset`` of them, when the grid is not a multiple of 32 tokens), the caption, its pad
tokens and the batch padding. lava's text position ``p`` (the ``p``-th caption token) is joint
position ``n_img + text_offset + p``; the image rows are exactly the grid's tokens.

The number of grid tokens is read from the call's own ``freqs_cis``: Z-Image gives every token of
the image one frame position (axis 0 of its RoPE ids: the caption's padded length + 1), caption
tokens the positions 1, 2, ... and pad tokens 0, so the grid is the leading run of tokens sharing
the first token's axis-0 rotation. Omni mode (``[caption; image; siglip]``) is not supported.

Inputs: the transformer takes lists (``x``: ``[C, 1, h, w]`` latents per entry, ``cap_feats``:
``[L_i, D]`` per entry) and the time as ``(1000 - t) / 1000`` (``ZImagePipeline``: 1 is clean),
and it predicts ``x₀ − ε`` (the pipeline negates the output before the scheduler step), so
``output_latents`` negates it back to lava's velocity ``ε − x₀``.
"""

from __future__ import annotations

import dataclasses

import torch

from ..errors import LavaError
from .base import VariantDefaults
from .family import Family, JointQKV
from .tokens import token_spans

HUB_IDS = {"z-image-turbo": "Tongyi-MAI/Z-Image-Turbo"}

# ZImagePipeline's own default window (max_sequence_length=512 Qwen3 tokens, chat template included).
MAX_SEQUENCE_LENGTH = 512
SEQ_MULTI_OF = 32  # diffusers.models.transformers.transformer_z_image.SEQ_MULTI_OF

# No published study reads Z-Image's attention for segmentation (searched: Seg4Diff, ConceptAttention
# and the Z-Image report read other models or none). The default is a stated rule, as for
# SD3.5-large: Seg4Diff's relative depth on SD3-medium (block 9 of 24) scaled to the 30 main blocks,
# and its timestep (t=515, σ≈0.515). Unmeasured: sweep it.
RELATIVE_DEPTH = 9 / 24
SEG4DIFF_T = 515.07

DEFAULTS = {
    "z-image-turbo": VariantDefaults(
        timestep=SEG4DIFF_T,
        layers=(11,),
        resolution=1024,
        source="unmeasured: Seg4Diff's relative depth 9/24 (SD3-medium) scaled to Z-Image's 30 main blocks "
        "(block 11), t=515; no published reading point for Z-Image",
    ),
    "tiny-z-image": VariantDefaults(
        timestep=500.0,
        layers=(1, 2),
        resolution=32,
        source="toy model with random weights: any setting is as good as any other",
    ),
}

# Published configs, for planning memory without downloading anything (lava.model_spec.zimage_spec):
# the transformer's are diffusers' ZImageTransformer2DModel defaults (those of
# Tongyi-MAI/Z-Image-Turbo), the text encoder is Qwen3-4B (Qwen3Model: the pipeline reads hidden
# states, no LM head), the VAE FLUX.1's (``flux.VAE_CONFIG``).
TRANSFORMER_CONFIG = dict(
    all_patch_size=(2,),
    all_f_patch_size=(1,),
    in_channels=16,
    dim=3840,
    n_layers=30,
    n_refiner_layers=2,
    n_heads=30,
    n_kv_heads=30,
    cap_feat_dim=2560,
    axes_dims=[32, 48, 48],
    axes_lens=[1024, 512, 512],
)
TEXT_ENCODER_CONFIG = dict(
    vocab_size=151936,
    hidden_size=2560,
    intermediate_size=9728,
    num_hidden_layers=36,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    tie_word_embeddings=True,
)


def _rotate(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """RoPE as Z-Image applies it: channel pairs of ``x`` ``[B, N, H, D]`` as complex numbers times
    ``freqs`` ``[B, N, D/2]``, in float32, back in ``x``'s dtype (the same ops as the processor)."""
    z = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(z * freqs.unsqueeze(2)).flatten(3).type_as(x)


def image_token_count(freqs: torch.Tensor) -> int:
    """Tokens of the image grid at the start of every entry of one call, from its ``freqs_cis``
    ``[B, N, D/2]``: the leading run sharing the first token's axis-0 rotation (see the module
    docstring). Raises when the entries disagree (lava runs one image size per call)."""
    first = freqs[:, :, 0]
    same = first == first[:, :1]
    counts = torch.where(same.all(1), same.shape[1], (~same).int().argmax(1))
    if int(counts.min()) != int(counts.max()):
        raise LavaError(f"Z-Image entries of one call hold different image sizes ({counts.tolist()} tokens)")
    return int(counts[0])


class ZImageFamily(Family):
    """Z-Image (``ZImageTransformer2DModel``): one unified ``[image; caption]`` sequence per block."""

    name = "zimage"
    transformer_classes = ("ZImageTransformer2DModel",)
    encoder_name = "Qwen3"
    clip_in_sequence = False

    def text_summary(self, backend) -> str:
        return "Qwen3 only, chat template; no pooled vector"

    def blocks(self, transformer) -> list:
        """The main blocks (``transformer.layers``) in execution order; the refiners are not numbered."""
        return list(transformer.layers)

    def block_kinds(self, transformer) -> list[str]:
        return ["unified"] * len(transformer.layers)

    def has_joint_attention(self, block) -> bool:
        return True  # every main block attends over image and caption together

    def attention(self, block):
        return block.attention

    # ---- layout and text ----------------------------------------------------------------------
    t5_module = "text_encoder"  # the encoder whose tokens are the text sequence (Qwen3 here)

    def patch_size(self, transformer) -> int:
        return int(transformer.config.all_patch_size[0])

    def clip_len(self, pipe) -> int:
        return 0

    def t5_tokenizer(self, pipe):
        return getattr(pipe, "tokenizer", None)

    @staticmethod
    def template_parts(tokenizer) -> tuple[str, str]:
        """The chat template around a user message, as ``ZImagePipeline._encode_prompt`` renders it
        (``add_generation_prompt=True, enable_thinking=True``): ``(before, after)`` the text."""
        marker = "\x00lava-prompt\x00"
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": marker}],
            tokenize=False,
            add_generation_prompt=True,
            enable_thinking=True,
        )
        if rendered.count(marker) != 1:
            raise LavaError("the tokenizer's chat template does not place the user message once, verbatim")
        before, after = rendered.split(marker)
        return before, after

    def sequence_spans(self, backend, text: str, chars: dict) -> dict:
        """Token positions of each character range of ``text`` in the templated prompt the pipeline
        tokenizes (every token the text encoder reads is kept; none is cropped)."""
        tokenizer = backend.t5_tokenizer
        before, after = self.template_parts(tokenizer)
        shifted = {key: (a + len(before), b + len(before)) for key, (a, b) in chars.items()}
        return token_spans(tokenizer, before + text + after, shifted)

    def sequence_window(self, backend) -> int:
        """Positions a class may take: the window less the template's closing tokens, so every
        prompt reaches the encoder whole (the pipeline would cut it at ``max_sequence_length``)."""
        tokenizer = backend.t5_tokenizer
        _, after = self.template_parts(tokenizer)
        tail = len(tokenizer(after, add_special_tokens=False)["input_ids"])
        return backend.max_sequence_length - tail

    def encode_text(self, pipe, texts: list[str], device, max_sequence_length: int):
        """The pipeline's own ``encode_prompt`` (one ``[L_i, D]`` tensor per prompt, masked tokens
        dropped) laid out as lava's ``[P, T, D]`` with ``T = max_sequence_length``, zeros past each
        prompt, and the mask of the real tokens; no pooled vector (``[P, 0]``)."""
        embeds, _ = pipe.encode_prompt(
            prompt=list(texts),  # the pipeline rewrites the list it is given in place
            device=device,
            do_classifier_free_guidance=False,
            max_sequence_length=max_sequence_length,
        )
        first = embeds[0]
        out = first.new_zeros(len(embeds), max_sequence_length, first.shape[-1])
        mask = torch.zeros(len(embeds), max_sequence_length, dtype=torch.bool, device=first.device)
        for i, e in enumerate(embeds):
            out[i, : e.shape[0]] = e
            mask[i, : e.shape[0]] = True
        return out, first.new_zeros(len(embeds), 0), mask

    def qkv(self, attn, hidden_states, encoder_hidden_states, rotary=None, text_len=None, **call) -> JointQKV:
        """q, k, v as ``ZSingleStreamAttnProcessor`` builds them (after RoPE) as ``[B, H, N, D]`` views.

        ``hidden_states`` is the whole ``[B, N, C]`` sequence, ``rotary`` the call's ``freqs_cis``
        and ``call["attention_mask"]`` its ``[B, N]`` batch-padding mask (``None`` when the entries
        are equally long)."""
        if encoder_hidden_states is not None or rotary is None:
            raise LavaError(
                "a Z-Image attention call takes one sequence and its freqs_cis; got "
                + ("separate text hidden states" if encoder_hidden_states is not None else "no freqs_cis")
            )

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.unflatten(-1, (attn.heads, -1))

        q, k, v = (heads(proj(hidden_states)) for proj in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        q, k = _rotate(q, rotary), _rotate(k, rotary)
        mask = call.get("attention_mask")
        if mask is not None and mask.ndim == 2:
            mask = mask[:, None, None, :]
        n, n_img = hidden_states.shape[1], image_token_count(rotary)
        pads = -n_img % SEQ_MULTI_OF
        return JointQKV(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            text_start=n_img,
            text_len=n - n_img,
            mask=mask,
            text_offset=pads,
        )

    def finish(self, attn, out: torch.Tensor, joint: JointQKV, single_stream: bool):
        hidden = attn.to_out[0](out)
        if len(attn.to_out) > 1:
            hidden = attn.to_out[1](hidden)
        return hidden

    def inputs(self, latents, embeds, pooled, timestep, *, guidance=None, text_mask=None) -> dict:
        """The lists the transformer takes: ``x`` ``[C, 1, h, w]`` per entry, ``cap_feats`` the real
        tokens of each entry's text (``text_mask``; all ``T`` when ``None``), and the time as
        ``ZImagePipeline`` passes it, ``(1000 - t) / 1000`` (in float32, as the pipeline's)."""
        if guidance is not None:
            raise LavaError("Z-Image has no guidance embedding: give no guidance")
        x = list(latents.unsqueeze(2).unbind(0))
        if text_mask is None:
            caps = list(embeds.unbind(0))
        else:
            caps = [e[m.to(e.device)] for e, m in zip(embeds, text_mask, strict=True)]
        return dict(x=x, t=(1000 - timestep.float()) / 1000, cap_feats=caps)

    def output_latents(self, sample, grid: tuple[int, int]) -> torch.Tensor:
        """The list of ``[C, 1, h, w]`` outputs as ``[B, C, h, w]`` velocities ``ε − x₀`` (the model
        predicts ``x₀ − ε``; ``ZImagePipeline`` negates it too)."""
        return -torch.stack(list(sample)).squeeze(2)

    # ---- a pipeline's own calls (lava.trace) ----------------------------------------------------
    # ZImagePipeline.encode_prompt returns ``(captions, negative captions)``: one ``[L_i, D]`` tensor
    # per prompt (masked tokens dropped), not repeated per image. Its ``__call__`` then repeats each
    # caption ``num_images_per_prompt`` times (prompt-major, the same tensor objects) and, under CFG,
    # passes ``captions + negatives`` as ``cap_feats``, the latents as the list ``x`` and the time
    # as ``(1000 - t) / 1000``, all positionally.
    t5_prompt_arg = "prompt"

    def prompt_outputs(self, result) -> tuple[torch.Tensor, torch.Tensor]:
        """``(embeds [P, L, D], [P, 0])``: the prompts' captions zero-padded to the longest one
        (lava's text position ``p`` is the ``p``-th caption token, chat template included)."""
        caps = list(result[0])
        if not caps:
            raise LavaError("ZImagePipeline.encode_prompt returned no caption")
        length = max(int(c.shape[0]) for c in caps)
        out = caps[0].new_zeros(len(caps), length, caps[0].shape[-1])
        for i, c in enumerate(caps):
            out[i, : c.shape[0]] = c
        return out, out.new_zeros(len(caps), 0)

    def prompt_rows(self, result) -> tuple[torch.Tensor, ...]:
        """The prompts' own caption tensors, one per prompt, as ``encode_prompt`` returned them."""
        return tuple(result[0])

    def conditional_rows(self, inputs: dict, cond) -> tuple[int, int] | None:
        """The entries of ``cap_feats`` that carry the prompts: those that are the very tensors
        ``encode_prompt`` returned for them (a negative prompt equal to the prompt is still another
        tensor), or, when the call got copies (none is), those equal to them. They must form one
        block ``[prompt 0 × n, prompt 1 × n, ...]`` (ZImagePipeline's: conditional first under CFG);
        ``None`` when no entry carries a prompt. (By value, a single prompt whose negative prompt
        is the same text cannot be told from it: only the identity pass tells them apart.)"""
        caps = inputs.get("cap_feats")
        if not isinstance(caps, list | tuple) or not all(torch.is_tensor(c) for c in caps):
            return None  # omni mode (nested lists) is not read; call_info refuses it first
        ids = {id(c): p for p, c in enumerate(cond)}
        hits = [ids.get(id(c)) for c in caps]
        if all(h is None for h in hits):
            hits = [next((p for p, c in enumerate(cond) if _same(c, e)), None) for e in caps]
        start = next((j for j, h in enumerate(hits) if h is not None), None)
        if start is None:
            return None
        end = start
        while end < len(hits) and hits[end] is not None:
            end += 1
        n, rest = divmod(end - start, len(cond))
        if (
            rest
            or hits[start:end] != [p for p in range(len(cond)) for _ in range(n)]
            or any(h is not None for h in hits[end:])
        ):
            raise LavaError(
                "the prompts' captions in this Z-Image call are not laid out as ZImagePipeline lays them "
                "out (each prompt's caption once per image, prompt-major, in one block): lava.trace "
                "cannot tell which entries are the conditional ones"
            )
        return start, end - start

    def call_info(self, transformer, inputs: dict) -> tuple[tuple[int, int], float]:
        """The grid from the latents ``x`` (one ``[C, 1, h, w]`` per entry, all of one size) and the
        time the pipeline passed as ``(1000 - t) / 1000`` back in lava's units."""
        x = inputs["x"]
        if inputs.get("siglip_feats") is not None or not all(torch.is_tensor(e) for e in x):
            raise LavaError(
                "this Z-Image call is in omni mode (reference images): lava reads text-to-image calls only"
            )
        sizes = {tuple(e.shape[-2:]) for e in x}
        if len(sizes) != 1:
            raise LavaError(f"Z-Image entries of one call hold different latent sizes {sorted(sizes)}")
        (h, w), p = sizes.pop(), self.patch_size(transformer)
        t = inputs["t"]
        t = float(t.flatten()[0]) if torch.is_tensor(t) else float(t)
        return (h // p, w // p), (1 - t) * 1000


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.to(b.device, b.dtype), b)


ZIMAGE = ZImageFamily()


def detect_variant(transformer_config, hint: str = "") -> str:
    """``z-image-turbo``: the one Z-Image variant lava knows (any Z-Image transformer reads as it)."""
    return "z-image-turbo"


def defaults_for(transformer_config) -> VariantDefaults:
    """Z-Image-Turbo's defaults, the block scaled to the model's depth when it has not 30 main blocks."""
    base = DEFAULTS["z-image-turbo"]
    n = int(transformer_config.get("n_layers", 30))
    if n == 30:
        return base
    block = min(n - 1, round(RELATIVE_DEPTH * n))
    return dataclasses.replace(
        base, layers=(block,), source=f"unmeasured: relative depth 9/24 scaled to {n} main blocks, t=515"
    )

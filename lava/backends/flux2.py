"""The ``flux2`` family: FLUX.2 dev and klein (``Flux2Pipeline``, ``Flux2KleinPipeline``;
``Flux2Transformer2DModel``).

What lava reads, as diffusers' ``transformer_flux2.py`` computes it:

* blocks in execution order: the double-stream blocks (``Flux2AttnProcessor``: per-stream
  q/k/v, per-head RMS norms, ``[text; image]``), then the parallel single-stream blocks
  (``Flux2ParallelSelfAttnProcessor``: one fused projection gives q/k/v *and* the MLP input of
  the whole ``[text; image]`` sequence; the attention output and the activated MLP hidden states
  go through one fused output projection). FLUX.2-dev: 0-7 double, 8-55 single;
* RoPE over four axes ``(t, h, w, l)`` after the norms, on text *and* image tokens (text ids are
  ``(0, 0, 0, l)``: unlike FLUX.1 the text tokens are rotated by their position);
* no attention mask: the pipelines pad the prompt to ``max_sequence_length`` (512) and the
  transformer attends to every padded position, so lava reads the same softmax over them;
* no pooled vector; dev feeds a guidance embedding, klein none (its base models use true CFG);
* latents: the VAE (``AutoencoderKLFlux2``, 32 channels) latents are patchified 2×2 into 128
  channels and normalised by the VAE's batch-norm statistics (``Flux2Pipeline._encode_vae_image``),
  then packed into tokens. lava keeps ``NoisyLatents`` as ``[B, 32, h, w]`` with that
  normalisation applied (the patchify is a rearrangement, undone after normalising), so noise,
  packing and the grid work as for FLUX.1 (one token = 2×2 latents = 16 px);
* the prompt: a chat template around the text (dev: Mistral-3 with a system message; klein:
  Qwen3, one user turn with an empty think block), padded to 512 tokens; the hidden states of
  three layers stacked into the feature dimension are the text sequence the transformer reads.
  A class's span is found in the templated token sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from einops import rearrange

from ..errors import ClassNameError, LavaError
from .base import VariantDefaults
from .family import FluxFamily, JointQKV

HUB_IDS = {
    "flux2-dev": "black-forest-labs/FLUX.2-dev",
    "flux2-klein-4b": "black-forest-labs/FLUX.2-klein-4B",
    "flux2-klein-9b": "black-forest-labs/FLUX.2-klein-9B",
    "flux2-klein-base-4b": "black-forest-labs/FLUX.2-klein-base-4B",
    "flux2-klein-base-9b": "black-forest-labs/FLUX.2-klein-base-9B",
}

# Blocks in lava's numbering (double-stream first), from the transformer configs: dev 8 + 48,
# klein 4B 5 + 20, klein 9B 8 + 24.
BLOCK_SCHEME = {
    "flux2-dev": "blocks 0-7 double-stream, 8-55 single-stream; Mistral-3 24B text encoder",
    "flux2-klein-4b": "blocks 0-4 double-stream, 5-24 single-stream; Qwen3-4B text encoder",
    "flux2-klein-9b": "blocks 0-7 double-stream, 8-31 single-stream; Qwen3-8B text encoder",
    "flux2-klein-base-4b": "blocks 0-4 double-stream, 5-24 single-stream; Qwen3-4B text encoder, undistilled",
    "flux2-klein-base-9b": "blocks 0-7 double-stream, 8-31 single-stream; Qwen3-8B text encoder, undistilled",
}

# Both pipelines pad and truncate the prompt to 512 tokens (``max_sequence_length`` default).
MAX_SEQUENCE_LENGTH = 512
# Flux2Pipeline's default guidance_scale (the guidance embedding's value on dev).
DEV_GUIDANCE = 4.0

_UNMEASURED = (
    "unmeasured: nothing public reads FLUX.2's attention for segmentation; rule: the last two "
    "double-stream blocks (ConceptAttention reads FLUX.1's last double-stream blocks, Seg4Diff's best "
    "FLUX.1-dev blocks 12 and 17 are double-stream) at t=500 (sigma 0.5, ConceptAttention's reading time)"
)


def _rule(last_double: int) -> VariantDefaults:
    return VariantDefaults(
        timestep=500.0, layers=(last_double - 1, last_double), resolution=1024, source=_UNMEASURED
    )


# Double-stream block counts: dev 8, klein-4B 5, klein-9B 8 (their transformer configs).
DEFAULTS = {
    "flux2-dev": _rule(7),
    "flux2-klein-4b": _rule(4),
    "flux2-klein-9b": _rule(7),
    "flux2-klein-base-4b": _rule(4),
    "flux2-klein-base-9b": _rule(7),
    "tiny-flux2": VariantDefaults(
        timestep=500.0,
        layers=(1, 2),
        resolution=32,
        source="toy model with random weights: any setting is as good as any other",
    ),
}


def detect_variant(transformer_config, hint: str = "", distilled: bool | None = None) -> str:
    """The registry variant of a FLUX.2 transformer config: dev (guidance embedding, 48 heads),
    klein 4B (24 heads) or 9B (32 heads); ``distilled`` False (a klein pipeline's ``is_distilled``)
    picks the base model. Other sizes read as dev or klein by the guidance embedding."""
    if transformer_config.get("guidance_embeds"):
        return "flux2-dev"
    size = "9b" if int(transformer_config.get("num_attention_heads", 24)) >= 32 else "4b"
    base = distilled is False or "base" in hint.lower()
    return f"flux2-klein-{'base-' if base else ''}{size}"


@dataclass(frozen=True)
class Flux2QKV(JointQKV):
    """``JointQKV`` plus the MLP input a parallel single-stream block computes with q/k/v."""

    mlp: torch.Tensor | None = None


class Flux2Call:
    """What sits on a FLUX.2 attention module while lava captures it: calls the capture processor
    with the arguments in the order it takes them (the single-stream module passes no text hidden
    states), and refuses the klein KV-cache path (reference-image tokens attend only to themselves
    there, which the capture does not compute)."""

    def __init__(self, proc, single_stream: bool):
        self.proc = proc
        self.single_stream = single_stream

    def __call__(
        self,
        attn,
        hidden_states,
        *args,
        kv_cache=None,
        kv_cache_mode=None,
        num_txt_tokens: int = 0,
        num_ref_tokens: int = 0,
    ):
        if kv_cache_mode is not None:
            raise LavaError(
                "lava does not capture FLUX.2 klein's KV-cached reference-image calls "
                "(Flux2KleinKVPipeline): trace or segment without reference images"
            )
        if self.single_stream:
            args = (None, *args)  # (attention_mask, image_rotary_emb) -> (None, mask, rotary)
        return self.proc(attn, hidden_states, *args)


class Flux2Family(FluxFamily):
    """FLUX.2 (``Flux2Transformer2DModel``): double-stream blocks, then parallel single-stream ones.

    Numbering, token order (``[text; image]``) and packing as FLUX.1; what differs is read here:
    the fused single-stream projection, four-axis RoPE on text too, the LLM prompt, no pooled
    vector, and the VAE's batch-norm latent normalisation.
    """

    name = "flux2"
    transformer_classes = ("Flux2Transformer2DModel",)
    encoder_name = "LLM"

    # ---- capture ------------------------------------------------------------------------------
    def capture_processor(self, proc):
        return Flux2Call(proc, proc.single_stream)

    def text_len_hook(self, transformer, set_text_len):
        # Single-stream blocks get the concatenated sequence and no text hidden states; the text
        # length of the whole call is that of the first double-stream block's text input.
        if not len(transformer.transformer_blocks):
            return None

        def hook(module, args, kwargs):
            context = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
            if context is not None:
                set_text_len(int(context.shape[1]))

        return transformer.transformer_blocks[0].register_forward_pre_hook(hook, with_kwargs=True)

    def qkv(self, attn, hidden_states, encoder_hidden_states, rotary=None, text_len=None, **call) -> JointQKV:
        """q, k, v ``[B, H, N, D]`` after the norms and RoPE, as the model's processors build them.

        Double-stream calls are FLUX.1's (``FluxFamily.qkv``); a single-stream call gets the whole
        ``[B, T + N_img, C]`` sequence through ``to_qkv_mlp_proj`` and keeps the MLP half for ``finish``.
        """
        if call.get("attention_mask") is not None:
            raise LavaError("FLUX.2's transformer attends without a mask; this call passed one")
        if encoder_hidden_states is not None:
            return super().qkv(attn, hidden_states, encoder_hidden_states, rotary, text_len)
        if text_len is None:
            raise LavaError(
                "a FLUX.2 single-stream attention call needs the number of text tokens at the start of "
                "its sequence; capture through lava.stages.capture.capturing, which reads it from the model"
            )
        from diffusers.models.embeddings import apply_rotary_emb

        proj = attn.to_qkv_mlp_proj(hidden_states)
        qkv_dim = 3 * attn.inner_dim
        mlp_dim = attn.mlp_hidden_dim * attn.mlp_mult_factor
        local = proj.shape[-1] * qkv_dim // (qkv_dim + mlp_dim)
        qkv, mlp = torch.split(proj, [local, proj.shape[-1] - local], dim=-1)
        q, k, v = (x.unflatten(-1, (-1, attn.head_dim)) for x in qkv.chunk(3, dim=-1))
        q, k = attn.norm_q(q), attn.norm_k(k)
        if rotary is not None:
            q = apply_rotary_emb(q, rotary, sequence_dim=1)
            k = apply_rotary_emb(k, rotary, sequence_dim=1)
        return Flux2QKV(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0, int(text_len), mlp=mlp)

    def finish(self, attn, out: torch.Tensor, joint: JointQKV, single_stream: bool):
        if not single_stream:
            return super().finish(attn, out, joint, single_stream)
        # The parallel block: attention output and activated MLP through one output projection.
        return attn.to_out(torch.cat([out, attn.mlp_act_fn(joint.mlp)], dim=-1))

    # ---- layout and text ----------------------------------------------------------------------
    t5_module = "text_encoder"  # the encoder whose tokens hold the classes: the LLM

    def t5_tokenizer(self, pipe):
        """The text tokenizer (FLUX.2-dev's processor holds it as ``.tokenizer``)."""
        tok = getattr(pipe, "tokenizer", None)
        return getattr(tok, "tokenizer", tok)

    def text_summary(self, backend) -> str:
        encoder = getattr(backend.pipe, "text_encoder", None)
        what = type(encoder).__name__ if encoder is not None else "no text encoder"
        return f"{what}, chat template, no pooled vector"

    def encode_images(self, vae, pixels: torch.Tensor) -> torch.Tensor:
        """The VAE mean normalised as ``Flux2Pipeline._encode_vae_image`` does (patchify 2×2, subtract
        the batch-norm running mean, divide by its std), returned un-patchified ``[B, C, h, w]``."""
        mean = vae.encode(pixels).latent_dist.mean
        patched = rearrange(mean, "b c (h p) (w q) -> b (c p q) h w", p=2, q=2)
        bn = vae.bn
        mu = bn.running_mean.view(1, -1, 1, 1).to(patched.device, patched.dtype)
        std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(
            patched.device, patched.dtype
        )
        return rearrange((patched - mu) / std, "b (c p q) h w -> b c (h p) (w q)", p=2, q=2)

    def encode_text(self, pipe, texts: list[str], device, max_sequence_length: int):
        """``(embeds [P, T, D], [P, 0], None)`` from the pipeline's own ``encode_prompt``: no pooled
        vector, and no mask (the transformer attends to the padded positions too)."""
        embeds, _text_ids = pipe.encode_prompt(
            prompt=list(texts), device=device, max_sequence_length=max_sequence_length
        )
        return embeds, embeds.new_zeros(embeds.shape[0], 0), None

    def chat_text(self, pipe, text: str) -> str:
        """The prompt as the pipeline's chat template renders it (a string, before tokenizing)."""
        tok = pipe.tokenizer
        if hasattr(pipe, "system_message"):  # Flux2Pipeline: Mistral-3, system message first
            from diffusers.pipelines.flux2.pipeline_flux2 import format_input

            if "[IMG]" in text:
                raise ClassNameError("FLUX.2-dev's pipeline removes '[IMG]' from prompts: leave it out")
            rendered = tok.apply_chat_template(
                format_input(prompts=[text], system_message=pipe.system_message),
                add_generation_prompt=False,
                tokenize=False,
            )
            return rendered[0] if isinstance(rendered, list) else rendered
        return tok.apply_chat_template(
            [{"role": "user", "content": text}],
            tokenize=False,
            add_generation_prompt=True,
            enable_thinking=False,
        )

    def _pipeline_ids(self, pipe, text: str, max_sequence_length: int) -> list[int]:
        """The token ids the pipeline's own encoder call reads (padding left out)."""
        tok = pipe.tokenizer
        if hasattr(pipe, "system_message"):
            from diffusers.pipelines.flux2.pipeline_flux2 import format_input

            enc = tok.apply_chat_template(
                format_input(prompts=[text], system_message=pipe.system_message),
                add_generation_prompt=False,
                tokenize=True,
                return_dict=True,
                padding="max_length",
                truncation=True,
                max_length=max_sequence_length,
            )
        else:
            enc = tok(
                self.chat_text(pipe, text),
                padding="max_length",
                truncation=True,
                max_length=max_sequence_length,
            )
        ids, mask = enc["input_ids"], enc["attention_mask"]
        ids = ids[0] if not isinstance(ids[0], int) else ids
        mask = mask[0] if not isinstance(mask[0], int) else mask
        return [int(i) for i, m in zip(ids, mask, strict=True) if int(m)]

    def _templated(self, pipe, text: str) -> tuple[str, int, list, list[int]]:
        """``(chat text, where text starts in it, token offsets, token ids)`` of a prompt."""
        chat, empty = self.chat_text(pipe, text), self.chat_text(pipe, "")
        start = _insertion_point(empty, chat, text)
        tok = self.t5_tokenizer(pipe)
        bos = getattr(tok, "bos_token", None)
        # The processor's chat path adds no second BOS when the template starts with one.
        special = not (bos and chat.startswith(bos))
        enc = tok(chat, return_offsets_mapping=True, add_special_tokens=special, verbose=False)
        return chat, start, enc["offset_mapping"], list(enc["input_ids"])

    def sequence_spans(self, backend, text: str, chars: dict) -> dict:
        """Each class's token positions in the templated sequence the transformer reads (counted from
        its first token, the template's own tokens included). The tokenization read here is checked
        against the pipeline's own; a difference raises rather than giving a wrong span."""
        pipe = backend.pipe
        _chat, start, offsets, ids = self._templated(pipe, text)
        n = backend.max_sequence_length
        own = self._pipeline_ids(pipe, text, n)
        if ids[: len(own)] != own:
            raise LavaError(
                "FLUX.2 prompt spans: tokenizing the chat text gives other tokens than the pipeline's "
                "own encode_prompt; cannot place the classes exactly"
            )
        return {
            name: tuple(i for i, (s, e) in enumerate(offsets) if e > s and s < start + b and e > start + a)
            for name, (a, b) in chars.items()
        }

    def sequence_window(self, backend) -> int:
        """Positions that can hold a class: ``max_sequence_length`` less the template's tokens after
        the prompt (the end of the user turn, and klein's assistant turn), which must stay in."""
        # A one-letter prompt marks where the prompt ends (an empty one would not say where it sits).
        _chat, start, offsets, _ids = self._templated(backend.pipe, "a")
        after = sum(1 for s, e in offsets if s >= start + 1 and e > s)
        return backend.max_sequence_length - after

    def prompt_outputs(self, result) -> tuple[torch.Tensor, torch.Tensor]:
        """``(embeds, [P, 0])`` from ``encode_prompt``'s ``(embeds, text_ids)``: no pooled vector."""
        embeds = result[0]
        return embeds, embeds.new_zeros(embeds.shape[0], 0)

    t5_prompt_arg = "prompt"

    # ---- transformer calls --------------------------------------------------------------------
    def inputs(self, latents, embeds, pooled, timestep, *, guidance=None, text_mask=None) -> dict:
        """Packed latents, four-axis position ids ``(t, h, w, l)`` as the pipeline makes them (image
        ``(0, row, col, 0)``, text ``(0, 0, 0, l)``), the timestep as ``t / 1000`` and, on dev, the
        guidance value. No mask: the model has none."""
        h, w = latents.shape[-2:]
        if h % 2 or w % 2:
            raise LavaError(
                f"FLUX.2 packs 2x2 latent patches: latent size {h}x{w} must be even on both sides"
            )
        packed = rearrange(latents, "b c (h p) (w q) -> b (h w) (c p q)", p=2, q=2)
        dev = latents.device
        img_ids = torch.cartesian_prod(
            torch.arange(1), torch.arange(h // 2), torch.arange(w // 2), torch.arange(1)
        ).to(dev)
        txt_ids = torch.cartesian_prod(
            torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(embeds.shape[1])
        ).to(dev)
        out = dict(
            hidden_states=packed,
            encoder_hidden_states=embeds,
            timestep=timestep / 1000,
            img_ids=img_ids,
            txt_ids=txt_ids,
        )
        if guidance is not None:
            out["guidance"] = torch.full_like(timestep, float(guidance))
        return out

    def call_info(self, transformer, inputs: dict) -> tuple[tuple[int, int], float]:
        """The grid from the image position ids; refuses a call with reference-image tokens (their
        ids have a time coordinate > 0), whose image sequence is not one grid."""
        ids = inputs["img_ids"]
        ids = ids[0] if ids.ndim == 3 else ids
        if bool((ids[:, 0] != 0).any()):
            raise LavaError(
                "this FLUX.2 call carries reference-image tokens (an edit with image=...): lava reads "
                "text-to-image calls only"
            )
        return super().call_info(transformer, {**inputs, "img_ids": ids})


def _insertion_point(empty: str, chat: str, text: str) -> int:
    """Where ``text`` was inserted into the template: ``chat == empty[:k] + text + empty[k:]``."""
    if len(chat) != len(empty) + len(text):
        raise LavaError("the chat template changed the prompt text; cannot locate the classes in it")
    k = 0
    while k < len(empty) and empty[k] == chat[k]:
        k += 1
    for cand in range(k, -1, -1):
        if chat[cand : cand + len(text)] == text and empty[:cand] + text + empty[cand:] == chat:
            return cand
    raise LavaError("the chat template changed the prompt text; cannot locate the classes in it")


FLUX2 = Flux2Family()

"""What differs between MM-DiT families, in one small adapter per family.

The capture processor, the early-exit hook and ``transformer_inputs`` ask the adapter of the
transformer they are given (``family_of``) and never branch on the family themselves:

* which blocks exist, numbered by one integer in execution order, and which attention of each
  block is the joint text+image one (SD3.5's image-only ``attn2`` is never captured);
* the joint sequence of one attention call: token order (SD3: image then text; Flux: text then
  image), where q/k/v come from, the qk norms and the rotary embedding (Flux rotates q and k
  after the norm, so probabilities are taken after RoPE, as the model attends);
* what the processor returns (SD3 and Flux double-stream blocks: the two projected streams;
  Flux single-stream blocks: the whole sequence, unprojected);
* the transformer's keyword arguments, and the latent layout (Flux packs 2×2 latent patches
  into one token).

Layouts of the tensors passed around: q/k/v ``[B, H, N, D]`` with ``N = N_img + T``; latents
``[B, C, h, w]`` as the VAE gives them (``NoisyLatents``), packed by the adapter when the model
wants tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from einops import rearrange

from ..errors import LavaError
from .tokens import token_spans


@dataclass(frozen=True)
class JointQKV:
    """q, k, v ``[B, H, N, D]`` of one joint-attention call and where the text tokens sit in it."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    text_start: int
    text_len: int
    mask: torch.Tensor | None = None  # the mask the model attends with (padded text), as SDPA takes it
    # Tokens at the start of the text range that are not text (Z-Image: the image's pad tokens,
    # between the image grid and the caption): text position p is joint position
    # text_start + text_offset + p.
    text_offset: int = 0


def _heads(attn, x: torch.Tensor) -> torch.Tensor:
    return rearrange(x, "b n (h d) -> b h n d", h=attn.heads)


def sd3_text_qkv(attn, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The text-side queries, keys and values of an SD3 joint attention: ``text`` ``[B, T, C]`` →
    three ``[B, H, T, D]`` through ``add_q/k/v_proj`` and the added qk norms (also what the
    concept view runs its concept tokens through)."""
    q, k, v = (_heads(attn, proj(text)) for proj in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
    if attn.norm_added_q is not None:
        q = attn.norm_added_q(q)
    if attn.norm_added_k is not None:
        k = attn.norm_added_k(k)
    return q, k, v


class Family:
    """What every family adapter shares; each family overrides what differs.

    The text-side hooks here serve encoders whose tokens sit in the text sequence as the
    tokenizer lays them out (T5 in SD3 and FLUX.1): an LLM encoder with a chat template overrides
    ``sequence_spans`` and ``sequence_window``.
    """

    name = "family"
    transformer_classes: tuple[str, ...] = ()  # diffusers class names this adapter reads
    encoder_name = "T5"  # the encoder whose tokens hold the classes (after any CLIP part), in messages
    clip_in_sequence = True  # the memory planner counts the tokenizer's window as a CLIP part (SD3)

    def attention(self, block):
        """The module of ``block`` whose processor the capture replaces (its joint attention)."""
        return block.attn

    def sequence_spans(self, backend, text: str, chars: dict) -> dict:
        """``{key: positions}``: each character range of ``chars`` (``{key: (start, end)}`` in
        ``text``) as the token positions it occupies in the encoder part of the text sequence
        (counted from that part's start; the CLIP part before it is not counted)."""
        return token_spans(backend.t5_tokenizer, text, chars)

    def sequence_window(self, backend) -> int:
        """Positions of the encoder part that can hold a class (T5: all but the end token)."""
        return backend.max_sequence_length - 1

    def text_len_hook(self, transformer, set_text_len):
        """For a family whose single-stream blocks are called without the text hidden states: install
        a hook that calls ``set_text_len(T)`` before each forward (``T`` text tokens at the start of
        the joint sequence) and return its handle. ``None`` (FLUX.1): the block's own
        ``encoder_hidden_states`` tells, and the capture reads it there (a family whose single-stream
        blocks get no text hidden states reads them where the model has them: Chroma where it embeds
        the text, FLUX.2 at its first double-stream block)."""
        return None

    # ---- hooks with a default every family so far shares -----------------------------------------
    def capture_processor(self, proc):
        """What ``capturing`` installs on a block's attention module for the capture processor
        ``proc`` (a family whose modules call their processor with other arguments wraps it)."""
        return proc

    def text_summary(self, backend) -> str | None:
        """The text encoders in words for ``Backend.describe``/``text_encoders`` (``None``: the
        CLIP/T5 wording of SD3 and FLUX.1)."""
        return None

    def encode_images(self, vae, pixels: torch.Tensor) -> torch.Tensor:
        """Clean latents ``[B, C, h, w]`` of ``pixels`` ``[B, 3, H, W]`` in [-1, 1] (already on the
        VAE's device and dtype): the posterior mean, ``(mean - shift) · scale`` (SD3, FLUX.1)."""
        dist = vae.encode(pixels).latent_dist
        shift = vae.config.get("shift_factor") or 0.0
        return (dist.mean - shift) * vae.config.scaling_factor

    # ---- a pipeline's own calls (lava.trace), defaults ------------------------------------------
    t5_prompt_arg = "prompt"  # the encode_prompt argument whose text the sequence encoder reads

    def prompt_rows(self, result):
        """The conditional prompt's text as the pipeline hands it to the transformer, from
        ``encode_prompt``'s return value ``result``: what ``conditional_rows`` looks for in each
        transformer call. Default: ``prompt_outputs``' embeddings ``[R, T, D]``, already one row
        per generated image (the pipelines repeat them ``num_images_per_prompt`` times in
        ``encode_prompt``)."""
        return self.prompt_outputs(result)[0]

    def conditional_rows(self, inputs: dict, cond) -> tuple[int, int] | None:
        """``(offset, count)``: the ``count`` consecutive batch entries of one transformer call,
        from ``offset``, that carry the conditional prompt (one per generated image, prompt-major),
        or ``None`` when the call does not carry it (a negative-prompt call). ``inputs``: the
        call's arguments by name; ``cond``: what ``prompt_rows`` returned.

        Default: the block of rows of ``encoder_hidden_states`` equal to ``cond``, the last such
        block (SD3 under CFG batches ``[negative; prompt]``), so it does not depend on the
        pipeline's layout."""
        context = inputs.get("encoder_hidden_states")
        rows = int(cond.shape[0])
        if context is None or context.shape[1:] != cond.shape[1:] or context.shape[0] % rows:
            return None
        cond = cond.to(context.device, context.dtype)  # the same tensor when they already agree
        for offset in reversed(range(0, context.shape[0], rows)):
            if torch.equal(context[offset : offset + rows], cond):
                return offset, rows
        return None


class SD3Family(Family):
    """SD3 / SD3.5 (``SD3Transformer2DModel``): joint blocks only, image tokens first, no RoPE."""

    name = "sd3"
    transformer_classes = ("SD3Transformer2DModel",)

    def blocks(self, transformer) -> list:
        """Every transformer block in execution order (index = lava's block number)."""
        return list(transformer.transformer_blocks)

    def block_kinds(self, transformer) -> list[str]:
        return ["joint"] * len(transformer.transformer_blocks)

    def has_joint_attention(self, block) -> bool:
        return bool(getattr(block.attn, "added_kv_proj_dim", None))

    # ---- layout and text ----------------------------------------------------------------------
    t5_module = "text_encoder_3"

    def patch_size(self, transformer) -> int:
        """Latent pixels per image token along one side."""
        return int(transformer.config.patch_size)

    def clip_len(self, pipe) -> int:
        """CLIP tokens at the start of the joint text sequence (both CLIP encoders share them)."""
        return int(pipe.tokenizer.model_max_length)

    def t5_tokenizer(self, pipe):
        return getattr(pipe, "tokenizer_3", None)

    def encode_text(self, pipe, texts: list[str], device, max_sequence_length: int):
        """``(embeds [P, T, D], pooled [P, Dp], mask)`` from the pipeline's own ``encode_prompt``;
        ``mask`` ``[P, T]`` bool marks the text positions the model attends to (``None``: all,
        as in SD3 and FLUX.1; a family without a pooled vector returns ``pooled`` as ``[P, 0]``)."""
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompt=texts,
            prompt_2=None,
            prompt_3=None,
            device=device,
            do_classifier_free_guidance=False,
            max_sequence_length=max_sequence_length,
        )
        return embeds, pooled, None

    def qkv(self, attn, hidden_states, encoder_hidden_states, rotary=None, text_len=None, **call) -> JointQKV:
        """Per-stream projections and qk norms, then ``[image; text]``, as ``JointAttnProcessor2_0``.

        ``hidden_states`` ``[B, N_img, C]``, ``encoder_hidden_states`` ``[B, T, C]``.
        """
        if encoder_hidden_states is None:
            raise LavaError("an SD3 joint attention call needs the text hidden states; got none")

        q, k, v = (_heads(attn, proj(hidden_states)) for proj in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        ctx = encoder_hidden_states
        cq, ck, cv = sd3_text_qkv(attn, ctx)
        return JointQKV(
            torch.cat([q, cq], dim=2),
            torch.cat([k, ck], dim=2),
            torch.cat([v, cv], dim=2),
            text_start=hidden_states.shape[1],
            text_len=ctx.shape[1],
        )

    def finish(self, attn, out: torch.Tensor, joint: JointQKV, single_stream: bool):
        """The processor's return value from the attention output ``out`` ``[B, N, H·D]``."""
        s, t = joint.text_start, joint.text_len
        hidden, context = out[:, :s], out[:, s : s + t]
        if not attn.context_pre_only:
            context = attn.to_add_out(context)
        hidden = attn.to_out[1](attn.to_out[0](hidden))
        return hidden, context

    def inputs(self, latents, embeds, pooled, timestep, *, guidance=None, text_mask=None) -> dict:
        """Keyword arguments of one transformer call. ``timestep`` ``[B]`` in lava's ``σ·1000`` units;
        ``text_mask`` ``[B, T]`` (``None`` here: SD3 attends to every text position)."""
        return dict(
            hidden_states=latents,
            encoder_hidden_states=embeds,
            pooled_projections=pooled,
            timestep=timestep,
        )

    def output_latents(self, sample: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """The model's output as ``[B, C, h, w]`` latents (SD3 already returns them so)."""
        return sample

    # ---- a pipeline's own calls (lava.trace) ----------------------------------------------------
    t5_prompt_arg = "prompt_3"  # the encode_prompt argument whose text T5 reads (default: ``prompt``)

    def prompt_outputs(self, result) -> tuple[torch.Tensor, torch.Tensor]:
        """``(embeds [P, T, D], pooled [P, Dp])`` of the conditional prompt from the pipeline's own
        ``encode_prompt`` return value (``embeds, negative, pooled, negative pooled``)."""
        return result[0], result[2]

    def call_info(self, transformer, inputs: dict) -> tuple[tuple[int, int], float]:
        """``(image-token grid, timestep in lava's σ·1000 units)`` of one transformer call, from its
        keyword arguments: latents ``[B, C, h, w]``, the timestep as the model takes it."""
        h, w = inputs["hidden_states"].shape[-2:]
        p = self.patch_size(transformer)
        return (h // p, w // p), float(inputs["timestep"].flatten()[0])


class FluxFamily(Family):
    """FLUX.1 (``FluxTransformer2DModel``): double-stream blocks, then single-stream blocks.

    Blocks are numbered in execution order: double-stream ``0 … D-1``, single-stream ``D … D+S-1``
    (FLUX.1: 0–18 and 19–56, the numbering of Seg4Diff's ``flux_backbone.py``). The joint
    sequence is ``[text; image]``; q and k get per-head RMS norms, then RoPE over the
    concatenated sequence (text ids are zeros: identity rotation for text tokens).
    """

    name = "flux"
    clip_in_sequence = False  # CLIP gives only the pooled vector
    transformer_classes = ("FluxTransformer2DModel",)

    def blocks(self, transformer) -> list:
        return [*transformer.transformer_blocks, *transformer.single_transformer_blocks]

    def block_kinds(self, transformer) -> list[str]:
        return ["double"] * len(transformer.transformer_blocks) + ["single"] * len(
            transformer.single_transformer_blocks
        )

    def has_joint_attention(self, block) -> bool:
        # Single-stream blocks attend over the concatenated [text; image] sequence: joint too.
        return True

    # ---- layout and text ----------------------------------------------------------------------
    t5_module = "text_encoder_2"

    def patch_size(self, transformer) -> int:
        # 2x2 latent patches are packed into one token (the transformer's own patch size is 1).
        return 2 * int(transformer.config.patch_size)

    def clip_len(self, pipe) -> int:
        """0: CLIP only gives the pooled vector; the joint text sequence is T5 alone."""
        return 0

    def t5_tokenizer(self, pipe):
        return getattr(pipe, "tokenizer_2", None)

    def encode_text(self, pipe, texts: list[str], device, max_sequence_length: int):
        embeds, pooled, _text_ids = pipe.encode_prompt(
            prompt=texts, prompt_2=None, device=device, max_sequence_length=max_sequence_length
        )
        return embeds, pooled, None

    def qkv(self, attn, hidden_states, encoder_hidden_states, rotary=None, text_len=None, **call) -> JointQKV:
        """q, k, v as ``FluxAttnProcessor`` builds them, after RoPE, as ``[B, H, N, D]`` views.

        Double-stream: ``hidden_states`` ``[B, N_img, C]`` and ``encoder_hidden_states`` ``[B, T, C]``.
        Single-stream: ``hidden_states`` is the whole ``[B, T + N_img, C]`` sequence and
        ``text_len`` says how many of its tokens are text. The same ops in the same layout
        (``[B, N, H, D]``) as diffusers, so q and k are bitwise the ones the model attends with.
        """
        from diffusers.models.embeddings import apply_rotary_emb

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.unflatten(-1, (-1, attn.head_dim))

        fused = getattr(attn, "fused_projections", False)  # after transformer.fuse_qkv_projections()
        if fused:
            q, k, v = (heads(x) for x in attn.to_qkv(hidden_states).chunk(3, dim=-1))
        else:
            q, k, v = (heads(proj(hidden_states)) for proj in (attn.to_q, attn.to_k, attn.to_v))
        q, k = attn.norm_q(q), attn.norm_k(k)
        if encoder_hidden_states is not None:
            ctx = encoder_hidden_states
            if fused:
                cq, ck, cv = (heads(x) for x in attn.to_added_qkv(ctx).chunk(3, dim=-1))
            else:
                cq, ck, cv = (heads(p(ctx)) for p in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
            cq, ck = attn.norm_added_q(cq), attn.norm_added_k(ck)
            q, k, v = torch.cat([cq, q], dim=1), torch.cat([ck, k], dim=1), torch.cat([cv, v], dim=1)
            text_len = ctx.shape[1]
        elif text_len is None:
            raise LavaError(
                "a Flux single-stream attention call needs the number of text tokens at the start of "
                "its sequence; capture through lava.stages.capture.capturing, which reads it from the block"
            )
        if rotary is not None:
            q = apply_rotary_emb(q, rotary, sequence_dim=1)
            k = apply_rotary_emb(k, rotary, sequence_dim=1)
        # [B, N, H, D] -> [B, H, N, D] views: the layout diffusers' SDPA call permutes to.
        return JointQKV(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0, int(text_len))

    def finish(self, attn, out: torch.Tensor, joint: JointQKV, single_stream: bool):
        if single_stream:
            return out  # single-stream attention has no output projection of its own
        t = joint.text_len
        context, hidden = out[:, :t], out[:, t:]
        hidden = attn.to_out[1](attn.to_out[0](hidden.contiguous()))
        return hidden, attn.to_add_out(context.contiguous())

    def inputs(self, latents, embeds, pooled, timestep, *, guidance=None, text_mask=None) -> dict:
        """Packed latents, position ids, and the timestep as the transformer wants it (``t / 1000``:
        the model multiplies it by 1000 again). ``guidance`` only for guidance-distilled models (dev)."""
        h, w = latents.shape[-2:]
        if h % 2 or w % 2:
            raise LavaError(f"Flux packs 2x2 latent patches: latent size {h}x{w} must be even on both sides")
        packed = rearrange(latents, "b c (h p) (w q) -> b (h w) (c p q)", p=2, q=2)
        # float32 ids (FluxPipeline casts them to the model dtype; bf16 rows and columns would stop
        # being exact past 256 tokens, i.e. 4096 px). RoPE is computed from them in float64.
        ids = torch.zeros(h // 2, w // 2, 3, device=latents.device)
        ids[..., 1] = torch.arange(h // 2, device=latents.device)[:, None]
        ids[..., 2] = torch.arange(w // 2, device=latents.device)[None, :]
        out = dict(
            hidden_states=packed,
            encoder_hidden_states=embeds,
            pooled_projections=pooled,
            timestep=timestep / 1000,
            img_ids=ids.reshape(-1, 3),
            txt_ids=torch.zeros(embeds.shape[1], 3, device=latents.device),
        )
        if guidance is not None:
            out["guidance"] = torch.full_like(timestep, float(guidance))
        return out

    def output_latents(self, sample: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Packed ``[B, N_img, 4·C]`` model output back to ``[B, C, 2·gh, 2·gw]`` latents."""
        return rearrange(sample, "b (h w) (c p q) -> b c (h p) (w q)", h=grid[0], w=grid[1], p=2, q=2)

    # ---- a pipeline's own calls (lava.trace) ----------------------------------------------------
    t5_prompt_arg = "prompt_2"

    def prompt_outputs(self, result) -> tuple[torch.Tensor, torch.Tensor]:
        """``(embeds, pooled)`` from ``FluxPipeline.encode_prompt``'s ``(embeds, pooled, text_ids)``."""
        return result[0], result[1]

    def call_info(self, transformer, inputs: dict) -> tuple[tuple[int, int], float]:
        """The grid from the image position ids (row, column in channels 1 and 2), and the timestep
        the pipeline passed as ``t / 1000`` back in lava's units."""
        ids = inputs["img_ids"]
        ids = ids[0] if ids.ndim == 3 else ids  # diffusers' deprecated batched ids
        grid = (int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1)
        return grid, float(inputs["timestep"].flatten()[0]) * 1000


SD3 = SD3Family()
FLUX = FluxFamily()

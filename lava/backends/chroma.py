"""The ``chroma`` family: Chroma1 (``ChromaPipeline``, ``ChromaTransformer2DModel``).

Chroma keeps FLUX.1's transformer layout — 19 double-stream blocks, then 38 single-stream ones,
RoPE over ``[text; image]``, 2×2 packed latents — so its adapter is ``FluxFamily`` with what
differs:

* **T5 only.** No CLIP and no pooled vector: the timestep goes through a distilled modulation
  network (the "approximator"), which is fed guidance 0 inside the model. The pipeline's T5 is
  its ``text_encoder``/``tokenizer`` and reads ``prompt``.
* **Padding masks.** ``ChromaPipeline._get_t5_prompt_embeds`` pads the prompt to
  ``max_sequence_length`` and keeps the real tokens, the end token and *one* padding token; the
  transformer gets the ``[text; image]`` mask and each block multiplies it into an ``N×N`` mask
  (``mask[:, None, None, :] * mask[:, None, :, None]``) passed to every attention call. The
  adapter hands that mask to the slice op as the processor receives it, so the capture attends
  exactly as the model does.
* **Single-stream blocks** are called with the concatenated sequence and without the text
  hidden states, so the number of text tokens is read where the transformer embeds the text
  (a pre-hook on ``context_embedder``).

The mask lava passes. diffusers 0.42.1's pipeline turns the mask into the text encoder's float
dtype (0.0/1.0) before it reaches the transformer, and SDPA takes a float mask as an additive
bias: +1 on the kept keys, +0 on the padding, which then still takes probability (diffusers
issues #11724, #12116 and #13619, the last one open against this code). The model was trained
with the padding masked out, as its card describes, and that is what lava's own forward passes
give it: ``inputs`` passes the mask as bool. ``lava.trace`` over a stock ``ChromaPipeline`` call
changes nothing in the call, so there the maps are those of the float mask the pipeline passes.

Block numbers run in execution order: double-stream ``0-18``, single-stream ``19-56``.
"""

from __future__ import annotations

import dataclasses

import torch

from . import flux  # FLUX.1's sizes, which Chroma shares
from .base import VariantDefaults
from .family import FluxFamily, JointQKV

HUB_IDS = {
    # The checkpoints diffusers' ChromaPipeline documentation lists (docs/api/pipelines/chroma.md).
    "chroma": "lodestones/Chroma1-HD",
    "chroma-base": "lodestones/Chroma1-Base",
}

# ChromaPipeline's default and its limit (check_inputs refuses more than 512 T5 tokens).
MAX_SEQUENCE_LENGTH = 512

_UNMEASURED = (
    "unmeasured: nothing public reads Chroma's attention for segmentation. Rule: Chroma keeps FLUX.1's "
    "19 double- + 38 single-stream layout (pruned from FLUX.1-schnell), so Seg4Diff's FLUX.1-dev blocks "
    "12 and 17 are carried over; t=500 (sigma 0.5) is the middle of the flow-matching schedule"
)

DEFAULTS = {
    "chroma": VariantDefaults(timestep=500.0, layers=(12, 17), resolution=1024, source=_UNMEASURED),
    "chroma-base": VariantDefaults(timestep=500.0, layers=(12, 17), resolution=1024, source=_UNMEASURED),
    "tiny-chroma": VariantDefaults(
        timestep=500.0,
        layers=(1, 2),
        resolution=32,
        source="toy model with random weights: any setting is as good as any other",
    ),
}


def detect_variant(transformer_config, hint: str = "") -> str:
    """``chroma-base`` when the name it was loaded under says Base, else ``chroma`` (HD): both have one
    config, so only the name tells them apart (and their defaults are the same)."""
    return "chroma-base" if "base" in hint.lower() else "chroma"


class ChromaFamily(FluxFamily):
    """Chroma1 (``ChromaTransformer2DModel``): FLUX.1's blocks, T5 only, padded text masked."""

    name = "chroma"
    transformer_classes = ("ChromaTransformer2DModel",)

    def text_summary(self, backend) -> str:
        return "T5 only (no CLIP, no pooled vector)"

    # ---- layout and text ----------------------------------------------------------------------
    t5_module = "text_encoder"
    t5_prompt_arg = "prompt"

    def t5_tokenizer(self, pipe):
        return getattr(pipe, "tokenizer", None)

    def encode_text(self, pipe, texts: list[str], device, max_sequence_length: int):
        """The pipeline's own ``encode_prompt`` (T5 run with the padding mask); ``pooled`` is
        ``[P, 0]`` and ``mask`` the pipeline's text mask (real tokens, the end token and one padding
        token) as bool."""
        embeds, _text_ids, mask, *_ = pipe.encode_prompt(
            prompt=texts,
            device=device,
            do_classifier_free_guidance=False,
            max_sequence_length=max_sequence_length,
        )
        return embeds, embeds.new_zeros(embeds.shape[0], 0), mask > 0

    def qkv(
        self,
        attn,
        hidden_states,
        encoder_hidden_states,
        rotary=None,
        text_len=None,
        attention_mask=None,
        **call,
    ) -> JointQKV:
        """FLUX.1's q, k, v (after RoPE), with the mask the processor was called with: the block's
        ``[B, 1, N, N]`` product of the ``[text; image]`` mask, as SDPA takes it."""
        joint = super().qkv(attn, hidden_states, encoder_hidden_states, rotary, text_len, **call)
        return dataclasses.replace(joint, mask=attention_mask)

    def text_len_hook(self, transformer, set_text_len):
        # Chroma's single-stream blocks see [text; image] already joined; the transformer embeds
        # the text ([B, T, 4096] -> [B, T, 3072]) once per forward, before any block runs.
        def hook(module, args):
            set_text_len(int(args[0].shape[1]))

        return transformer.context_embedder.register_forward_pre_hook(hook)

    def inputs(self, latents, embeds, pooled, timestep, *, guidance=None, text_mask=None) -> dict:
        """FLUX.1's packed latents, position ids and ``t / 1000``, without the pooled vector, and the
        ``[text; image]`` attention mask ``[B, T + N_img]`` (bool: masked text keys take no
        probability; image tokens are all kept), as ``ChromaPipeline._prepare_attention_mask``
        builds it but in the dtype SDPA reads as keep/drop (module docstring)."""
        out = super().inputs(latents, embeds, pooled, timestep, guidance=guidance)
        del out["pooled_projections"]
        if text_mask is not None:
            n_img = out["hidden_states"].shape[1]
            image = torch.ones(text_mask.shape[0], n_img, dtype=torch.bool, device=text_mask.device)
            out["attention_mask"] = torch.cat([text_mask.to(torch.bool), image], dim=1)
        return out

    # ---- a pipeline's own calls (lava.trace) ----------------------------------------------------
    def prompt_outputs(self, result) -> tuple[torch.Tensor, torch.Tensor]:
        """``(embeds, [P, 0])`` from ``ChromaPipeline.encode_prompt``'s ``(embeds, text_ids, mask,
        negative embeds, negative text_ids, negative mask)``."""
        embeds = result[0]
        return embeds, embeds.new_zeros(embeds.shape[0], 0)


CHROMA = ChromaFamily()


# ---- sizes for the memory planner -----------------------------------------------------------------


def full_size_modules():
    """Chroma1 at its real size with no storage (meta tensors): ``flux.meta_modules`` with
    ``ChromaTransformer2DModel`` at diffusers' default config, which is Chroma1's (19 + 38 blocks,
    24 heads × 128, approximator 64 → 5120 × 5), FLUX.1's VAE and T5-XXL's encoder as
    ``text_encoder`` (the one ChromaPipeline documents): the planner counts their parameters without
    any download."""
    from diffusers import ChromaTransformer2DModel

    return flux.meta_modules(ChromaTransformer2DModel, {}, clip=False)


def planning_geometry(spec):
    """A ``ModelSpec`` read from a Chroma folder's files with the family's own layout: FLUX.1's
    (2x2 packed latents, no CLIP part) with the T5 window of ``ChromaPipeline``."""
    return flux.planning_geometry(spec, MAX_SEQUENCE_LENGTH)

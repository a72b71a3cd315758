"""The concept view: class maps from the attention *output* space (ConceptAttention's idea).

Besides the model's own text stream, every class token gets a copy of itself — a *concept
token* — that runs through the text branch of each block up to the deepest captured one:
the block's ``norm1_context`` (with the timestep modulation), the text-side q/k/v projections
and qk norms, attention over the image keys and the other concept tokens of its prompt, the
text output projection, ``norm2_context`` and ``ff_context``. No image or text token ever attends
to a concept token, so the model's own streams and output are those of a plain forward.

In a captured block the map is the dot product of each image token's attention output with
each concept token's attention output (both per head, before the output projection):
``[B, H, N_img, K]``, summed over the head dimension and averaged over heads unless
``heads="none"``. ``lava.aggregate`` averages a class's tokens (every token of the name, not
just the first), blocks and timesteps, then softmaxes over the classes.

Concept tokens start as the class tokens of the prompt as the transformer receives them (after
``context_embedder``), so they use the same text encoders, prompt split and token spans as the
attention view. Cost per block: ``O(N_img · K · D)`` per head for the concept attention and the
dot products, besides the block's own attention; nothing of size ``N × N`` is built.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from einops import rearrange

from ..backends.families import family_of
from ..backends.family import SD3, sd3_text_qkv
from ..errors import LavaError
from ..types import CapturePlan
from .processors import (
    CaptureStore,
    block_inputs,
    keys_of_rows,
    pick_keys,
    restore,
    row_gather,
    stop_forward,
)


class ConceptStream:
    """The concept tokens between blocks, shared by one forward's hooks and processors.

    ``hidden``: ``[B·G, U, C]`` residual stream of the concept tokens (``U`` = the union of the
    plan's text positions over its prompt rows); ``visible``: ``[B·G, U]`` bool, which concept
    tokens belong to each batch entry's own prompt row (the others are padding: masked out as
    keys, their outputs never read).
    """

    def __init__(self, plan: CapturePlan, positions: tuple[int, ...], batch: int):
        self.positions = positions
        rows = plan.prompt_rows
        keys = set(keys_of_rows(plan))
        t = plan.text_len or 0
        own = torch.tensor([[row * t + p in keys for p in positions] for row in rows])
        self.visible = own.repeat(batch // len(rows), 1)
        self.hidden: torch.Tensor | None = None
        self.normed: torch.Tensor | None = None
        self.modulation: tuple[torch.Tensor, ...] = ()
        self.attn_out: torch.Tensor | None = None


def concept_dots(image_out: torch.Tensor, concept_out: torch.Tensor, heads: str) -> torch.Tensor:
    """``[B, H or 1, N_img, U]`` float32: image attention outputs ``[B, H, N_img, D]`` · concept
    attention outputs ``[B, H, U, D]`` over ``D``, per head or averaged over heads."""
    dots = torch.einsum("bhnd,bhud->bhnu", image_out.float(), concept_out.float())
    return dots.mean(1, keepdim=True) if heads == "mean" else dots


def concept_attention(
    cq: torch.Tensor,
    ck: torch.Tensor,
    cv: torch.Tensor,
    image_k: torch.Tensor,
    image_v: torch.Tensor,
    visible: torch.Tensor,
) -> torch.Tensor:
    """The concept tokens' attention outputs ``[B, H, U, D]``: queries ``cq`` ``[B, H, U, D]``
    over the image keys/values ``[B, H, N_img, D]`` and the concept keys/values ``ck``/``cv``;
    ``visible`` ``[B, U]`` bool masks out concept keys of other prompt rows. One fused SDPA
    whose scores are ``[U, N_img + U]`` per head: nothing of size ``N_img × N_img``."""
    keys = torch.cat([image_k, ck], dim=2)
    values = torch.cat([image_v, cv], dim=2)
    mask = torch.cat([visible.new_ones(visible.shape[0], image_k.shape[2]), visible], dim=1)
    return F.scaled_dot_product_attention(cq, keys, values, attn_mask=mask[:, None, None, :])


class ConceptProcessor:
    """The joint attention of one block, computed as diffusers' ``JointAttnProcessor2_0`` does,
    plus the concept tokens' attention (queries: concepts; keys/values: image tokens and the
    visible concepts). In a captured block it also stores the concept dot products."""

    def __init__(self, index: int, plan: CapturePlan, store: CaptureStore, stream: ConceptStream, gather):
        self.index = index
        self.plan = plan
        self.store = store
        self.stream = stream
        self.gather = gather

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        if encoder_hidden_states is None:
            raise LavaError("ConceptProcessor is for joint attention; it got no text hidden states")
        joint = SD3.qkv(attn, hidden_states, encoder_hidden_states)
        q, k, v, n_img = joint.q, joint.k, joint.v, joint.text_start
        if self.plan.keep_image_qk and self.index in self.plan.layers:
            # For lava.propagate, as CaptureProcessor keeps them: copies of the image rows only.
            self.store.image_qk[self.index] = (q[:, :, :n_img].clone(), k[:, :, :n_img].clone())
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)

        s = self.stream
        cq, ck, cv = sd3_text_qkv(attn, s.normed)
        s.attn_out = concept_attention(cq, ck, cv, k[:, :, :n_img], v[:, :, :n_img], s.visible)
        if self.index in self.plan.layers:
            dots = concept_dots(out[:, :, :n_img], s.attn_out, self.plan.heads)
            self.store[self.index] = pick_keys(dots, self.plan, self.gather)
        return SD3.finish(attn, rearrange(out, "b h n d -> b n (h d)").to(q.dtype), joint, False)


def _enter(block, index: int, stream: ConceptStream):
    """Pre-hook: start the stream at block 0, then apply this block's ``norm1_context``."""

    def hook(module, args, kwargs):
        given = block_inputs(args, kwargs)
        context, temb = given["encoder_hidden_states"], given["temb"]
        if index == 0:
            stream.hidden = context[:, list(stream.positions)]
            stream.visible = stream.visible.to(context.device)  # once, not per block
        if block.context_pre_only:
            stream.normed, stream.modulation = block.norm1_context(stream.hidden, temb), ()
        else:
            stream.normed, *mod = block.norm1_context(stream.hidden, emb=temb)
            stream.modulation = tuple(mod)

    return hook


def _leave(block, stream: ConceptStream):
    """Post-hook: the text branch's residual updates (gated attention output, then the gated
    feed-forward), as ``JointTransformerBlock`` applies them to its text tokens."""

    def hook(module, args, kwargs, output):
        gate_msa, shift_mlp, scale_mlp, gate_mlp = stream.modulation
        attn_out = rearrange(stream.attn_out, "b h u d -> b u (h d)").to(stream.hidden.dtype)
        c = stream.hidden + gate_msa.unsqueeze(1) * block.attn.to_add_out(attn_out)
        normed = block.norm2_context(c) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        stream.hidden = c + gate_mlp.unsqueeze(1) * block.ff_context(normed)
        stream.normed = stream.attn_out = None

    return hook


@contextmanager
def capturing_concepts(transformer, plan: CapturePlan, batch: int) -> Iterator[CaptureStore]:
    """Install concept processors on blocks ``0 .. max(plan.layers)`` for one forward of a batch of
    ``batch`` entries (images × prompt rows); yields the ``CaptureStore`` that fills with
    ``{block: dots}`` for the captured blocks. Restores every processor and removes every hook
    on exit, also on error."""
    family = family_of(transformer)
    if family is not SD3:
        raise LavaError(
            f"the concept source is implemented for the SD3 family only, not {family.name}: "
            "read this model with source='attention'"
        )
    blocks = family.blocks(transformer)
    last = max(plan.layers)
    positions, gather = row_gather(plan)
    stream = ConceptStream(plan, positions, batch)
    store = CaptureStore(plan)
    originals = {i: blocks[i].attn.processor for i in range(last + 1)}
    hooks = []
    try:
        for i in range(last + 1):
            block = blocks[i]
            block.attn.set_processor(ConceptProcessor(i, plan, store, stream, gather))
            hooks.append(block.register_forward_pre_hook(_enter(block, i, stream), with_kwargs=True))
            if i < last:
                hooks.append(block.register_forward_hook(_leave(block, stream), with_kwargs=True))
        if plan.early_exit:
            hooks.append(blocks[last].register_forward_hook(stop_forward))
        yield store
    finally:
        store.close()
        restore(blocks, originals, hooks)

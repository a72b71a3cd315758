"""The attention processors and block hooks a capture installs, and how they are taken out again.

``capturing`` puts a ``CaptureProcessor`` on the joint ``attn`` of each captured block for one
call (the originals come back on exit, also on error). It computes what the model's own
processor computes — projections, qk-norm, concatenation in the family's token order, RoPE
where the family has it, attention, output projections; all of it delegated to the family
adapter (``lava.backends.family``) — taking the attention output from the same kernel call
that yields the slice, so the model's outputs are unchanged and attention runs once.

The concept view (``lava.stages.concept``) installs its own processors with the same store,
key gathering, early exit and clean-up; ``lava.stages.capture`` picks one or the other.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from einops import rearrange

from ..backends.families import family_of
from ..backends.family import SD3
from ..errors import LavaError
from ..kernels import SliceSpec, attention_with_slice
from ..types import CapturePlan


class CaptureStore(dict):
    """``{block: slice}`` of the plan's primary view, filled as the transformer runs.

    ``views[(direction, softmax)]`` holds the same for every captured view (the primary one
    included). ``image_qk[block]``: that block's image ``(q, k)`` ``[B·G, H, N_img, D]``, filled
    only when the plan keeps them.
    """

    def __init__(self, plan: CapturePlan):
        super().__init__()
        self.views: dict[tuple[str, str], dict[int, torch.Tensor]] = {v: {} for v in plan.views}
        self.primary = plan.views[0]
        self.views[self.primary] = self
        self.image_qk: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def close(self) -> None:
        """End the capture: ``views`` keeps a plain copy of the primary view instead of the store
        itself, so no reference cycle keeps the slices alive until the garbage collector runs
        (``lava.trace`` would otherwise hold one step's maps per step until then)."""
        if self.views.get(self.primary) is self:
            self.views[self.primary] = dict(self)


class CaptureProcessor:
    """Joint attention of one block that also stores the plan's slices in ``store``.

    The block's family adapter builds q, k, v (token order, qk norms, RoPE) and the processor's
    return value; this class only runs the slice op between them, so it serves every family.
    It is installed on the joint ``attn`` of a block only (never SD3.5's image-only ``attn2``).
    In a single-stream block (Flux) the call carries no text hidden states: ``text_len`` is then
    set before each call from the block's input, or where the family's ``text_len_hook`` reads it
    (Chroma: the transformer's text embedding); ``capturing`` does that.
    """

    def __init__(self, index: int, plan: CapturePlan, store: CaptureStore, family=SD3, single_stream=False):
        self.index = index
        self.plan = plan
        self.store = store
        self.family = family
        self.single_stream = single_stream
        self.text_len: int | None = None
        self.positions, self.gather = row_gather(plan)

    def __call__(
        self,
        attn,
        hidden_states,
        encoder_hidden_states=None,
        attention_mask=None,
        image_rotary_emb=None,
        *args,
        freqs_cis=None,
        encoder_hidden_states_mask=None,
        **kwargs,
    ):
        # Named here because diffusers' Attention.forward drops keyword arguments the processor's
        # signature does not name (Qwen-Image passes its text padding mask so).
        if encoder_hidden_states_mask is not None:
            kwargs["encoder_hidden_states_mask"] = encoder_hidden_states_mask
        if encoder_hidden_states is None and not self.single_stream:
            raise LavaError("CaptureProcessor is for joint attention; it got no text hidden states")
        joint = self.family.qkv(
            attn,
            hidden_states,
            encoder_hidden_states,
            image_rotary_emb if image_rotary_emb is not None else freqs_cis,  # Z-Image names it freqs_cis
            self.text_len,
            attention_mask=attention_mask,
            **kwargs,
        )
        q, k, v = joint.q, joint.k, joint.v
        columns, held = call_columns(self.positions, joint)

        out = None
        for view in self.plan.views:
            spec = SliceSpec(
                text_start=joint.text_start,
                text_len=joint.text_len,
                columns=columns,
                direction=view[0],
                softmax=view[1],
                heads=self.plan.heads,
            )
            if self.plan.keep_image_qk and out is None:
                # Copies of the image rows only: a view would keep the whole joint q, k (and text) alive.
                self.store.image_qk[self.index] = (spec.image_rows(q).clone(), spec.image_rows(k).clone())
            # The first view also yields the attention output; the others reuse q, k only.
            o, sl = attention_with_slice(
                q, k, v if out is None else None, spec, impl=self.plan.impl, attn_mask=joint.mask
            )
            if held is not None:  # positions past this call's text sequence: probability 0
                full = sl.new_zeros(*sl.shape[:-1], len(self.positions))
                full[..., held] = sl[..., : len(held)]
                sl = full
            self.store.views[view][self.index] = pick_keys(sl, self.plan, self.gather)
            out = o if out is None else out

        out = rearrange(out, "b h n d -> b n (h d)").to(q.dtype)
        return self.family.finish(attn, out, joint, self.single_stream)


def call_columns(positions: tuple[int, ...] | None, joint) -> tuple[tuple[int, ...] | None, list[int] | None]:
    """``(columns, held)``: the kernel's text columns for the plan's text ``positions`` in one call,
    and which of the positions (indices into ``positions``) the call's text sequence holds
    (``None``: all of them).

    A family whose model drops the padding of each prompt (Z-Image) runs a text sequence shorter
    than lava's ``text_len``: a position past it is in no key of the call, so it gets probability 0.
    Columns are shifted by ``joint.text_offset`` (tokens at the start of the text range that are
    not text). For every other family this is ``(positions, None)``.
    """
    shift = joint.text_offset
    if positions is None:
        return (None if not shift else tuple(range(shift, joint.text_len))), None
    held = [i for i, p in enumerate(positions) if shift + p < joint.text_len]
    if len(held) == len(positions):
        return (positions if not shift else tuple(shift + p for p in positions)), None
    if not held:  # nothing to read: compute one column to run the attention, report zeros
        return (shift,), []
    return tuple(shift + positions[i] for i in held), held


def row_gather(plan: CapturePlan) -> tuple[tuple[int, ...] | None, tuple[torch.Tensor, torch.Tensor] | None]:
    """The text positions the kernel computes and how to pick the plan's keys from them.

    With one prompt row the keys are the positions and nothing is gathered. With several rows in
    the batch the kernel computes the union of positions for every row, and key
    ``row · text_len + position`` is then read from that row's batch entry.
    """
    if len(plan.prompt_rows) == 1 and plan.prompt_rows[0] == 0:
        return plan.columns, None
    if plan.text_len is None:
        raise LavaError("a capture over several prompt rows needs the plan's text_len")
    t = plan.text_len
    where = {row: g for g, row in enumerate(plan.prompt_rows)}
    keys = keys_of_rows(plan)
    outside = [k for k in keys if k // t not in where]
    if outside:
        raise LavaError(
            f"text keys {outside[:5]} belong to prompt rows not in this forward {plan.prompt_rows}"
        )
    positions = tuple(sorted({k % t for k in keys}))
    index = {p: i for i, p in enumerate(positions)}
    rows = torch.tensor([where[k // t] for k in keys])
    cols = torch.tensor([index[k % t] for k in keys])
    return positions, (rows, cols)


def keys_of_rows(plan: CapturePlan) -> tuple[int, ...]:
    """The plan's text keys: its ``columns``, or every position of every prompt row."""
    if plan.columns is not None:
        return plan.columns
    t = plan.text_len
    if t is None:
        raise LavaError("a plan without columns needs its text_len to list its keys")
    return tuple(row * t + p for row in plan.prompt_rows for p in range(t))


def pick_keys(sl: torch.Tensor, plan: CapturePlan, gather) -> torch.Tensor:
    """``[B·G, H', N_img, U]`` over the union of positions → ``[B, H', N_img, K]`` over the
    plan's keys, each read from its own prompt row's batch entry (unchanged when ``gather`` is
    ``None``: one prompt row)."""
    if gather is None:
        return sl
    row_idx, pos_idx = gather
    per_row = sl.unflatten(0, (-1, len(plan.prompt_rows)))  # [B, G, H', N, U]
    return per_row.permute(0, 2, 3, 1, 4)[..., row_idx.to(sl.device), pos_idx.to(sl.device)]


class StopForward(Exception):
    """Raised after the deepest captured block to skip the rest of the transformer."""


@contextmanager
def capturing(transformer, plan: CapturePlan) -> Iterator[CaptureStore]:
    """Install capture processors on ``plan.layers`` for the duration of the block.

    Blocks are numbered by the transformer's family adapter (``family_of``) in execution order
    (Flux: double-stream blocks, then single-stream ones). Yields a ``CaptureStore``: the dict
    that fills with ``{block: slice}`` as the transformer runs (its ``views`` attribute has every
    ``(direction, softmax)`` view). With ``plan.early_exit`` the forward is cut after the deepest
    captured block; call the transformer through ``run_until_captured`` to absorb that.
    """
    if plan.source != "attention":
        raise LavaError(
            f"capturing reads attention probabilities; a {plan.source!r} plan needs its own capture "
            "(lava.stages.concept.capturing_concepts), which capture_views picks from the plan"
        )
    family = family_of(transformer)
    blocks = family.blocks(transformer)
    kinds = family.block_kinds(transformer)
    bad = [i for i in plan.layers if not 0 <= i < len(blocks)]
    if bad:
        raise LavaError(f"blocks {bad} do not exist: this transformer has blocks 0..{len(blocks) - 1}")
    store = CaptureStore(plan)
    attns = {i: family.attention(blocks[i]) for i in plan.layers}
    originals = {i: attns[i].processor for i in plan.layers}
    hooks = []
    try:
        for i in plan.layers:
            # "unified" (Z-Image): one sequence whose layout the adapter reads from the call itself.
            proc = CaptureProcessor(i, plan, store, family, single_stream=kinds[i] in ("single", "unified"))
            attns[i].set_processor(family.capture_processor(proc))
            if kinds[i] == "single":
                hook = family.text_len_hook(transformer, functools.partial(setattr, proc, "text_len"))
                if hook is None:
                    hook = blocks[i].register_forward_pre_hook(_text_len_from_block(proc), with_kwargs=True)
                hooks.append(hook)
        if plan.early_exit:
            hooks.append(blocks[max(plan.layers)].register_forward_hook(stop_forward))
        yield store
    finally:
        store.close()
        restore(blocks, originals, hooks, family)


def stop_forward(module, args, output):
    """Forward hook on the deepest captured block: cuts the transformer short there."""
    raise StopForward


def restore(blocks, originals: dict, hooks: list, family=SD3) -> None:
    """Remove a capture's hooks and put back each block's original attention processor."""
    for hook in hooks:
        hook.remove()
    for i, proc in originals.items():
        family.attention(blocks[i]).set_processor(proc)


def _text_len_from_block(proc: CaptureProcessor):
    """Pre-hook of a single-stream block: its attention sees one concatenated sequence, so the
    number of text tokens at its start is read from the block's own ``encoder_hidden_states``."""

    def hook(module, args, kwargs):
        context = block_inputs(args, kwargs).get("encoder_hidden_states")
        if context is None:
            raise LavaError(
                f"block {proc.index} was called without encoder_hidden_states: cannot tell its text length"
            )
        proc.text_len = int(context.shape[1])

    return hook


def block_inputs(args: tuple, kwargs: dict) -> dict:
    """A transformer block's call arguments by name, given by keyword or by position (SD3's and
    Flux's blocks both take ``hidden_states, encoder_hidden_states, temb`` first)."""
    names = ("hidden_states", "encoder_hidden_states", "temb")
    return dict(zip(names, args, strict=False)) | kwargs


def run_until_captured(transformer, **inputs) -> torch.Tensor | None:
    """Call the transformer; returns its sample, or ``None`` when a capture cut it short."""
    try:
        return transformer(**inputs, return_dict=False)[0]
    except StopForward:
        return None

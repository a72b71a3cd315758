"""Stage 3: one transformer pass that records text↔image attention slices at chosen blocks.

The capture is a diffusers attention processor installed on the chosen blocks' joint ``attn``
for one call (``capturing`` restores the originals on exit, also on error). It computes what
the model's own processor computes — projections, qk-norm, concatenation in the family's token
order, RoPE where the family has it, attention, output projections; all of it delegated to the
family adapter (``lava.backends.family``) — taking the attention output from the same kernel
call that yields the slice, so the model's outputs are unchanged and attention runs once.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from einops import rearrange

from ..backends.base import Backend
from ..backends.family import SD3, family_of
from ..errors import LavaError
from ..kernels import SliceSpec, attention_with_slice, resolve_impl
from ..options import DEFAULT_VIEW, SOURCES
from ..types import AttentionSlices, CapturePlan, NoisyLatents, PromptEncoding


class CaptureStore(dict):
    """``{block: slice}`` of the plan's primary view, filled as the transformer runs.

    ``views[(direction, softmax)]`` holds the same for every captured view (the primary one
    included). ``image_qk[block]``: that block's image ``(q, k)`` ``[B·G, H, N_img, D]``, filled
    only when the plan keeps them.
    """

    def __init__(self, plan: CapturePlan):
        super().__init__()
        self.views: dict[tuple[str, str], dict[int, torch.Tensor]] = {v: {} for v in plan.views}
        self.views[plan.views[0]] = self
        self.image_qk: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}


class CaptureProcessor:
    """Joint attention of one block that also stores the plan's slices in ``store``.

    The block's family adapter builds q, k, v (token order, qk norms, RoPE) and the processor's
    return value; this class only runs the slice op between them, so it serves every family.
    It is installed on the joint ``attn`` of a block only (never SD3.5's image-only ``attn2``).
    In a single-stream block (Flux) the call carries no text hidden states: ``text_len`` is then
    set before each call from the block's input (``capturing`` does that).
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
        **kwargs,
    ):
        if encoder_hidden_states is None and not self.single_stream:
            raise LavaError("CaptureProcessor is for joint attention; it got no text hidden states")
        joint = self.family.qkv(attn, hidden_states, encoder_hidden_states, image_rotary_emb, self.text_len)
        q, k, v = joint.q, joint.k, joint.v

        out = None
        for view in self.plan.views:
            spec = SliceSpec(
                text_start=joint.text_start,
                text_len=joint.text_len,
                columns=self.positions,
                direction=view[0],
                softmax=view[1],
                heads=self.plan.heads,
            )
            if self.plan.keep_image_qk and out is None:
                # Copies of the image rows only: a view would keep the whole joint q, k (and text) alive.
                self.store.image_qk[self.index] = (spec.image_rows(q).clone(), spec.image_rows(k).clone())
            # The first view also yields the attention output; the others reuse q, k only.
            o, sl = attention_with_slice(q, k, v if out is None else None, spec, impl=self.plan.impl)
            self.store.views[view][self.index] = pick_keys(sl, self.plan, self.gather)
            out = o if out is None else out

        out = rearrange(out, "b h n d -> b n (h d)").to(q.dtype)
        return self.family.finish(attn, out, joint, self.single_stream)


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


def check_source(source: str, views: Sequence[tuple[str, str]] = (DEFAULT_VIEW,)) -> None:
    """Refuse an unknown source, and the concept source with any view but the default one: the
    concept view has no direction or softmax domain of its own."""
    if source not in SOURCES:
        raise LavaError(f"source must be one of {SOURCES}, got {source!r}")
    asked = [tuple(v) for v in views]
    if source == "concept" and asked != [DEFAULT_VIEW]:
        raise LavaError(
            "the concept source has no direction or softmax domain to choose: read it with "
            f"{'/'.join(DEFAULT_VIEW)} (got {', '.join('/'.join(v) for v in asked)}) or use the attention "
            "source"
        )


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
    originals = {i: blocks[i].attn.processor for i in plan.layers}
    hooks = []
    try:
        for i in plan.layers:
            proc = CaptureProcessor(i, plan, store, family, single_stream=kinds[i] == "single")
            blocks[i].attn.set_processor(proc)
            if proc.single_stream:
                hook = blocks[i].register_forward_pre_hook(_text_len_from_block(proc), with_kwargs=True)
                hooks.append(hook)
        if plan.early_exit:
            hooks.append(blocks[max(plan.layers)].register_forward_hook(stop_forward))
        yield store
    finally:
        restore(blocks, originals, hooks)


def stop_forward(module, args, output):
    """Forward hook on the deepest captured block: cuts the transformer short there."""
    raise StopForward


def restore(blocks, originals: dict, hooks: list) -> None:
    """Remove a capture's hooks and put back each block's original attention processor."""
    for hook in hooks:
        hook.remove()
    for i, proc in originals.items():
        blocks[i].attn.set_processor(proc)


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


def transformer_inputs(
    backend: Backend, noisy: NoisyLatents, prompt: PromptEncoding, rows: Sequence[int] = (0,)
) -> dict:
    """Keyword arguments of one transformer call (any family): every image of ``noisy`` with every
    prompt row in ``rows``, as a batch of ``B · len(rows)`` (image-major: entry ``b · G + g``)."""
    index = torch.tensor(list(rows), device=prompt.embeds.device)
    return batch_inputs(
        backend, noisy, prompt.embeds.index_select(0, index), prompt.pooled.index_select(0, index)
    )


def batch_inputs(backend: Backend, noisy: NoisyLatents, embeds: torch.Tensor, pooled: torch.Tensor) -> dict:
    """Transformer keyword arguments pairing every image with every text embedding ``[G, T, D]``
    (pooled ``[G, Dp]``): a batch of ``B · G``, image-major. The family adapter lays the latents
    out (Flux packs them and adds position ids) and scales the timestep as its model wants."""
    b, g = noisy.batch_size, embeds.shape[0]
    dtype, dev = backend.dtype, backend.device
    return backend.family.inputs(
        noisy.latents.to(dev, dtype).repeat_interleave(g, dim=0),
        embeds.to(dev, dtype).repeat(b, 1, 1),
        pooled.to(dev, dtype).repeat(b, 1),
        torch.full((b * g,), noisy.timestep, device=dev, dtype=dtype),
        guidance=backend.guidance,
    )


def prompt_groups(prompt: PromptEncoding, prompt_batch: int | None) -> list[tuple[int, ...]]:
    """Prompt rows split into the groups that share one forward (all rows when ``None``)."""
    n = prompt.num_prompts
    size = n if prompt_batch is None else int(prompt_batch)
    if size < 1:
        raise LavaError(f"prompt_batch must be a positive number of prompts per forward, got {prompt_batch}")
    return [tuple(range(s, min(n, s + size))) for s in range(0, n, size)]


@torch.no_grad()
def capture_views(
    backend: Backend,
    noisy: NoisyLatents,
    prompt: PromptEncoding,
    *,
    views: Sequence[tuple[str, str]],
    layers: Sequence[int] | None = None,
    heads: str = "mean",
    columns: Sequence[int] | None = None,
    impl: str = "auto",
    early_exit: bool = True,
    prompt_batch: int | None = None,
    source: str = "attention",
    keep_image_qk: bool = False,
) -> dict[tuple[str, str], AttentionSlices]:
    """Several ``(direction, softmax)`` views from one forward pass: ``{view: AttentionSlices}``.

    With several prompt rows, every image runs with every row as one batch (the same noised
    latents, one prompt per batch entry); ``prompt_batch`` caps the rows per forward to bound
    memory (then there is one forward per group of rows). ``columns`` are text keys (see
    ``PromptEncoding.positions``); by default those the model's own presence rule reads
    (``PromptEncoding.keys_for``: every class token, plus the filler tokens for ``"null"``).
    ``keep_image_qk`` also returns each block's image queries and keys on every view
    (``AttentionSlices.image_qk``, for ``lava.propagate``).

    ``source="concept"`` reads the concept view (``lava.stages.concept``) instead of the attention
    probabilities; it has no direction or softmax domain, so ``views`` must then be the one
    default view ``("image_to_text", "joint")``, under which key its slices are returned.
    """
    if not views:
        raise LavaError("views must name at least one (direction, softmax) pair")
    check_source(source, views)
    layer_tuple = backend.check_layers(layers if layers is not None else backend.defaults.layers)
    if prompt.text_len != backend.text_len:
        raise LavaError(
            f"prompt has {prompt.text_len} text tokens but {backend.name} expects {backend.text_len}; "
            "encode it with the same backend"
        )
    t, n_rows = prompt.text_len, prompt.num_prompts
    if columns is None:  # what the model's own presence rule reads (lava.segment keeps the same)
        columns = prompt.keys_for(backend.defaults.presence, source)
    cols = tuple(dict.fromkeys(int(c) for c in columns))
    bad = [c for c in cols if not 0 <= c < n_rows * t]
    if bad:
        raise LavaError(
            f"text keys {bad[:5]} are out of range: {n_rows} prompt(s) of {t} text tokens hold keys "
            f"0..{n_rows * t - 1}"
        )
    try:
        for direction, softmax in views:
            SliceSpec(
                text_start=0,
                text_len=t,
                columns=tuple(sorted({c % t for c in cols})),
                direction=direction,
                softmax=softmax,
                heads=heads,
            )
        impl = resolve_impl(impl, backend.device)
    except ValueError as err:
        raise LavaError(str(err)) from err
    (direction, softmax), *extra = [tuple(v) for v in views]
    per_group: list[dict[tuple[str, str], dict[int, torch.Tensor]]] = []
    qk_groups: list[dict[int, tuple[torch.Tensor, torch.Tensor]]] = []
    order: list[int] = []
    for rows in prompt_groups(prompt, prompt_batch):
        keys = tuple(c for c in cols if c // t in rows)
        if not keys:
            continue
        plan = CapturePlan(
            layers=layer_tuple,
            columns=keys,
            direction=direction,
            softmax=softmax,
            heads=heads,
            impl=impl,
            early_exit=early_exit,
            extra_views=tuple(extra),
            prompt_rows=rows,
            text_len=t,
            source=source,
            keep_image_qk=keep_image_qk,
        )
        if plan.source == "concept":
            from .concept import capturing_concepts

            context = capturing_concepts(backend.transformer, plan, noisy.batch_size * len(rows))
        else:
            context = capturing(backend.transformer, plan)
        with context as store:
            run_until_captured(backend.transformer, **transformer_inputs(backend, noisy, prompt, rows))
        per_group.append(store.views)
        qk_groups.append(store.image_qk)
        order += keys
    # Back to the order of ``cols``; each group's maps hold its own keys, in that order.
    rank = {c: i for i, c in enumerate(cols)}
    perm = sorted(range(len(order)), key=lambda i: rank[order[i]])
    image_qk = _join_image_qk(qk_groups, noisy.batch_size) if keep_image_qk else None
    out = {}
    for view in per_group[0]:
        maps = {}
        for block in layer_tuple:
            joined = torch.cat([g[view][block] for g in per_group], dim=-1)
            maps[block] = joined if perm == list(range(len(perm))) else joined[..., perm]
        out[view] = AttentionSlices(
            maps=maps,
            columns=cols,
            grid=noisy.grid,
            direction=view[0],
            softmax=view[1],
            heads=heads,
            timestep=noisy.timestep,
            sigma=noisy.sigma,
            image_sizes=noisy.image_sizes,
            source=source,
            image_qk=image_qk,
            defaults=backend.defaults,
        )
    return out


def _join_image_qk(
    groups: Sequence[dict[int, tuple[torch.Tensor, torch.Tensor]]], batch: int
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Each block's image ``(q, k)`` from every forward, ``[B·G, H, N, D]`` each (image-major), as
    ``[B, R, H, N, D]`` over all R prompt rows that ran, in row order."""

    def join(parts: list[torch.Tensor]) -> torch.Tensor:
        parts = [p.unflatten(0, (batch, -1)) for p in parts]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)  # one forward: no copy

    return {block: tuple(join([g[block][i] for g in groups]) for i in (0, 1)) for block in groups[0]}


def capture(
    backend: Backend,
    noisy: NoisyLatents,
    prompt: PromptEncoding,
    *,
    layers: Sequence[int] | None = None,
    direction: str = "image_to_text",
    softmax: str = "joint",
    heads: str = "mean",
    columns: Sequence[int] | None = None,
    impl: str = "auto",
    early_exit: bool = True,
    prompt_batch: int | None = None,
    source: str = "attention",
    keep_image_qk: bool = False,
) -> AttentionSlices:
    """One forward pass; the slices of ``layers`` (default: the backend's) as ``AttentionSlices``.

    ``columns`` default to the text keys the model's presence rule reads (the class keys; every
    key for ``"null"``), so only those ``K`` columns are computed. Each map is float32
    ``[B, H or 1, N_img, K]``. A prompt of several rows runs as one batch of ``B × rows`` (at most
    ``prompt_batch`` rows per forward). ``keep_image_qk`` also keeps each block's image queries
    and keys (``AttentionSlices.image_qk``).

    ``source="concept"`` returns the concept view (``lava.stages.concept``) of the same blocks instead;
    ``direction`` and ``softmax`` must then keep their defaults.
    """
    views = capture_views(
        backend,
        noisy,
        prompt,
        views=[(direction, softmax)],
        layers=layers,
        heads=heads,
        columns=columns,
        impl=impl,
        early_exit=early_exit,
        prompt_batch=prompt_batch,
        source=source,
        keep_image_qk=keep_image_qk,
    )
    return views[(direction, softmax)]

"""Stage 3: one transformer pass that records text↔image attention slices at chosen blocks.

The capture is a diffusers attention processor installed on the chosen blocks' joint ``attn``
for one call (``capturing`` restores the originals on exit, also on error). It computes what
``JointAttnProcessor2_0`` computes — projections, qk-norm, ``[image, text]`` concatenation,
attention, output projections — taking the attention output from the same kernel call that
yields the slice, so the model's outputs are unchanged and attention runs once.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from einops import rearrange

from .backends.base import Backend
from .errors import LavaError
from .kernels import SliceSpec, attention_with_slice, resolve_impl
from .types import SOURCES, AttentionSlices, CapturePlan, NoisyLatents, PromptEncoding


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


def joint_qkv(attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor):
    """Queries, keys and values of an SD3 joint-attention block, as diffusers' processor builds
    them: per-stream projections and qk norms, then image tokens first, text tokens after.

    ``hidden_states`` ``[B, N_img, C]``, ``encoder_hidden_states`` ``[B, T, C]`` → three
    ``[B, H, N_img + T, D]`` tensors.
    """

    def heads(x: torch.Tensor) -> torch.Tensor:
        return rearrange(x, "b n (h d) -> b h n d", h=attn.heads)

    q, k, v = (heads(proj(hidden_states)) for proj in (attn.to_q, attn.to_k, attn.to_v))
    if attn.norm_q is not None:
        q = attn.norm_q(q)
    if attn.norm_k is not None:
        k = attn.norm_k(k)
    cq, ck, cv = (
        heads(proj(encoder_hidden_states)) for proj in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)
    )
    if attn.norm_added_q is not None:
        cq = attn.norm_added_q(cq)
    if attn.norm_added_k is not None:
        ck = attn.norm_added_k(ck)
    return torch.cat([q, cq], dim=2), torch.cat([k, ck], dim=2), torch.cat([v, cv], dim=2)


class CaptureProcessor:
    """Joint attention for SD3 blocks that also stores the plan's slices in ``store``.

    Image-only calls (``encoder_hidden_states=None``, e.g. SD3.5's ``attn2``) are never captured;
    this processor is only installed on the joint ``attn`` of a block.
    """

    def __init__(self, index: int, plan: CapturePlan, store: CaptureStore):
        self.index = index
        self.plan = plan
        self.store = store
        self.positions, self.gather = row_gather(plan)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        if encoder_hidden_states is None:
            raise LavaError("CaptureProcessor is for joint attention; it got no text hidden states")
        _b, n_img = hidden_states.shape[:2]

        q, k, v = joint_qkv(attn, hidden_states, encoder_hidden_states)
        if self.plan.keep_image_qk:
            # Copies of the image rows only: a view would keep the whole joint q, k (and text) alive.
            self.store.image_qk[self.index] = (q[:, :, :n_img].clone(), k[:, :, :n_img].clone())

        out = None
        for view in self.plan.views:
            spec = SliceSpec(
                text_start=n_img,
                text_len=encoder_hidden_states.shape[1],
                columns=self.positions,
                direction=view[0],
                softmax=view[1],
                heads=self.plan.heads,
            )
            # The first view also yields the attention output; the others reuse q, k only.
            o, sl = attention_with_slice(q, k, v if out is None else None, spec, impl=self.plan.impl)
            self.store.views[view][self.index] = pick_keys(sl, self.plan, self.gather)
            out = o if out is None else out

        out = rearrange(out, "b h n d -> b n (h d)").to(q.dtype)
        hidden, context = out[:, :n_img], out[:, n_img:]
        if not attn.context_pre_only:
            context = attn.to_add_out(context)
        hidden = attn.to_out[1](attn.to_out[0](hidden))
        return hidden, context


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

    Yields a ``CaptureStore``: the dict that fills with ``{block: slice}`` as the transformer
    runs (its ``views`` attribute has every ``(direction, softmax)`` view). With
    ``plan.early_exit`` the forward is cut after the deepest captured block; call the
    transformer through ``run_until_captured`` to absorb that.
    """
    blocks = transformer.transformer_blocks
    store = CaptureStore(plan)
    originals = {i: blocks[i].attn.processor for i in plan.layers}
    hook = None
    try:
        for i in plan.layers:
            blocks[i].attn.set_processor(CaptureProcessor(i, plan, store))
        if plan.early_exit:

            def stop(module, args, output):
                raise StopForward

            hook = blocks[max(plan.layers)].register_forward_hook(stop)
        yield store
    finally:
        if hook is not None:
            hook.remove()
        for i, proc in originals.items():
            blocks[i].attn.set_processor(proc)


def run_until_captured(transformer, **inputs) -> torch.Tensor | None:
    """Call the transformer; returns its sample, or ``None`` when a capture cut it short."""
    try:
        return transformer(**inputs, return_dict=False)[0]
    except StopForward:
        return None


def transformer_inputs(
    backend: Backend, noisy: NoisyLatents, prompt: PromptEncoding, rows: Sequence[int] = (0,)
) -> dict:
    """Keyword arguments of one SD3 transformer call: every image of ``noisy`` with every prompt
    row in ``rows``, as a batch of ``B · len(rows)`` (image-major: entry ``b · G + g``)."""
    index = torch.tensor(list(rows), device=prompt.embeds.device)
    return batch_inputs(
        backend, noisy, prompt.embeds.index_select(0, index), prompt.pooled.index_select(0, index)
    )


def batch_inputs(backend: Backend, noisy: NoisyLatents, embeds: torch.Tensor, pooled: torch.Tensor) -> dict:
    """Transformer keyword arguments pairing every image with every text embedding ``[G, T, D]``
    (pooled ``[G, Dp]``): a batch of ``B · G``, image-major."""
    b, g = noisy.batch_size, embeds.shape[0]
    dtype, dev = backend.dtype, backend.device
    return dict(
        hidden_states=noisy.latents.to(dev, dtype).repeat_interleave(g, dim=0),
        encoder_hidden_states=embeds.to(dev, dtype).repeat(b, 1, 1),
        pooled_projections=pooled.to(dev, dtype).repeat(b, 1),
        timestep=torch.full((b * g,), noisy.timestep, device=dev, dtype=dtype),
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
    ``PromptEncoding.positions``); by default every class token. ``keep_image_qk`` also returns
    each block's image queries and keys on every view (``AttentionSlices.image_qk``, for
    ``lava.propagate``).

    ``source="concept"`` reads the concept view (``lava.concept``) instead of the attention
    probabilities; it has no direction or softmax domain, so ``views`` must then be the one
    default view ``("image_to_text", "joint")``, under which key its slices are returned.
    """
    if not views:
        raise LavaError("views must name at least one (direction, softmax) pair")
    if source not in SOURCES:
        raise LavaError(f"source must be one of {SOURCES}, got {source!r}")
    if source == "concept" and [tuple(v) for v in views] != [("image_to_text", "joint")]:
        raise LavaError(
            "the concept source has no direction or softmax domain to choose: read it with the default "
            f"view image_to_text/joint, got {[tuple(v) for v in views]}"
        )
    layer_tuple = backend.check_layers(layers if layers is not None else backend.defaults.layers)
    if prompt.text_len != backend.text_len:
        raise LavaError(
            f"prompt has {prompt.text_len} text tokens but {backend.name} expects {backend.text_len}; "
            "encode it with the same backend"
        )
    t, n_rows = prompt.text_len, prompt.num_prompts
    cols = tuple(dict.fromkeys(int(c) for c in columns)) if columns is not None else prompt.columns()
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
        if source == "concept":
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

    ``columns`` default to the text keys of the prompt's classes, so only those ``K`` columns
    are computed. Each map is float32 ``[B, H or 1, N_img, K]``. A prompt of several rows runs
    as one batch of ``B × rows`` (at most ``prompt_batch`` rows per forward). ``keep_image_qk``
    also keeps each block's image queries and keys (``AttentionSlices.image_qk``).

    ``source="concept"`` returns the concept view (``lava.concept``) of the same blocks instead;
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

"""Stage 3: one transformer pass that records text↔image attention slices at chosen blocks.

``capture_views`` checks the request, splits the prompt rows into forwards, installs the capture
for each (the attention processors of ``lava.stages.processors``, or the concept tokens of
``lava.stages.concept`` for ``source="concept"``), runs the transformer up to the deepest
captured block and joins the slices back in the order of the text keys asked for.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..backends.base import Backend
from ..errors import LavaError
from ..kernels import SliceSpec, resolve_impl
from ..options import DEFAULT_VIEW, IMAGE_TO_TEXT, JOINT, SOURCES
from ..types import AttentionSlices, CapturePlan, NoisyLatents, PromptEncoding
from .concept import capturing_concepts
from .processors import CaptureProcessor, CaptureStore, StopForward, capturing, run_until_captured

__all__ = [
    "CaptureProcessor",
    "CaptureStore",
    "StopForward",
    "batch_inputs",
    "capture",
    "capture_views",
    "capturing",
    "check_source",
    "prompt_groups",
    "run_until_captured",
    "transformer_inputs",
]


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


def transformer_inputs(
    backend: Backend, noisy: NoisyLatents, prompt: PromptEncoding, rows: Sequence[int] = (0,)
) -> dict:
    """Keyword arguments of one transformer call (any family): every image of ``noisy`` with every
    prompt row in ``rows``, as a batch of ``B · len(rows)`` (image-major: entry ``b · G + g``)."""
    index = torch.tensor(list(rows), device=prompt.embeds.device)
    mask = prompt.text_mask
    return batch_inputs(
        backend,
        noisy,
        prompt.embeds.index_select(0, index),
        prompt.pooled.index_select(0, index),
        None if mask is None else mask.index_select(0, index.to(mask.device)),
    )


def batch_inputs(
    backend: Backend,
    noisy: NoisyLatents,
    embeds: torch.Tensor,
    pooled: torch.Tensor,
    text_mask: torch.Tensor | None = None,
) -> dict:
    """Transformer keyword arguments pairing every image with every text embedding ``[G, T, D]``
    (pooled ``[G, Dp]``, text mask ``[G, T]`` or ``None``): a batch of ``B · G``, image-major. The
    family adapter lays the latents out (Flux packs them and adds position ids), scales the
    timestep and turns the text mask into the model's own mask argument."""
    b, g = noisy.batch_size, embeds.shape[0]
    dtype, dev = backend.dtype, backend.device
    extra = {} if text_mask is None else {"text_mask": text_mask.to(dev).repeat(b, 1)}
    return backend.family.inputs(
        noisy.latents.to(dev, dtype).repeat_interleave(g, dim=0),
        embeds.to(dev, dtype).repeat(b, 1, 1),
        pooled.to(dev, dtype).repeat(b, 1),
        torch.full((b * g,), noisy.timestep, device=dev, dtype=dtype),
        guidance=backend.guidance,
        **extra,
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
    layer_tuple, cols, impl = _check_request(backend, prompt, views, layers, columns, heads, impl, source)
    (direction, softmax), *extra = [tuple(v) for v in views]
    t = prompt.text_len
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
            context = capturing_concepts(backend.transformer, plan, noisy.batch_size * len(rows))
        else:
            context = capturing(backend.transformer, plan)
        with context as store:
            run_until_captured(backend.transformer, **transformer_inputs(backend, noisy, prompt, rows))
        per_group.append(store.views)
        qk_groups.append(store.image_qk)
        order += keys
    image_qk = _join_image_qk(qk_groups, noisy.batch_size) if keep_image_qk else None
    return {
        view: AttentionSlices(
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
        for view, maps in _join_groups(per_group, order, cols, layer_tuple).items()
    }


def _check_request(
    backend: Backend,
    prompt: PromptEncoding,
    views: Sequence[tuple[str, str]],
    layers: Sequence[int] | None,
    columns: Sequence[int] | None,
    heads: str,
    impl: str,
    source: str,
) -> tuple[tuple[int, ...], tuple[int, ...], str]:
    """``(blocks, text keys, implementation)`` of a ``capture_views`` call, each checked before any
    forward runs: the views and source, the blocks, the prompt's text length, the keys' range
    (default: those the model's presence rule reads) and the slice op's options."""
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
    return layer_tuple, cols, impl


def _join_groups(
    per_group: Sequence[dict[tuple[str, str], dict[int, torch.Tensor]]],
    order: Sequence[int],
    cols: Sequence[int],
    layers: Sequence[int],
) -> dict[tuple[str, str], dict[int, torch.Tensor]]:
    """Each view's maps ``{block: [B, H', N_img, K]}`` over every forward's keys, joined and put
    back in the order of ``cols`` (each forward's maps hold its own keys, ``order`` all of them)."""
    rank = {c: i for i, c in enumerate(cols)}
    perm = sorted(range(len(order)), key=lambda i: rank[order[i]])
    out = {}
    for view in per_group[0]:
        maps = {}
        for block in layers:
            joined = torch.cat([g[view][block] for g in per_group], dim=-1)
            maps[block] = joined if perm == list(range(len(perm))) else joined[..., perm]
        out[view] = maps
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
    direction: str = IMAGE_TO_TEXT,
    softmax: str = JOINT,
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

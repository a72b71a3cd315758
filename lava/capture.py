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
from .types import AttentionSlices, CapturePlan, NoisyLatents, PromptEncoding


class CaptureStore(dict):
    """``{block: slice}`` of the plan's primary view, filled as the transformer runs.

    ``views[(direction, softmax)]`` holds the same for every captured view (the primary one
    included).
    """

    def __init__(self, plan: CapturePlan):
        super().__init__()
        self.views: dict[tuple[str, str], dict[int, torch.Tensor]] = {v: {} for v in plan.views}
        self.views[plan.views[0]] = self


class CaptureProcessor:
    """Joint attention for SD3 blocks that also stores the plan's slices in ``store``.

    Image-only calls (``encoder_hidden_states=None``, e.g. SD3.5's ``attn2``) are never captured;
    this processor is only installed on the joint ``attn`` of a block.
    """

    def __init__(self, index: int, plan: CapturePlan, store: CaptureStore):
        self.index = index
        self.plan = plan
        self.store = store

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        if encoder_hidden_states is None:
            raise LavaError("CaptureProcessor is for joint attention; it got no text hidden states")
        _b, n_img = hidden_states.shape[:2]

        def heads(x: torch.Tensor) -> torch.Tensor:
            return rearrange(x, "b n (h d) -> b h n d", h=attn.heads)

        q, k, v = (
            heads(attn.to_q(hidden_states)),
            heads(attn.to_k(hidden_states)),
            heads(attn.to_v(hidden_states)),
        )
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        cq = heads(attn.add_q_proj(encoder_hidden_states))
        ck = heads(attn.add_k_proj(encoder_hidden_states))
        cv = heads(attn.add_v_proj(encoder_hidden_states))
        if attn.norm_added_q is not None:
            cq = attn.norm_added_q(cq)
        if attn.norm_added_k is not None:
            ck = attn.norm_added_k(ck)
        # diffusers' SD3 joint attention: image tokens first, then text tokens.
        q, k, v = torch.cat([q, cq], dim=2), torch.cat([k, ck], dim=2), torch.cat([v, cv], dim=2)

        out = None
        for view in self.plan.views:
            spec = SliceSpec(
                text_start=n_img,
                text_len=encoder_hidden_states.shape[1],
                columns=self.plan.columns,
                direction=view[0],
                softmax=view[1],
                heads=self.plan.heads,
            )
            # The first view also yields the attention output; the others reuse q, k only.
            o, self.store.views[view][self.index] = attention_with_slice(
                q, k, v if out is None else None, spec, impl=self.plan.impl
            )
            out = o if out is None else out

        out = rearrange(out, "b h n d -> b n (h d)").to(q.dtype)
        hidden, context = out[:, :n_img], out[:, n_img:]
        if not attn.context_pre_only:
            context = attn.to_add_out(context)
        hidden = attn.to_out[1](attn.to_out[0](hidden))
        return hidden, context


class _StopForward(Exception):
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
                raise _StopForward

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
    except _StopForward:
        return None


def transformer_inputs(backend: Backend, noisy: NoisyLatents, prompt: PromptEncoding) -> dict:
    """Keyword arguments of one SD3 transformer call for ``noisy`` images and ``prompt``."""
    b = noisy.batch_size
    dtype = backend.dtype
    return dict(
        hidden_states=noisy.latents.to(backend.device, dtype),
        encoder_hidden_states=prompt.embeds.to(backend.device, dtype).expand(b, -1, -1),
        pooled_projections=prompt.pooled.to(backend.device, dtype).expand(b, -1),
        timestep=torch.full((b,), noisy.timestep, device=backend.device, dtype=dtype),
    )


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
) -> dict[tuple[str, str], AttentionSlices]:
    """Several ``(direction, softmax)`` views from ONE forward pass: ``{view: AttentionSlices}``."""
    if not views:
        raise LavaError("views must name at least one (direction, softmax) pair")
    layer_tuple = backend.check_layers(layers if layers is not None else backend.defaults.layers)
    cols = tuple(int(c) for c in columns) if columns is not None else prompt.columns()
    if prompt.text_len != backend.text_len:
        raise LavaError(
            f"prompt has {prompt.text_len} text tokens but {backend.name} expects {backend.text_len}; "
            "encode it with the same backend"
        )
    try:
        for direction, softmax in views:
            SliceSpec(
                text_start=0,
                text_len=prompt.text_len,
                columns=cols,
                direction=direction,
                softmax=softmax,
                heads=heads,
            )
        impl = resolve_impl(impl, backend.device)
    except ValueError as err:
        raise LavaError(str(err)) from err
    (direction, softmax), *extra = [tuple(v) for v in views]
    plan = CapturePlan(
        layers=layer_tuple,
        columns=cols,
        direction=direction,
        softmax=softmax,
        heads=heads,
        impl=impl,
        early_exit=early_exit,
        extra_views=tuple(extra),
    )
    with capturing(backend.transformer, plan) as store:
        run_until_captured(backend.transformer, **transformer_inputs(backend, noisy, prompt))
    return {
        view: AttentionSlices(
            maps=dict(sorted(maps.items())),
            columns=cols,
            grid=noisy.grid,
            direction=view[0],
            softmax=view[1],
            heads=heads,
            timestep=noisy.timestep,
            sigma=noisy.sigma,
            image_sizes=noisy.image_sizes,
        )
        for view, maps in store.views.items()
    }


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
) -> AttentionSlices:
    """One forward pass; the slices of ``layers`` (default: the backend's) as ``AttentionSlices``.

    ``columns`` default to the text positions of the prompt's classes, so only those ``K``
    columns are computed. Each map is float32 ``[B, H or 1, N_img, K]``.
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
    )
    return views[(direction, softmax)]

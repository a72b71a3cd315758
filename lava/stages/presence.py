"""Which named classes are in the image, from the model's own evidence (an optional stage).

``null_presence`` calibrates each class against the prompt's own non-class tokens (begin, end,
padding, template words, T5's part): a class is present when, at some image token, its tokens
draw more attention than the mean non-class token of its prompt row. It needs a capture that kept
those keys (``columns=text_keys(prompt)``) and costs no extra forward.

``denoising_presence`` asks the diffusion model itself, as diffusion classifiers do: the model
predicts the flow-matching velocity ``v = ε − x₀`` of the noised image once with each prompt row
as it is and once with each class's name removed from its row. A class the image contains
helps the prediction, so removing its name raises the error; an absent name does not.
The result plugs into ``to_mask`` as ``Heatmaps.presence`` (``with_presence``).

Cost: one full transformer pass per prompt row and one per class, per noised latent given
(no early exit: the model's output is what is compared). For a 12-class vocabulary in one
prompt that is 13 passes per noise draw.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from ..backends.base import Backend
from ..errors import LavaError
from ..types import AttentionSlices, Heatmaps, NoisyLatents, PromptEncoding
from .aggregate import beats_filler, class_scores
from .capture import batch_inputs
from .prompts import build_prompt


def text_keys(prompt: PromptEncoding) -> tuple[int, ...]:
    """Every text key of every prompt row: the ``columns`` a capture needs for ``null_presence``
    (``PromptEncoding.text_keys``)."""
    return prompt.text_keys()


def null_presence(
    slices: AttentionSlices,
    prompt: PromptEncoding,
    *,
    layers: Sequence[int] | None = None,
    tokens: str = "all",
) -> torch.Tensor:
    """``[B, C]``: 1 where class ``c`` beats its row's non-class tokens somewhere, else 0.

    With ``a_c`` the class's attention map (mean over its ``tokens``, heads and ``layers``, as
    ``aggregate`` computes it) and ``a_0`` the same mean over the text keys of its prompt row that
    name no class, ``presence = [max over image tokens of (a_c − a_0) > 0]``. An absent name's
    tokens draw no more than the prompt's filler does anywhere, however its map looks after
    min-max. Measured on lava-shapes in docs/open-vocabulary.md.
    """
    layers = tuple(layers) if layers is not None else slices.layers
    return beats_filler(class_scores(slices, prompt, layers, tokens), slices, prompt, layers)


def ablated_texts(prompt: PromptEncoding) -> list[str]:
    """For each class, the text of its prompt row without its name (``""`` when it was alone)."""
    texts = []
    for name in prompt.classes:
        rest = [c for c in prompt.classes_in_row(prompt.row(name)) if c != name]
        texts.append(build_prompt(rest, prompt.template, prompt.separator)[0] if rest else "")
    return texts


@torch.no_grad()
def velocity_errors(
    backend: Backend,
    noisy: NoisyLatents,
    embeds: torch.Tensor,
    pooled: torch.Tensor,
    batch: int,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``[B, P]``: mean squared error of the predicted velocity for each image × text embedding
    (``mask`` ``[P, T]``: the embeddings' text masks, for families that pad and mask)."""
    target = (noisy.noise - noisy.clean).float()
    errors = []
    for start in range(0, embeds.shape[0], batch):
        part = slice(start, start + batch)
        inputs = batch_inputs(
            backend, noisy, embeds[part], pooled[part], None if mask is None else mask[part]
        )
        pred = backend.transformer(**inputs, return_dict=False)[0]
        pred = backend.family.output_latents(pred, noisy.grid).float()  # Flux: unpack its tokens
        pred = pred.unflatten(0, (noisy.batch_size, -1))
        errors.append((pred - target[:, None].to(pred.device)).pow(2).flatten(2).mean(-1).cpu())
    return torch.cat(errors, dim=1)


def denoising_presence(
    backend: Backend,
    noisy: NoisyLatents | Sequence[NoisyLatents],
    prompt: PromptEncoding,
    *,
    batch: int = 16,
) -> torch.Tensor:
    """``[B, C]`` presence of each class in each image, in [0, 1], from the denoising error.

    For class ``c`` in row ``r``: ``Δ_c = err(row r without c) − err(row r)``, averaged over the
    noised latents given (several σ or seeds steady the estimate), then divided by the largest
    ``Δ`` of the image, negatives clipped to 0. ``batch`` caps the prompts per forward pass.
    """
    runs = [noisy] if isinstance(noisy, NoisyLatents) else list(noisy)
    if not runs:
        raise LavaError("denoising_presence needs at least one NoisyLatents")
    if batch < 1:
        raise LavaError(f"batch must be a positive number of prompts per forward, got {batch}")
    ablated = ablated_texts(prompt)
    embeds, pooled, mask = backend.encode_text(ablated)
    all_embeds = torch.cat([prompt.embeds.to(embeds.device), embeds])
    all_pooled = torch.cat([prompt.pooled.to(pooled.device), pooled])
    all_mask = None if mask is None else torch.cat([prompt.text_mask.to(mask.device), mask])
    rows = torch.tensor([prompt.row(c) for c in prompt.classes])
    delta = 0.0
    for run in runs:
        err = velocity_errors(backend, run, all_embeds, all_pooled, batch, all_mask)  # [B, P + C]
        full, without = err[:, : prompt.num_prompts], err[:, prompt.num_prompts :]
        delta = delta + (without - full[:, rows])
    delta = (delta / len(runs)).clamp_min(0)
    return delta / delta.amax(-1, keepdim=True).clamp_min(1e-12)


def with_presence(heatmaps: Heatmaps, presence: torch.Tensor) -> Heatmaps:
    """The same heatmaps with ``presence`` ``[B, C]`` (e.g. from ``denoising_presence``)."""
    want = tuple(heatmaps.scores.shape[:2])
    if tuple(presence.shape) != want:
        raise LavaError(f"presence must be [B, C] = {list(want)}, got {list(presence.shape)}")
    return dataclasses.replace(heatmaps, presence=presence.to(heatmaps.scores.device).float())

"""Token grounding for training ``lava-shapes``: where a caption word's attention should come from.

A small MM-DiT trained for minutes on a CPU learns to use colour words but ignores shape words
entirely: swapping every shape word of a caption changes its flow-matching loss by < 0.1 %
(``docs/reference-model.md``), so its attention cannot tell a circle from a square however
lava reads it. SD3 grounds its nouns through sheer scale; this module buys that property for
the reference model with a TokenCompose-style token loss (Wang et al., CVPR 2024), added to
SD3's objective: for every word of the caption that names objects, the share of its
image→text attention (joint softmax, heads averaged) that comes from those objects' image
tokens should be 1. Only words that name present objects are supervised, as in captions;
absent names, background pixels and the split of a vocabulary over prompts stay lava's problem.

``GroundingProcessor`` is diffusers' ``JointAttnProcessor2_0`` written with an explicit softmax
(the sequences are ~300 tokens) that also keeps the probabilities, with gradients.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from einops import rearrange

from lava.backends.family import SD3
from lava.reference.scenes import Scene


class GroundingProcessor:
    """Joint attention of one SD3 block that stores ``[B, N_img, T]`` image→text probabilities
    (softmax over all joint keys, heads averaged) in ``store[index]``."""

    def __init__(self, index: int, store: dict[int, torch.Tensor]):
        self.index = index
        self.store = store

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        joint = SD3.qkv(attn, hidden_states, encoder_hidden_states)
        q, k, v, n_img = joint.q, joint.k, joint.v, joint.text_start
        probs = torch.softmax((q @ k.transpose(-1, -2)).float() * q.shape[-1] ** -0.5, dim=-1)
        self.store[self.index] = probs[:, :, :n_img, n_img:].mean(1)
        out = rearrange((probs.to(v.dtype) @ v), "b h n d -> b n (h d)")
        return SD3.finish(attn, out, joint, False)


def install(transformer, blocks: Sequence[int]) -> dict[int, torch.Tensor]:
    """Put ``GroundingProcessor`` on ``blocks``; returns the dict their probabilities go to."""
    store: dict[int, torch.Tensor] = {}
    for i in blocks:
        transformer.transformer_blocks[i].attn.set_processor(GroundingProcessor(i, store))
    return store


def object_masks(scene: Scene, size: int, patch: int) -> np.ndarray:
    """``[n_objects, (size/patch)²]``: the share of each image token each (visible part of an)
    object covers, row-major over the token grid."""
    objects = scene.object_map(size)
    g = size // patch
    masks = np.stack([(objects == i + 1) for i in range(len(scene.objects))]).astype(np.float32)
    return masks.reshape(len(masks), g, patch, g, patch).mean(axis=(2, 4)).reshape(len(masks), g * g)


def word_targets(
    scenes: Sequence[Scene], refs: Sequence[Sequence[tuple[int, ...]]], size: int, patch: int, text_len: int
) -> torch.Tensor:
    """``[B, N_img, text_len]``: for each caption word that names objects, the token mask of those
    objects at its text position (word ``j`` is token ``j + 1``: every scene word is one token,
    after the begin token); zero columns for every other position."""
    n_img = (size // patch) ** 2
    out = np.zeros((len(scenes), n_img, text_len), dtype=np.float32)
    for b, (scene, words) in enumerate(zip(scenes, refs)):
        masks = object_masks(scene, size, patch)
        for j, named in enumerate(words):
            if named:
                out[b, :, j + 1] = np.clip(masks[list(named)].sum(0), 0.0, 1.0)
    return torch.from_numpy(out)


def grounding_loss(store: dict[int, torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
    """Mean over supervised words and blocks of ``(1 − share of the word's attention inside its
    objects)²``; ``targets`` from ``word_targets``."""
    supervised = targets.sum(1) > 0  # [B, T]
    if not supervised.any():
        return torch.zeros(())
    losses = []
    for probs in store.values():
        probs = probs[..., : targets.shape[-1]].float()
        inside = (probs * targets).sum(1) / probs.sum(1).clamp_min(1e-8)  # [B, T]
        losses.append(((1 - inside) ** 2)[supervised].mean())
    return torch.stack(losses).mean()


def token_mass_check(words: Sequence[str], input_ids: Sequence[int]) -> None:
    """Raise unless the caption tokenized to one token per word between begin and end tokens."""
    if len(input_ids) != len(words) + 2:
        raise ValueError(f"caption {' '.join(words)!r} is not one token per word ({len(input_ids)} tokens)")

"""Propagation of class maps by a block's own image→image attention, without an ``N×N`` matrix.

DiffSegmenter and iSeg refine cross-attention maps by multiplying them with the self-attention
of the image tokens: a token takes the scores of the tokens it attends to, so scores spread
within an object and stop at its edges. Written out, that product needs the ``N×N`` attention
of every head (4096² at 1024 px, 16384² at 2048 px). But ``softmax(q kᵀ) · M`` is exactly an
attention call whose values are the maps ``M``: one fused SDPA over the image keys computes it
in tiles, so memory stays ``O(N·(D + K))`` per head.

``propagate`` is the op; ``propagate_reference`` builds the explicit matrix (for tests).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..errors import LavaError

QK = tuple[torch.Tensor, torch.Tensor]


def _pairs(q: torch.Tensor | Sequence[torch.Tensor], k: torch.Tensor | Sequence[torch.Tensor]) -> list[QK]:
    """``q``/``k`` as a list of ``(q, k)`` sources, each ``[B, H, N, D]``, checked against each other."""
    qs = [q] if isinstance(q, torch.Tensor) else list(q)
    ks = [k] if isinstance(k, torch.Tensor) else list(k)
    if not qs or len(qs) != len(ks):
        raise LavaError(
            f"propagate needs as many query as key tensors (at least one), got {len(qs)} and {len(ks)}"
        )
    for qi, ki in zip(qs, ks):
        if qi.dim() != 4 or qi.shape != ki.shape:
            raise LavaError(
                f"propagate needs q and k of the same shape [B, H, N_img, D], got {tuple(qi.shape)} and "
                f"{tuple(ki.shape)}"
            )
    return list(zip(qs, ks))


def _check(pairs: list[QK], maps: torch.Tensor, iterations: int, temperature: float) -> None:
    b, _, n, _ = pairs[0][0].shape
    if maps.dim() != 3 or tuple(maps.shape[:2]) != (b, n):
        raise LavaError(f"maps must be [B, N_img, K] = [{b}, {n}, K] to match q/k, got {tuple(maps.shape)}")
    for q, _ in pairs:
        if q.shape[0] != b or q.shape[2] != n:
            raise LavaError(f"every q/k must be [{b}, H, {n}, D] like the first, got {tuple(q.shape)}")
    if iterations < 0:
        raise LavaError(f"propagate needs iterations >= 0, got {iterations}")
    if not temperature > 0:
        raise LavaError(f"propagate needs a temperature > 0, got {temperature}")


def _attend(q: torch.Tensor, k: torch.Tensor, maps: torch.Tensor, scale: float) -> torch.Tensor:
    """``mean_h softmax(q_h k_hᵀ · scale) · maps``: ``[B, N, K]`` from q, k ``[B, H, N, D]``.

    The maps are the values of one SDPA call. The fused CPU kernel (and CUDA's flash kernel)
    want the values' head size equal to the queries', so the ``K`` columns go in zero-padded
    groups of ``D`` (one call per group; a padded column is zero and dropped). The values are
    the same for every head: expanded (a stride-0 view), not copied per head.
    """
    b, h, n, d = q.shape
    kk = maps.shape[-1]
    q32, k32 = q.float(), k.float()  # maps are probabilities: bf16 values would keep 3 digits
    out = torch.empty(b, n, kk, dtype=torch.float32, device=maps.device)
    for s in range(0, kk, d):
        cols = maps[..., s : s + d].float()
        values = F.pad(cols, (0, d - cols.shape[-1]))[:, None].expand(b, h, n, d)
        res = F.scaled_dot_product_attention(q32, k32, values, scale=scale)  # [B, H, N, D]
        out[..., s : s + cols.shape[-1]] = res[..., : cols.shape[-1]].mean(dim=1)
        del res
    return out


def propagate(
    q: torch.Tensor | Sequence[torch.Tensor],
    k: torch.Tensor | Sequence[torch.Tensor],
    maps: torch.Tensor,
    *,
    iterations: int = 1,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Propagate class maps ``[B, N_img, K]`` by the image→image attention of ``q``, ``k``.

    One step is ``P(M) = mean_s mean_h softmax(q_sh k_shᵀ / (√D · temperature)) · M`` where the
    softmax runs over the *image keys only* (the text keys of the joint attention are left out:
    the maps live on image tokens, and each row of ``P`` must sum to 1 over them). ``q``, ``k``
    are ``[B, H, N_img, D]`` image queries and keys (after qk-norm), or sequences of them, one per
    source (several blocks, several prompt rows), averaged like heads. ``iterations`` applies the
    step that many times (0 returns the maps as float32). ``temperature`` < 1 sharpens the
    attention, > 1 flattens it.

    Every step is a convex combination of the maps' rows, so each class's values stay within
    their [min, max], and maps that sum to 1 over classes still do. Memory: one SDPA call at a
    time (fused: no ``N×N`` tensor), the float32 copies of one source's q/k, and a values
    tensor of ``[B, N, D]`` per group of ``D`` columns. Returns float32 ``[B, N_img, K]``.
    """
    pairs = _pairs(q, k)
    _check(pairs, maps, iterations, temperature)
    scale = pairs[0][0].shape[-1] ** -0.5 / temperature
    out = maps.float()
    for _ in range(iterations):
        step = torch.zeros_like(out)
        for qs, ks in pairs:
            step += _attend(qs.to(out.device), ks.to(out.device), out, scale)
        out = step / len(pairs)
    return out


def propagate_reference(
    q: torch.Tensor | Sequence[torch.Tensor],
    k: torch.Tensor | Sequence[torch.Tensor],
    maps: torch.Tensor,
    *,
    iterations: int = 1,
    temperature: float = 1.0,
) -> torch.Tensor:
    """``propagate`` with the explicit ``[B, H, N, N]`` attention matrices, in float64 (tests only).

    Builds ``P = mean_s mean_h softmax(q kᵀ / (√D · temperature))`` over the image keys as one
    ``[B, N, N]`` row-stochastic matrix and returns ``P^iterations · M``.
    """
    pairs = _pairs(q, k)
    _check(pairs, maps, iterations, temperature)
    d = pairs[0][0].shape[-1]
    mats = [
        torch.softmax(qs.double() @ ks.double().transpose(-1, -2) / (d**0.5 * temperature), dim=-1).mean(1)
        for qs, ks in pairs
    ]
    p = torch.stack(mats).mean(0)  # [B, N, N]
    out = maps.double()
    for _ in range(iterations):
        out = p @ out
    return out

"""Optional stage between ``aggregate`` and ``to_mask``: refine class maps with the image.

The attention maps live on the token grid (16× coarser than the pixels at patch size 2 and VAE
factor 8), so their borders are blurry and spill over object edges. PAMR (pixel-adaptive mask
refinement, Araslanov & Roth, CVPR 2020, "Single-Stage Semantic Segmentation from Image Labels")
repeatedly replaces each pixel's scores by an average of its neighbours' scores, weighted by how
alike their colours are: scores flow within a colour region and hardly across its edge.

``pamr`` is the kernel on tensors; ``refine`` is the stage on ``Heatmaps``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .errors import LavaError
from .types import Heatmaps

REFINE_METHODS = ("pamr",)

# The working grid: a few pixels per token is enough for colour edges to cut a token in parts,
# and the cost grows with the pixels (48 neighbours × iterations): 4× the token grid, longer side
# at most 256 px (a 1024 px image has a 64 × 64 grid, so 256 px keeps its 4×).
WORK_SCALE = 4
WORK_MAX_SIDE = 256

ImageLike = Image.Image | np.ndarray | torch.Tensor


def _offsets(dilations: Sequence[int]) -> list[tuple[int, int]]:
    """The 8 ring offsets ``(dy, dx)`` of a 3×3 neighbourhood at each dilation, dilation-major."""
    ring = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]
    return [(d * dy, d * dx) for d in dilations for dy, dx in ring]


def _neighbours(x: torch.Tensor, offsets: list[tuple[int, int]], pad: int) -> torch.Tensor:
    """``[B, C, K, H, W]``: ``x`` ``[B, C, H, W]`` read at each offset, borders replicated."""
    h, w = x.shape[-2:]
    padded = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    return torch.stack(
        [padded[..., pad + dy : pad + dy + h, pad + dx : pad + dx + w] for dy, dx in offsets], 2
    )


def pamr_affinity(
    image: torch.Tensor, dilations: Sequence[int] = (1, 2, 4, 8, 12, 24), lam: float = 0.1
) -> torch.Tensor:
    """PAMR's neighbour weights ``[B, K, H, W]`` (K = 8 · len(dilations)) for ``image`` ``[B, 3, H, W]``.

    For pixel ``i``, neighbour ``j`` and colour channel ``c``: ``-|I_ic - I_jc| / (lam · σ_ic)``,
    where ``σ_ic`` is the standard deviation of channel ``c`` over ``i``'s K neighbours (the spread
    of the differences: a textured neighbourhood tolerates larger steps than a flat one). The
    logits are averaged over the channels, then softmaxed over the K neighbours, so each pixel's
    weights are positive and sum to 1. A flat neighbourhood (σ = 0, all differences 0) gives
    uniform weights.
    """
    if image.dim() != 4:
        raise LavaError(f"image must be [B, 3, H, W], got shape {tuple(image.shape)}")
    image = image if image.is_floating_point() else image.float()
    offsets = _offsets(dilations)
    near = _neighbours(image, offsets, max(dilations))  # [B, 3, K, H, W]
    std = near.std(dim=2, unbiased=False, keepdim=True)
    logits = -(image[:, :, None] - near).abs() / (lam * std + 1e-8)
    return logits.mean(dim=1).softmax(dim=1)


def pamr(
    scores: torch.Tensor,
    image: torch.Tensor,
    *,
    iterations: int = 10,
    dilations: Sequence[int] = (1, 2, 4, 8, 12, 24),
    lam: float = 0.1,
) -> torch.Tensor:
    """Pixel-adaptive mask refinement of ``scores`` ``[B, C, H, W]`` with ``image`` ``[B, 3, H, W]``.

    ``iterations`` times, every pixel's scores become ``Σ_j a_ij · scores_j`` over its K ring
    neighbours (``pamr_affinity``; the pixel itself is not among them, as in PAMR). The weights
    depend on the image only, so they are computed once. Each step is a convex combination:
    scores stay within their original [min, max] per class, and maps that sum to 1 over classes
    still do. Memory: the affinity ``[B, K, H, W]`` (built from a transient ``[B, 3, K, H, W]``
    copy of the image's neighbours) plus two score-sized buffers: the neighbours' scores are read
    one offset at a time, never all K copies of the scores at once.
    """
    if scores.dim() != 4 or image.dim() != 4:
        raise LavaError(f"scores and image must be 4-D, got {tuple(scores.shape)} and {tuple(image.shape)}")
    if scores.shape[0] != image.shape[0] or scores.shape[-2:] != image.shape[-2:]:
        raise LavaError(
            f"scores {tuple(scores.shape)} and image {tuple(image.shape)} need the same batch and size"
        )
    if iterations < 0 or not dilations or min(dilations) < 1:
        raise LavaError(f"need iterations >= 0 and positive dilations, got {iterations}, {tuple(dilations)}")
    offsets = _offsets(dilations)
    pad = max(dilations)
    weights = pamr_affinity(image, dilations, lam).to(scores.dtype)  # [B, K, H, W]
    h, w = scores.shape[-2:]
    out = scores
    for _ in range(iterations):
        padded = F.pad(out, (pad, pad, pad, pad), mode="replicate")
        acc = torch.zeros_like(out)
        for k, (dy, dx) in enumerate(offsets):
            acc += weights[:, k : k + 1] * padded[..., pad + dy : pad + dy + h, pad + dx : pad + dx + w]
        out = acc
    return out


def working_size(grid: tuple[int, int], size: int | tuple[int, int] | None = None) -> tuple[int, int]:
    """The ``(H, W)`` grid ``refine`` works on: ``size`` if given (an int is the longer side, the
    token grid's aspect kept), else ``WORK_SCALE`` × the token grid, longer side capped at
    ``WORK_MAX_SIDE``."""
    h, w = grid
    if isinstance(size, (tuple, list)):
        return int(size[0]), int(size[1])
    side = size if size is not None else min(WORK_SCALE * max(h, w), WORK_MAX_SIDE)
    scale = side / max(h, w)
    return max(1, round(h * scale)), max(1, round(w * scale))


def _image_tensor(images: Sequence[ImageLike], size: tuple[int, int]) -> torch.Tensor:
    """``[B, 3, H, W]`` float in [0, 1]: each image resized (bilinear) to ``size``."""
    out = []
    for im in images:
        if isinstance(im, torch.Tensor):
            # A float tensor is taken to be in [0, 1] already; an integer one in 0 … 255.
            t = im.float() if im.is_floating_point() else im.float() / 255.0
            t = F.interpolate(t[None], size=size, mode="bilinear", align_corners=False)[0]
        else:
            pil = im if isinstance(im, Image.Image) else Image.fromarray(np.asarray(im))
            pil = pil.convert("RGB").resize((size[1], size[0]), Image.BILINEAR)
            t = torch.from_numpy(np.asarray(pil, dtype=np.float32) / 255.0).permute(2, 0, 1)
        out.append(t)
    return torch.stack(out)


def check_refine(method: str | None) -> None:
    """Refuse an unknown refine method before any work starts (``None``: no refinement)."""
    if method is not None and method not in REFINE_METHODS:
        raise LavaError(f"unknown refine method {method!r}: expected one of {list(REFINE_METHODS)} or None")


def refine(
    heatmaps: Heatmaps,
    images: Sequence[ImageLike],
    method: str = "pamr",
    size: int | tuple[int, int] | None = None,
    **kw,
) -> Heatmaps:
    """Refine ``heatmaps`` with their ``images`` (one per batch row; PIL, uint8 ``[H, W, 3]``
    arrays, or ``[3, H, W]`` tensors: float in [0, 1] or uint8); returns new ``Heatmaps`` on the
    working grid.

    The scores ``[B, C, h, w]`` are upsampled bilinearly to the working grid (``working_size``:
    by default 4× the token grid, longer side ≤ 256 px), the images resized to the same grid, and
    ``pamr`` applied (``**kw``: ``iterations``, ``dilations``, ``lam``). The result's ``scores``
    are ``[B, C, H', W']``; ``to_mask`` upsamples any grid to the image sizes, so it takes them
    as is. No renormalisation is needed: bilinear upsampling and PAMR both form convex
    combinations of the scores, so min-max and global maps stay in [0, 1] (a peak may come out
    slightly below 1), maps that summed to 1 over classes still do, and raw maps keep their
    range. ``presence`` is kept (it comes from the maps before normalisation).
    """
    if method is None:
        raise LavaError(f"refine needs a method, one of {list(REFINE_METHODS)}")
    check_refine(method)
    b = heatmaps.scores.shape[0]
    if len(images) != b:
        raise LavaError(f"refine got {len(images)} images for {b} heatmaps")
    grid = tuple(heatmaps.scores.shape[-2:])
    work = working_size(grid, size)
    scores = F.interpolate(heatmaps.scores.float(), size=work, mode="bilinear", align_corners=False)
    image = _image_tensor(images, work).to(scores.device)
    return dataclasses.replace(heatmaps, scores=pamr(scores, image, **kw))

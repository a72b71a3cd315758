"""Optional stage between ``aggregate`` and ``to_mask``: refine class maps with the image.

The attention maps live on the token grid (16× coarser than the pixels at patch size 2 and VAE
factor 8), so their borders are blurry and spill over object edges. PAMR (pixel-adaptive mask
refinement, Araslanov & Roth, CVPR 2020, "Single-Stage Semantic Segmentation from Image Labels")
repeatedly replaces each pixel's scores by an average of its neighbours' scores, weighted by how
alike their colours are: scores flow within a colour region and hardly across its edge.

Propagation (DiffSegmenter, iSeg) instead spreads each class's scores along the image→image
attention of the captured block(s): ``lava.propagate``, an attention call whose values are the
maps. It works on the token grid and needs the blocks' image queries and keys, captured with
``keep_image_qk``; in a chain it comes before PAMR (which leaves the token grid).

``pamr`` is the kernel on tensors; ``refine`` is the stage on ``Heatmaps``, applying a chain of
steps (``"propagate,pamr"``, ``("propagate", "pamr")`` or ``Propagate``/``PAMR`` objects with
their parameters) in order.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import LavaError
from ..options import NO_REFINE, REFINE_METHODS, refine_order_error  # NO_REFINE: the model's off
from ..types import AttentionSlices, Heatmaps
from .aggregate import normalize_scores
from .propagate import propagate

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


@dataclass(frozen=True)
class Propagate:
    """Propagation by the captured blocks' image→image attention (``lava.propagate``), on the
    token grid: ``iterations`` steps, logits divided by ``temperature`` (< 1 sharpens)."""

    name: ClassVar[str] = "propagate"
    iterations: int = 1
    temperature: float = 1.0


@dataclass(frozen=True)
class PAMR:
    """PAMR with the image colours (``pamr``) on the working grid ``size`` (``working_size``)."""

    name: ClassVar[str] = "pamr"
    iterations: int = 10
    dilations: tuple[int, ...] = (1, 2, 4, 8, 12, 24)
    lam: float = 0.1
    size: int | tuple[int, int] | None = None


RefineStep = Propagate | PAMR
RefineSpec = str | RefineStep | Sequence[str | RefineStep] | None
_STEPS: dict[str, type] = {"propagate": Propagate, "pamr": PAMR}


def resolve_refine(method: RefineSpec, default: str | None) -> RefineSpec:
    """The refinement a call runs: ``None`` → the backend's default (``VariantDefaults.refine``),
    ``"none"`` → no refinement, anything else as given (the same rule as the mask settings:
    ``None`` means "the model's own")."""
    if method is None:
        return default
    if isinstance(method, str) and method.strip() == NO_REFINE:
        return None
    return method


def refine_steps(method: RefineSpec) -> tuple[RefineStep, ...]:
    """The chain ``method`` names, in order: ``None`` or ``"none"`` → ``()``; ``"pamr"``;
    ``"propagate,pamr"``; a sequence of names or steps; a step with its parameters
    (``Propagate(iterations=2)``).

    Refuses unknown names, and propagation after PAMR (PAMR leaves the token grid that
    propagation's attention is defined on).
    """
    if method is None or (isinstance(method, str) and method.strip() == NO_REFINE):
        return ()
    if isinstance(method, str):
        items: list = method.split(",")
    elif isinstance(method, (Propagate, PAMR)):
        items = [method]
    else:
        items = list(method)
    steps = []
    for item in items:
        if isinstance(item, (Propagate, PAMR)):
            steps.append(item)
            continue
        name = item.strip() if isinstance(item, str) else item
        if name not in _STEPS:
            raise LavaError(
                f"unknown refine method {name!r}: expected one of {list(REFINE_METHODS)} (or a "
                "comma-separated chain of them, e.g. 'propagate,pamr') or None"
            )
        steps.append(_STEPS[name]())
    error = refine_order_error([s.name for s in steps])
    if error is not None:
        raise LavaError(error)
    return tuple(steps)


def refine_name(method: RefineSpec) -> str | None:
    """The chain as recorded and shown: ``"pamr"``, ``"propagate,pamr"``; ``None`` for no step."""
    return ",".join(s.name for s in refine_steps(method)) or None


def check_refine(method: RefineSpec) -> None:
    """Refuse an unknown refine method or chain before any work starts (``None``: no refinement)."""
    refine_steps(method)


def split_refine(method: RefineSpec) -> tuple[tuple[RefineStep, ...], tuple[RefineStep, ...]]:
    """``(propagation steps, the rest)``: the leading token-grid steps, which use one capture's own
    attention (so an ensemble applies them to each run before the mean), and the steps after."""
    steps = refine_steps(method)
    n = next((i for i, s in enumerate(steps) if not isinstance(s, Propagate)), len(steps))
    return steps[:n], steps[n:]


def propagate_heatmaps(
    heatmaps: Heatmaps,
    slices: AttentionSlices | Sequence[AttentionSlices] | None,
    step: Propagate = Propagate(),  # frozen: one shared default is safe
    layers: Sequence[int] | None = None,
) -> Heatmaps:
    """``heatmaps`` propagated by the image attention captured in ``slices`` (``image_qk``).

    The scores ``[B, C, h, w]`` must be on the slices' token grid. The step is the mean over the
    chosen ``layers`` (default: every block with q/k), over each block's prompt rows and heads,
    and over the slices given (``lava.propagate``). The result is normalised again as the maps
    were (``Heatmaps.normalize``): each step is a convex combination, so min-max maps keep
    their range but lose their peaks of 1. Since every row of the attention sums to 1, a step
    commutes with the per-image affine min-max and global rescalings: the result equals
    normalising the propagated raw maps. ``presence`` is kept from the maps as aggregated: it
    compares the raw peaks, which normalised maps no longer carry.
    """
    runs = [slices] if isinstance(slices, AttentionSlices) else list(slices or ())
    if not runs or any(r.image_qk is None for r in runs):
        raise LavaError(
            "refine 'propagate' needs the image queries and keys of the captured blocks: capture with "
            "keep_image_qk=True (segment and eval do when the refine chain includes 'propagate')"
        )
    b, c, h, w = heatmaps.scores.shape
    qs, ks = [], []
    for run in runs:
        if run.grid != (h, w):
            raise LavaError(
                f"propagate works on the token grid {run.grid}, got scores on {(h, w)}: put 'propagate' "
                "before 'pamr' and apply it to heatmaps as aggregated"
            )
        blocks = tuple(layers) if layers is not None else tuple(sorted(run.image_qk))
        missing = [blk for blk in blocks if blk not in run.image_qk]
        if missing:
            raise LavaError(f"no image q/k for blocks {missing}; kept for blocks {sorted(run.image_qk)}")
        for blk in blocks:
            q, k = run.image_qk[blk]  # [B, R, H, N, D]: rows averaged like heads
            qs.append(q.flatten(1, 2))
            ks.append(k.flatten(1, 2))
    maps = heatmaps.scores.flatten(2).transpose(1, 2)  # [B, N, C]
    out = propagate(qs, ks, maps, iterations=step.iterations, temperature=step.temperature)
    scores = out.transpose(1, 2).reshape(b, c, h, w)
    return dataclasses.replace(heatmaps, scores=normalize_scores(scores, heatmaps.normalize).float())


def refine(
    heatmaps: Heatmaps,
    images: Sequence[ImageLike] | None,
    method: RefineSpec = None,
    size: int | tuple[int, int] | None = None,
    *,
    slices: AttentionSlices | Sequence[AttentionSlices] | None = None,
    layers: Sequence[int] | None = None,
    **kw,
) -> Heatmaps:
    """Refine ``heatmaps`` by the chain ``method`` (see ``refine_steps``), step by step, in order.

    ``method=None`` is the model's own refinement (``Heatmaps.defaults.refine``: PAMR for
    ``lava-shapes``), as ``lava.segment`` applies it; when that is none (or the maps carry no
    model defaults) the maps are returned as they are. ``"none"`` also returns them unchanged.

    ``"propagate"`` (``propagate_heatmaps``) needs ``slices`` captured with ``keep_image_qk``
    (``layers``: the blocks whose attention propagates; default all kept) and keeps the token
    grid. ``"pamr"`` needs the ``images``; ``size`` and ``**kw`` (``iterations``, ``dilations``,
    ``lam``) set a PAMR step named by a string (a ``PAMR`` object carries its own). The PAMR step
    is described below.

    PAMR refines ``heatmaps`` with their ``images`` (one per batch row; PIL, uint8 ``[H, W, 3]``
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
        method = heatmaps.defaults.refine if heatmaps.defaults is not None else None
    steps = refine_steps(method)
    if not steps:
        return heatmaps
    b = heatmaps.scores.shape[0]
    if any(isinstance(s, PAMR) for s in steps) and (images is None or len(images) != b):
        raise LavaError(f"refine got {0 if images is None else len(images)} images for {b} heatmaps")
    named = isinstance(method, str) or (
        not isinstance(method, (Propagate, PAMR)) and all(isinstance(m, str) for m in method)
    )
    if (size is not None or kw) and not (named and any(isinstance(s, PAMR) for s in steps)):
        raise LavaError(
            f"size and keyword arguments ({', '.join(kw) or 'size'}) set a PAMR step named by a string; "
            "give a step its parameters as an object instead, e.g. Propagate(iterations=2) or PAMR(size=128)"
        )
    for step in steps:
        if isinstance(step, Propagate):
            heatmaps = propagate_heatmaps(heatmaps, slices, step, layers)
            continue
        if named:  # a PAMR step named by a string takes the keyword arguments
            step = dataclasses.replace(step, size=size, **kw)
        heatmaps = _pamr_heatmaps(heatmaps, images, step)
    return heatmaps


def _pamr_heatmaps(heatmaps: Heatmaps, images: Sequence[ImageLike], step: PAMR) -> Heatmaps:
    """The PAMR step of ``refine`` on the working grid."""
    grid = tuple(heatmaps.scores.shape[-2:])
    work = working_size(grid, step.size)
    scores = F.interpolate(heatmaps.scores.float(), size=work, mode="bilinear", align_corners=False)
    image = _image_tensor(images, work).to(scores.device)
    out = pamr(scores, image, iterations=step.iterations, dilations=step.dilations, lam=step.lam)
    return dataclasses.replace(heatmaps, scores=out)

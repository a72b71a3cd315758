"""Pictures and files the explorer shows: per-class heatmaps, the timestep × block grid, and the
downloads (label PNG, class list, scores) written the way ``lava segment`` writes them."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..results import write_set
from ..stages.mask import upsample
from .session import Grid, Result

HEAT_ALPHA = 0.55  # as ``lava.viz.heatmap_figure`` draws maps over the image


def _jet(values: np.ndarray) -> np.ndarray:
    """``[H, W]`` scores in [0, 1] → ``[H, W, 3]`` uint8 colours (matplotlib's ``jet``, as the
    heatmap figures and ``lava sweep`` use)."""
    from matplotlib import colormaps

    return (colormaps["jet"](np.clip(values, 0.0, 1.0))[..., :3] * 255).round().astype(np.uint8)


def heat_image(image: Image.Image, scores: torch.Tensor) -> Image.Image:
    """One class map ``[h, w]`` (any grid), upsampled to ``image``'s size and blended over it."""
    w, h = image.size
    full = upsample(scores[None].float(), (h, w))[0].cpu().numpy()
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    out = (1 - HEAT_ALPHA) * base + HEAT_ALPHA * _jet(full).astype(np.float32)
    return Image.fromarray(out.round().clip(0, 255).astype(np.uint8), mode="RGB")


def heat_gallery(result: Result) -> list[tuple[Image.Image, str]]:
    """One ``(picture, caption)`` per class: its map over the image, captioned with its name and
    its presence (peak relative to the strongest class)."""
    heat = result.heatmaps
    items = []
    for c, name in enumerate(heat.classes):
        caption = name
        if heat.presence is not None:
            caption += f" (presence {float(heat.presence[0, c]):.2f})"
        items.append((heat_image(result.image, heat.scores[0, c]), caption))
    return items


def grid_image(grid: Grid, panel: int = 160) -> Image.Image:
    """The grid as one picture: a row per timestep, a column per block (and the blocks' mean)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, cols = len(grid.timesteps), len(grid.columns)
    # Each panel is drawn about `panel` px wide: blend on a thumbnail, not the full image (a 4 MP
    # image took ~0.2 s per panel, for pixels matplotlib then throws away).
    small = grid.image.copy()
    small.thumbnail((2 * panel, 2 * panel))
    dpi = 100
    fig, axes = plt.subplots(
        rows,
        cols,
        figsize=(cols * panel / dpi + 0.6, rows * panel / dpi + 0.7),
        squeeze=False,
        layout="constrained",
        dpi=dpi,
    )
    for r, t in enumerate(grid.timesteps):
        for c, col in enumerate(grid.columns):
            ax = axes[r, c]
            ax.imshow(heat_image(small, grid.maps[(t, col)]))
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title("mean" if col == "mean" else f"block {col}", fontsize=9)
            if c == 0:
                ax.set_ylabel(f"t = {t:g}", fontsize=9)
    fig.suptitle(f"{grid.class_name!r}: per-map min-max", fontsize=10)
    fig.canvas.draw()
    picture = Image.fromarray(np.asarray(fig.canvas.buffer_rgba())[..., :3].copy())
    plt.close(fig)
    return picture


def write_downloads(folder: str | os.PathLike, result: Result, stem: str = "lava") -> list[Path]:
    """The files ``lava segment --save-scores`` writes for one image, written by the same code:
    ``<stem>_labels.png`` (pixel value i = i-th class: palette PNG, 16-bit beyond 256 labels),
    ``<stem>_overlay.png``, ``<stem>_classes.txt`` and ``<stem>_scores.npz`` (``scores``
    ``[C, H, W]``, ``classes``)."""
    folder = Path(folder)
    kinds = (("labels", ".png"), ("overlay", ".png"), ("classes", ".txt"), ("scores", ".npz"))
    files = {kind: folder / f"{stem}_{kind}{ext}" for kind, ext in kinds}
    write_set(files, result.segmentation, result.heatmaps.classes)
    return list(files.values())

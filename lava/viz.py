"""Pictures of results: palette label maps, overlays, and per-class heatmap figures."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image


def palette(n: int = 256) -> np.ndarray:
    """The PASCAL VOC colour map: ``[n, 3]`` uint8, colour 0 black, then well-separated hues."""
    colors = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        colors[i] = (r, g, b)
    return colors


def label_image(labels: torch.Tensor | np.ndarray) -> Image.Image:
    """A palette ("P") image of an ``[H, W]`` label map; pixel values are the label ids."""
    arr = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels)
    if arr.max(initial=0) > 255:
        raise ValueError("palette PNGs hold at most 256 labels")
    img = Image.fromarray(arr.astype(np.uint8), mode="P")
    img.putpalette(palette().flatten().tolist())
    return img


def overlay(
    image: Image.Image, labels: torch.Tensor | np.ndarray, classes: Sequence[str] = (), alpha: float = 0.5
) -> Image.Image:
    """Label colours blended over ``image`` (RGB), at the label map's size."""
    arr = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels).astype(np.int64)
    colors = palette()[arr % 256]
    base = np.asarray(image.convert("RGB").resize((arr.shape[1], arr.shape[0])), dtype=np.float32)
    out = (1 - alpha) * base + alpha * colors.astype(np.float32)
    return Image.fromarray(out.round().clip(0, 255).astype(np.uint8), mode="RGB")


def heatmap_figure(heatmaps, index: int = 0, image: Image.Image | None = None):
    """A matplotlib figure: one panel per class with its score map (over ``image`` if given)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch.nn.functional as F

    scores = heatmaps.scores[index].float()
    size = heatmaps.image_sizes[index]
    up = F.interpolate(scores[None], size=size, mode="bilinear", align_corners=False)[0].cpu().numpy()
    n = len(heatmaps.classes)
    fig, axes = plt.subplots(1, n, figsize=(3 * n, 3.2), squeeze=False)
    for ax, name, m in zip(axes[0], heatmaps.classes, up):
        if image is not None:
            ax.imshow(image.resize((size[1], size[0])))
        ax.imshow(m, cmap="jet", alpha=0.55 if image is not None else 1.0)
        ax.set_title(name)
        ax.axis("off")
    fig.tight_layout()
    return fig

"""Pictures of results: palette label maps, overlays, and per-class heatmap figures."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont


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


# A palette PNG holds label ids 0..255; beyond that, label maps are 16-bit grayscale PNGs.
PALETTE_LABELS = 256
MAX_PNG_LABELS = 65536


def check_label_count(num_labels: int, what: str = "labels") -> None:
    """Refuse label maps of more ids than a 16-bit PNG holds (before any model runs)."""
    if num_labels > MAX_PNG_LABELS:
        from .errors import LavaError

        raise LavaError(
            f"{num_labels} {what}: a label PNG holds at most {MAX_PNG_LABELS} label ids (16-bit); "
            "split the classes over several runs"
        )


def label_image(labels: torch.Tensor | np.ndarray, num_labels: int | None = None) -> Image.Image:
    """An ``[H, W]`` label map as a PNG-ready image whose pixel values are the label ids.

    ``num_labels``: how many label ids the map can hold (e.g. ``len(seg.classes)``). Up to 256 it is
    a palette ("P") image (colour i = label i); beyond, a 16-bit grayscale ("I;16") image, up to
    65536 ids: every map of one run then has the same format whatever ids it happens to use.
    ``None`` judges from the values present.
    """
    arr = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels)
    low, high = (int(arr.min()), int(arr.max())) if arr.size else (0, 0)
    if num_labels is not None:
        check_label_count(num_labels)
    if low < 0 or high >= MAX_PNG_LABELS:
        raise ValueError(f"label ids must be in 0..{MAX_PNG_LABELS - 1} for a PNG; got {low}..{high}")
    if num_labels is not None and high >= num_labels:
        raise ValueError(f"label id {high} is not below num_labels={num_labels}")
    if (num_labels if num_labels is not None else high + 1) > PALETTE_LABELS:
        return Image.fromarray(arr.astype(np.uint16))  # mode "I;16"
    img = Image.fromarray(arr.astype(np.uint8), mode="P")
    img.putpalette(palette().flatten().tolist())
    return img


def legend_entries(
    labels: torch.Tensor | np.ndarray, classes: Sequence[str]
) -> list[tuple[int, str, tuple[int, int, int]]]:
    """``(label id, class name, palette colour)`` of every class present in ``labels``, in label order."""
    arr = _as_array(labels)
    pal = palette()
    present = np.unique(arr)
    return [
        (int(i), classes[i], tuple(int(v) for v in pal[i % 256])) for i in present if 0 <= i < len(classes)
    ]


def _as_array(labels: torch.Tensor | np.ndarray) -> np.ndarray:
    return np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels).astype(np.int64)


def _font(px: int):
    try:
        return ImageFont.load_default(size=px)  # scalable (Pillow >= 10.1 with FreeType)
    except (TypeError, AttributeError, OSError):
        return ImageFont.load_default()


def _fit(text: str, font, width: int) -> str:
    """``text`` shortened with an ellipsis until it is at most ``width`` pixels wide."""
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "…") > width:
        text = text[:-1]
    return text.rstrip() + "…" if text else ""


@dataclass(frozen=True)
class LegendRow:
    """One legend line: colour ``swatch`` box (``x0, y0, x1, y1``, inclusive), text, text position."""

    label: int | None  # None for the "+N more" line
    text: str
    color: tuple[int, int, int] | None
    swatch: tuple[int, int, int, int] | None
    text_xy: tuple[int, int]


@dataclass(frozen=True)
class LegendLayout:
    """Where the legend box sits in the overlay (``x0, y0, x1, y1``, inclusive), its font size and
    rows, and the overlay's size ``canvas`` (``W, H``): the label map's, or wider when the legend
    sits beside the image."""

    box: tuple[int, int, int, int]
    font_px: int
    rows: tuple[LegendRow, ...]
    canvas: tuple[int, int]
    beside: bool = False  # True: to the right of the image, on a canvas widened for it


def background_labels(classes: Sequence[str]) -> tuple[int, ...]:
    """The label ids of classes named ``"background"`` (the name ``MaskConfig`` gives label 0)."""
    return tuple(i for i, name in enumerate(classes) if name == "background")


def legend_layout(
    labels: torch.Tensor | np.ndarray,
    classes: Sequence[str],
    background: Sequence[int] | None = None,
) -> LegendLayout | None:
    """The legend ``overlay`` draws on an ``[H, W]`` label map, or ``None`` when it gets none.

    One line per class present (colour swatch + name, in label order) in a dark box. The box goes
    inside the image, in a corner where it covers only ``background`` labels (default: the classes
    named "background"; among such corners, the one hiding the least of them); when every corner
    would cover a labelled object, it goes beside the image, to the right of it, on a canvas
    widened for it (``canvas``), so no object is hidden. The text is about 1/30 of the shorter
    side (9 to 40 px); the box takes at most 60% of the width (longer names end in "…") and half
    the height: with more classes than fit, the largest ones are listed and a last line says how
    many more there are. Images too small for one line at 9 px (under ~40 px high) get no legend.
    """
    arr = _as_array(labels)
    entries = legend_entries(arr, classes)
    height, width = arr.shape
    if not entries:
        return None
    margin = max(2, min(width, height) // 64)
    # the largest text size (from ~1/30 of the shorter side down to 9 px) at which every line fits
    # in half the height; at 9 px, as many lines as fit
    for px in range(min(40, max(9, round(min(width, height) / 30))), 8, -1):
        font = _font(px)
        ascent, descent = font.getmetrics()
        line = ascent + descent
        row_h, sw, gap, pad = line + max(2, px // 4), line - 2, max(3, px // 3), max(3, px // 3)
        rows_fit = (height // 2 - 2 * pad) // row_h
        if len(entries) <= rows_fit:
            break
    if rows_fit < 1 or (len(entries) > rows_fit and rows_fit < 2):
        return None
    shown = entries
    if len(entries) > rows_fit:  # keep the largest classes, in label order, and say how many are left out
        counts = np.bincount(arr.ravel(), minlength=len(classes))
        keep = sorted(entries, key=lambda e: -counts[e[0]])[: max(rows_fit - 1, 0)]
        shown = sorted(keep)
    more = len(entries) - len(shown)
    text_w = int(0.6 * width) - 2 * pad - sw - gap
    if text_w < 3 * px:
        return None
    texts = [_fit(name, font, text_w) for _, name, _ in shown] + ([f"+{more} more"] if more else [])
    box_w = 2 * pad + sw + gap + max(int(np.ceil(font.getlength(t))) for t in texts)
    box_h = 2 * pad + len(texts) * row_h - (row_h - line)
    if box_w > width - 2 * margin or box_h > height - 2 * margin:
        return None

    # inside: a corner whose box covers background only, hiding the smallest share of it
    # (ties: reading order); else beside the image, at its top right
    area = np.bincount(arr.ravel(), minlength=1).astype(np.float64)
    free = np.zeros(max(int(arr.max()) + 1, len(classes)), dtype=bool)
    for i in background_labels(classes) if background is None else background:
        if 0 <= i < len(free):
            free[i] = True
    corners = [
        (margin, margin),
        (width - margin - box_w, margin),
        (margin, height - margin - box_h),
        (width - margin - box_w, height - margin - box_h),
    ]

    def under(xy: tuple[int, int]) -> np.ndarray:
        x, y = xy
        return np.bincount(arr[y : y + box_h, x : x + box_w].ravel(), minlength=len(free))

    clear = [xy for xy in corners if not under(xy)[~free].any()]
    canvas = (width, height)
    if clear:
        x0, y0 = min(clear, key=lambda xy: float((under(xy)[: len(area)] / np.maximum(area, 1)).sum()))
    else:
        x0, y0 = width + margin, margin
        canvas = (width + box_w + 2 * margin, height)
    rows = []
    for r, text in enumerate(texts):
        top = y0 + pad + r * row_h
        if r < len(shown):
            i, _, color = shown[r]
            sy = top + (line - sw) // 2
            swatch = (x0 + pad, sy, x0 + pad + sw - 1, sy + sw - 1)
            rows.append(LegendRow(i, text, color, swatch, (x0 + pad + sw + gap, top)))
        else:
            rows.append(LegendRow(None, text, None, None, (x0 + pad, top)))
    box = (x0, y0, x0 + box_w - 1, y0 + box_h - 1)
    return LegendLayout(box, px, tuple(rows), canvas, beside=not clear)


# The strip a legend beside the image sits on.
LEGEND_STRIP = (255, 255, 255)


def overlay(
    image: Image.Image,
    labels: torch.Tensor | np.ndarray,
    classes: Sequence[str] = (),
    alpha: float = 0.5,
    legend: bool = True,
    background: Sequence[int] | None = None,
) -> Image.Image:
    """Label colours blended over ``image`` (RGB), at the label map's size, with a legend.

    The palette is the PASCAL VOC one (colour ``i`` for label ``i``, as in the label PNGs), so
    colours say nothing about the class names: the legend (``legend_layout``) lists every class
    present with its colour. It is drawn inside the image, in a corner where it covers only
    ``background`` labels (default: the classes named "background"), or else beside the image on a
    canvas widened to the right: the image area (top left, the label map's size) is the plain
    blend either way, pixel-aligned with the image and the label map, and no object is hidden.
    ``legend=False``, no ``classes``, or an image too small for it (under ~40 px high) gives the
    plain blend at the label map's size.
    """
    arr = _as_array(labels)
    colors = palette()[arr % 256]
    base = np.asarray(image.convert("RGB").resize((arr.shape[1], arr.shape[0])), dtype=np.float32)
    out = (1 - alpha) * base + alpha * colors.astype(np.float32)
    img = Image.fromarray(out.round().clip(0, 255).astype(np.uint8), mode="RGB")
    layout = legend_layout(arr, classes, background) if legend and classes else None
    if layout is not None:
        if layout.canvas != img.size:
            wide = Image.new("RGB", layout.canvas, LEGEND_STRIP)
            wide.paste(img, (0, 0))
            img = wide
        draw = ImageDraw.Draw(img, "RGBA")
        draw.rectangle(layout.box, fill=(0, 0, 0, 180))
        font = _font(layout.font_px)
        for row in layout.rows:
            if row.swatch is not None:
                x0, y0, x1, y1 = row.swatch
                draw.rectangle((x0 - 1, y0 - 1, x1 + 1, y1 + 1), outline=(255, 255, 255, 255))
                draw.rectangle(row.swatch, fill=(*row.color, 255))
            draw.text(row.text_xy, row.text, font=font, fill=(255, 255, 255, 255))
    return img


def _wrap_to_width(text, width_px: float, renderer) -> None:
    """Wrap a matplotlib ``Text`` at word boundaries (breaking over-long words) to ``width_px``."""
    words = text.get_text().split()
    if text.get_window_extent(renderer).width <= width_px or not words:
        return

    def fits(s: str) -> bool:
        text.set_text(s)
        return text.get_window_extent(renderer).width <= width_px

    lines, cur = [], ""
    for word in words:
        cand = f"{cur} {word}".strip()
        if fits(cand):
            cur = cand
            continue
        if cur:
            lines.append(cur)
        cur = word
        while not fits(cur) and len(cur) > 1:  # a single word wider than the panel: break it
            cut = len(cur) - 1
            while cut > 1 and not fits(cur[:cut] + "-"):
                cut -= 1
            lines.append(cur[:cut] + "-")
            cur = cur[cut:]
    lines.append(cur)
    text.set_text("\n".join(lines))


def heatmap_figure(heatmaps, index: int = 0, image: Image.Image | None = None, columns: int = 5):
    """A matplotlib figure: one panel per class with its score map (over ``image`` if given).

    Panels are laid out ``columns`` to a row; class names wider than their panel are wrapped
    (over-long words broken with a hyphen), so no title is clipped or runs into its neighbour.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch.nn.functional as F

    scores = heatmaps.scores[index].float()
    size = heatmaps.image_sizes[index]
    up = F.interpolate(scores[None], size=size, mode="bilinear", align_corners=False)[0].cpu().numpy()
    n = len(heatmaps.classes)
    ncols = max(1, min(n, columns))
    nrows = -(-n // ncols)
    panel_w = 3.0
    panel_h = panel_w * size[0] / size[1]
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(panel_w * ncols, (panel_h + 0.6) * nrows), squeeze=False, layout="constrained"
    )
    for ax in axes.flat[n:]:
        ax.axis("off")
    for ax, name, m in zip(axes.flat, heatmaps.classes, up):
        if image is not None:
            ax.imshow(image.resize((size[1], size[0])))
        ax.imshow(m, cmap="jet", alpha=0.55 if image is not None else 1.0)
        ax.set_title(name)
        ax.axis("off")
    # wrap each title to its panel's layout cell (known once the layout has run): a title no wider
    # than its cell stays inside the figure and clear of its neighbours
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    fig_w = fig.get_figwidth() * fig.dpi
    for ax in axes.flat[:n]:
        _wrap_to_width(ax.title, 0.95 * ax.get_position(original=True).width * fig_w, renderer)
    # make room for the extra title lines rather than shrinking the maps, then settle the layout
    # (constrained layout needs a pass with the final titles)
    lines = [ax.title.get_text().count("\n") for ax in axes.flat[:n]]
    extra = sum(max(lines[r * ncols : (r + 1) * ncols]) for r in range(nrows))
    line_in = 1.25 * axes.flat[0].title.get_fontsize() / 72
    fig.set_figheight(fig.get_figheight() + extra * line_in)
    fig.canvas.draw()
    return fig

"""Reports of an evaluation: report.json, the per-class CSV, and the sweep table and figure."""

from __future__ import annotations

import csv
import io as _io
import json
import math
import platform
import textwrap
from collections.abc import Sequence
from pathlib import Path

from .. import io
from .datasets import DatasetInfo
from .metrics import ConfusionMatrix, SegMetrics
from .runner import Cell, EvalSettings


def versions() -> dict[str, str]:
    import diffusers
    import torch
    import transformers

    from .. import __version__

    return {
        "lava": __version__,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def _num(x: float | None) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else round(float(x), 6)


def metrics_dict(m: SegMetrics) -> dict:
    return {
        "miou": _num(m.miou),
        "pixel_accuracy": _num(m.pixel_accuracy),
        "mean_accuracy": _num(m.mean_accuracy),
        "per_class_iou": {k: _num(v) for k, v in m.per_class_iou.items()},
        "per_class_accuracy": {k: _num(v) for k, v in m.per_class_accuracy.items()},
    }


def protocol_line(
    info: DatasetInfo, settings: EvalSettings, views: Sequence[tuple[str, str]] | None = None
) -> str:
    """The one line that must accompany every number: what the method was told and what it read."""
    vocab = (
        "every class of the dataset"
        if settings.protocol == "all"
        else "only the classes present in each image"
    )
    reading = settings.recipe.reading
    views = views or [reading.view]
    if reading.source == "concept":
        read = "concept view (image attention outputs · concept-token outputs, softmax over the classes)"
    else:
        read = "attention " + "; ".join(f"{d}, softmax over {sm} keys" for d, sm in views)
    background = settings.background_mode(info)
    if settings.method != "lava":  # a comparison method reads no attention view of lava's
        read = f"method {settings.method}"
    refine = settings.recipe.refine_label
    refined = f"; refine {refine}" if refine else ""
    return f"protocol={settings.protocol} ({vocab}); background={background}; {read}{refined}"


def write_eval_report(
    out: Path,
    info: DatasetInfo,
    matrix: ConfusionMatrix,
    settings: EvalSettings,
    num_images: int,
    config: dict,
) -> dict:
    """Write ``report.json`` and ``per_class.csv``; return the report."""
    m = matrix.compute(info.classes)
    report = {
        "dataset": info.name,
        "method": settings.method,
        "protocol": settings.protocol,
        "protocol_description": protocol_line(info, settings),
        "num_images": num_images,
        **metrics_dict(m),
        "config": config,
        "versions": versions(),
    }
    io.atomic_write(out / "report.json", lambda p: p.write_text(json.dumps(report, indent=2) + "\n"))
    buf = _io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["class", "iou", "accuracy"])
    for name in info.classes:
        iou, acc = m.per_class_iou[name], m.per_class_accuracy[name]
        writer.writerow([name, "" if iou is None else f"{iou:.6f}", "" if acc is None else f"{acc:.6f}"])
    io.atomic_write(out / "per_class.csv", lambda p: p.write_text(buf.getvalue()))
    return report


def sweep_table(
    cells: Sequence[Cell], mious: dict[str, float]
) -> tuple[list[float], list[str], list[list[float]]]:
    """``(timesteps, block labels, mIoU grid [timestep][block])`` for cells of one view."""
    times = sorted({c.timestep for c in cells})
    labels = list(dict.fromkeys(",".join(map(str, c.layers)) for c in cells))
    grid = [[math.nan] * len(labels) for _ in times]
    for c in cells:
        grid[times.index(c.timestep)][labels.index(",".join(map(str, c.layers)))] = mious[c.key]
    return times, labels, grid


def view_name(settings: EvalSettings, view: tuple[str, str], short: bool = False) -> str:
    """How a sweep's table and summary name an attention view (``image_to_text/joint``)."""
    if settings.recipe.reading.source == "concept":
        return "concept view"
    return f"{view[0]}/{view[1]}" if short else f"{view[0]}, softmax over {view[1]} keys"


def sweep_markdown(panels, best: Cell, mious: dict[str, float], settings: EvalSettings, heading: str) -> str:
    """``sweep.md``: ``heading``, one timestep × blocks table of mIoU per view (``panels``:
    ``(view, timesteps, block labels, grid)``), and the best cell."""
    md = [heading]
    for view, times, labels, grid in panels:
        md += [
            "",
            f"**{view_name(settings, view)}**" if settings.method == "lava" else f"**{settings.method}**",
            "",
            "| timestep \\ blocks | " + " | ".join(labels) + " |",
            "|---:|" + "---:|" * len(labels),
        ]
        for t, row in zip(times, grid):
            md.append(f"| {t:g} | " + " | ".join("–" if math.isnan(v) else f"{v:.3f}" for v in row) + " |")
    md += [
        "",
        f"Best: {view_name(settings, best.view, short=True)}, timestep {best.timestep:g}, "
        f"blocks {list(best.layers)}, mIoU {mious[best.key]:.3f}",
    ]
    return "\n".join(md) + "\n"


def write_sweep(
    out: Path,
    info: DatasetInfo,
    cells: Sequence[Cell],
    matrices: dict[str, ConfusionMatrix],
    settings: EvalSettings,
    num_images: int,
    config: dict,
    title: str | None = None,
) -> dict:
    """Write ``sweep.csv``, ``sweep.md``, ``sweep.png`` and ``sweep.json``; return the summary.

    One table (and one figure panel) per attention view; the best cell over all of them.
    """
    mious = {c.key: matrices[c.key].compute(info.classes).miou for c in cells}
    views = list(dict.fromkeys(c.view for c in cells))
    best = max(cells, key=lambda c: -1.0 if math.isnan(mious[c.key]) else mious[c.key])
    proto = protocol_line(info, settings, views)

    buf = _io.StringIO()
    w = csv.writer(buf)
    w.writerow(["direction", "softmax", "timestep", "layers", "miou"])
    for c in cells:
        w.writerow(
            [c.direction, c.softmax, f"{c.timestep:g}", ",".join(map(str, c.layers)), f"{mious[c.key]:.6f}"]
        )
    io.atomic_write(out / "sweep.csv", lambda p: p.write_text(buf.getvalue()))

    panels = [(view, *sweep_table([c for c in cells if c.view == view], mious)) for view in views]
    md = sweep_markdown(panels, best, mious, settings, f"mIoU on {info.name}, {num_images} images; {proto}.")
    io.atomic_write(out / "sweep.md", lambda p: p.write_text(md))

    summary = {
        "dataset": info.name,
        "method": settings.method,
        "protocol": settings.protocol,
        "protocol_description": proto,
        "num_images": num_images,
        "cells": [
            {
                "direction": c.direction,
                "softmax": c.softmax,
                "timestep": c.timestep,
                "layers": list(c.layers),
                **metrics_dict(matrices[c.key].compute(info.classes)),
            }
            for c in cells
        ],
        "best": {
            "direction": best.direction,
            "softmax": best.softmax,
            "timestep": best.timestep,
            "layers": list(best.layers),
            "miou": _num(mious[best.key]),
        },
        "config": config,
        "versions": versions(),
    }
    io.atomic_write(out / "sweep.json", lambda p: p.write_text(json.dumps(summary, indent=2) + "\n"))
    fig = sweep_figure(
        panels, title or f"{info.name}: mIoU over timestep × block, {num_images} images\n{proto}"
    )
    io.save_figure(fig, out / "sweep.png", dpi=120)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return summary


def sweep_figure(panels, title: str):
    """Heatmaps of mIoU, one panel per view: rows = timesteps (noisier at the top), columns = blocks.

    ``panels``: ``[((direction, softmax), timesteps, block labels, grid [timestep][block])]``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    values = np.concatenate([np.asarray(g, dtype=float).ravel() for *_, g in panels])
    lo, hi = np.nanmin(values), np.nanmax(values)
    n_rows = max(len(times) for _, times, _, _ in panels)
    n_cols = max(len(labels) for _, _, labels, _ in panels)
    fig, axes = plt.subplots(
        1, len(panels), figsize=(len(panels) * (1.8 + 0.6 * n_cols) + 1.0, 2.4 + 0.45 * n_rows), squeeze=False
    )
    for ax, (view, times, labels, grid) in zip(axes[0], panels):
        arr = np.asarray(grid, dtype=float)[::-1]
        im = ax.imshow(arr, cmap="viridis", aspect="auto", vmin=lo, vmax=hi)
        ax.set_xticks(range(len(labels)), labels, rotation=45 if max(map(len, labels)) > 3 else 0)
        ax.set_yticks(range(len(times)), [f"{t:g}" for t in times[::-1]])
        ax.set_xlabel("block(s)")
        ax.set_ylabel("timestep")
        ax.set_title(f"{view[0]}\nsoftmax over {view[1]} keys", fontsize=8)
        for (r, c), v in np.ndenumerate(arr):
            if not np.isnan(v):
                ax.text(
                    c,
                    r,
                    f"{v:.2f}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if v < (lo + hi) / 2 else "black",
                )
    fig.subplots_adjust(top=0.72, bottom=0.18, wspace=0.45)
    fig.colorbar(im, ax=axes[0].tolist(), label="mIoU")
    width = max(60, int(fig.get_figwidth() * 14))
    fig.suptitle("\n".join(textwrap.fill(line, width) for line in title.split("\n")), fontsize=8)
    return fig

"""Reports of an evaluation: report.json, the per-class CSV, and the sweep table and figure."""

from __future__ import annotations

import csv
import io as _io
import json
import math
import platform
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


def protocol_line(info: DatasetInfo, settings: EvalSettings) -> str:
    """The one line that must accompany every number: what the method was told."""
    vocab = (
        "every class of the dataset"
        if settings.protocol == "all"
        else "only the classes present in each image"
    )
    return (
        f"protocol={settings.protocol} ({vocab}); background={settings.background_mode(info)}; "
        f"attention {settings.direction}, softmax over {settings.softmax} keys"
    )


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
    """``(timesteps, layer labels, mIoU grid [timestep][layer])`` from per-cell mIoU."""
    times = sorted({c.timestep for c in cells})
    labels = []
    for c in cells:
        lab = ",".join(map(str, c.layers))
        if lab not in labels:
            labels.append(lab)
    grid = [[math.nan] * len(labels) for _ in times]
    for c in cells:
        grid[times.index(c.timestep)][labels.index(",".join(map(str, c.layers)))] = mious[c.key]
    return times, labels, grid


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
    """Write ``sweep.csv``, ``sweep.md``, ``sweep.png`` and ``sweep.json``; return the summary."""
    mious = {c.key: matrices[c.key].compute(info.classes).miou for c in cells}
    times, labels, grid = sweep_table(cells, mious)
    best = max(cells, key=lambda c: -1.0 if math.isnan(mious[c.key]) else mious[c.key])
    proto = protocol_line(info, settings)

    buf = _io.StringIO()
    w = csv.writer(buf)
    w.writerow(["timestep", "layers", "miou"])
    for c in cells:
        w.writerow([f"{c.timestep:g}", ",".join(map(str, c.layers)), f"{mious[c.key]:.6f}"])
    io.atomic_write(out / "sweep.csv", lambda p: p.write_text(buf.getvalue()))

    md = [
        f"mIoU on {info.name}, {num_images} images; {proto}.",
        "",
        "| timestep \\ blocks | " + " | ".join(labels) + " |",
        "|---:|" + "---:|" * len(labels),
    ]
    for t, row in zip(times, grid):
        md.append(f"| {t:g} | " + " | ".join("–" if math.isnan(v) else f"{v:.3f}" for v in row) + " |")
    md += ["", f"Best: timestep {best.timestep:g}, blocks {list(best.layers)}, mIoU {mious[best.key]:.3f}"]
    io.atomic_write(out / "sweep.md", lambda p: p.write_text("\n".join(md) + "\n"))

    summary = {
        "dataset": info.name,
        "protocol": settings.protocol,
        "protocol_description": proto,
        "num_images": num_images,
        "cells": [
            {
                "timestep": c.timestep,
                "layers": list(c.layers),
                **metrics_dict(matrices[c.key].compute(info.classes)),
            }
            for c in cells
        ],
        "best": {"timestep": best.timestep, "layers": list(best.layers), "miou": _num(mious[best.key])},
        "config": config,
        "versions": versions(),
    }
    io.atomic_write(out / "sweep.json", lambda p: p.write_text(json.dumps(summary, indent=2) + "\n"))
    fig = sweep_figure(times, labels, grid, title or f"{info.name}: mIoU over timestep × block\n{proto}")
    io.save_figure(fig, out / "sweep.png", dpi=120)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return summary


def sweep_figure(times: Sequence[float], labels: Sequence[str], grid: Sequence[Sequence[float]], title: str):
    """Heatmap of mIoU: rows = timesteps (noisier at the top), columns = blocks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    arr = np.asarray(grid, dtype=float)[::-1]
    fig, ax = plt.subplots(figsize=(1.0 + 0.55 * len(labels), 1.2 + 0.45 * len(times)))
    im = ax.imshow(arr, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(labels)), labels, rotation=45 if max(map(len, labels)) > 3 else 0)
    ax.set_yticks(range(len(times)), [f"{t:g}" for t in times[::-1]])
    ax.set_xlabel("block(s)")
    ax.set_ylabel("timestep")
    for (r, c), v in np.ndenumerate(arr):
        if not np.isnan(v):
            ax.text(
                c,
                r,
                f"{v:.2f}",
                ha="center",
                va="center",
                fontsize=7,
                color="white" if v < np.nanmean(arr) else "black",
            )
    fig.colorbar(im, ax=ax, label="mIoU")
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    return fig

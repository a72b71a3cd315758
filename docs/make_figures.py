"""Regenerate the README picture: the shipped example scene, lava's label map, and the overlay.

    python docs/make_figures.py
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

import lava
from lava import io

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "lava" / "assets" / "examples" / "scene_0.png"
CLASSES = ["red square", "blue triangle", "yellow circle"]


def main() -> None:
    backend = lava.load_backend("lava-shapes")
    seg = lava.segment(EXAMPLE, CLASSES, backend=backend)  # the model's own mask defaults
    panels = [("image", Image.open(EXAMPLE).convert("RGB")), ("labels", seg.label_image(0).convert("RGB")),
              ("overlay", seg.overlay(0))]
    w, h = panels[0][1].size
    fig = Image.new("RGB", (3 * w + 20, h + 16), "white")
    draw = ImageDraw.Draw(fig)
    for k, (title, im) in enumerate(panels):
        fig.paste(im, (k * (w + 10), 16))
        draw.text((k * (w + 10) + 2, 2), title, fill="black")
    io.save_png(fig, ROOT / "docs" / "figures" / "readme_example.png")


if __name__ == "__main__":
    main()

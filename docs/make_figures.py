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
    # the overlay is wider than the image when its legend sits beside it
    h = panels[0][1].height
    fig = Image.new("RGB", (sum(im.width for _, im in panels) + 10 * (len(panels) - 1), h + 16), "white")
    draw = ImageDraw.Draw(fig)
    x = 0
    for title, im in panels:
        fig.paste(im, (x, 16))
        draw.text((x + 2, 2), title, fill="black")
        x += im.width + 10
    io.save_png(fig, ROOT / "docs" / "figures" / "readme_example.png")


if __name__ == "__main__":
    main()

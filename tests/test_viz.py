"""Overlays carry a legend of the classes present; heatmap figures keep every title readable."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from PIL import Image

import lava
from lava.types import Heatmaps, Segmentation
from lava.viz import heatmap_figure, label_image, legend_entries, legend_layout, overlay, palette

CLASSES = ("background", "red square", "blue triangle", "yellow circle", "absent thing")


def scene_labels(h: int = 256, w: int = 320) -> np.ndarray:
    lab = np.zeros((h, w), dtype=np.uint8)
    lab[h // 5 : h // 2, w // 8 : w // 3] = 1
    lab[h // 2 : 4 * h // 5, w // 2 : 3 * w // 4] = 2
    lab[h // 8 : h // 3, 2 * w // 3 : 7 * w // 8] = 3
    return lab


def gray(w: int, h: int) -> Image.Image:
    return Image.new("RGB", (w, h), (128, 128, 128))


def test_legend_lists_every_class_present_with_its_palette_colour():
    lab = scene_labels()
    img = overlay(gray(320, 256), lab, CLASSES)
    assert img.size == (320, 256) and img.mode == "RGB"  # pixel-aligned with the image
    layout = legend_layout(lab, CLASSES)
    assert layout is not None
    rows = [r for r in layout.rows if r.label is not None]
    assert [r.label for r in rows] == [0, 1, 2, 3]  # present classes, in label order; not the absent one
    assert [r.text for r in rows] == list(CLASSES[:4])
    arr = np.asarray(img)
    pal = palette()
    for r in rows:
        x0, y0, x1, y1 = r.swatch
        assert x1 - x0 >= 6 and y1 - y0 >= 6
        patch = arr[y0 : y1 + 1, x0 : x1 + 1].reshape(-1, 3)
        assert (patch == pal[r.label]).all(), f"swatch of {r.text!r} is not palette colour {pal[r.label]}"
        assert r.color == tuple(int(v) for v in pal[r.label])
        # the name is drawn in white beside the swatch
        tx, ty = r.text_xy
        text_area = arr[ty : y1 + 3, tx : layout.box[2]]
        assert (text_area.min(axis=-1) > 200).any()
    assert legend_entries(lab, CLASSES) == [(r.label, r.text, r.color) for r in rows]


def assert_legend_hides_no_object(lab, classes, background=(0,)):
    """The overlay's image area differs from the plain blend only on background labels, and any
    part of the canvas beyond the image area is the legend's strip."""
    h, w = lab.shape
    with_legend = np.asarray(overlay(gray(w, h), lab, classes))
    plain = np.asarray(overlay(gray(w, h), lab, classes, legend=False))
    changed = (with_legend[:h, :w] != plain).any(-1)
    assert np.isin(lab[changed], background).all(), "the legend covers a labelled object"
    return with_legend, plain


def test_legend_sits_in_a_corner_of_background_only():
    lab = scene_labels()
    layout = legend_layout(lab, CLASSES)
    assert not layout.beside and layout.canvas == (320, 256)
    x0, y0, x1, y1 = layout.box
    assert (lab[y0 : y1 + 1, x0 : x1 + 1] == 0).all()  # background only under the box
    assert_legend_hides_no_object(lab, CLASSES)
    # outside the box the overlay is exactly the plain blend
    with_legend = np.asarray(overlay(gray(320, 256), lab, CLASSES))
    plain = np.asarray(overlay(gray(320, 256), lab, CLASSES, legend=False))
    outside = np.ones(lab.shape, bool)
    outside[y0 : y1 + 1, x0 : x1 + 1] = False
    assert np.array_equal(with_legend[outside], plain[outside])
    assert not np.array_equal(with_legend, plain)


def test_legend_goes_beside_the_image_when_every_corner_holds_an_object():
    lab = scene_labels()
    for y, x in ((0, 0), (0, -1), (-1, 0), (-1, -1)):  # an object in each corner
        lab[y * 30 : y * 30 + 30 or None, x * 40 : x * 40 + 40 or None] = 4
    layout = legend_layout(lab, CLASSES)
    assert layout.beside and layout.box[0] > 320 and layout.canvas[1] == 256
    assert layout.canvas[0] == layout.box[2] + 1 + (layout.box[0] - 320)  # margin on both sides
    img, plain = assert_legend_hides_no_object(lab, CLASSES)
    assert img.shape == (256, layout.canvas[0], 3)
    assert np.array_equal(img[:, :320], plain)  # the image area is the plain blend, top left
    strip = img[:, 320:]
    x0, y0, x1, y1 = layout.box
    outside = np.ones(strip.shape[:2], bool)
    outside[y0 : y1 + 1, x0 - 320 : x1 - 320 + 1] = False
    assert (strip[outside] == 255).all() and not (strip[~outside] == 255).all()
    # without a background label every pixel is an object's: the legend always goes beside
    no_background = ("cat", *CLASSES[1:])
    assert legend_layout(scene_labels(), no_background).beside
    assert_legend_hides_no_object(scene_labels(), no_background, background=())
    # a background label named by the caller
    assert not legend_layout(scene_labels(), no_background, background=(0,)).beside


def test_shipped_example_legend_hides_no_shape():
    """The 128 px example the README shows: every corner of it holds part of a shape."""
    import lava
    from lava.explore.app import EXAMPLES_DIR

    path = EXAMPLES_DIR / "scene_0.png"
    classes = ["red square", "blue triangle", "yellow circle"]
    seg = lava.segment(path, classes, backend=lava.load_backend("lava-shapes"))
    lab = seg.labels[0].numpy()
    assert seg.classes[0] == "background"
    img = np.asarray(seg.overlay(0))
    plain = np.asarray(seg.overlay(0, legend=False))
    assert img.shape[0] == 128 and img.shape[1] >= 128
    changed = (img[:, :128] != plain).any(-1)
    assert (lab[changed] == 0).all()
    assert legend_layout(lab, seg.classes).rows[-1].text == "yellow circle"  # the whole list, readable


def test_plain_blend_without_legend_classes_or_room():
    lab = scene_labels()
    base = np.asarray(gray(320, 256), dtype=np.float32)
    want = (0.5 * base + 0.5 * palette()[lab].astype(np.float32)).round().astype(np.uint8)
    assert np.array_equal(np.asarray(overlay(gray(320, 256), lab, CLASSES, legend=False)), want)
    assert np.array_equal(np.asarray(overlay(gray(320, 256), lab)), want)  # no names: nothing to list
    tiny = scene_labels(30, 40)
    assert legend_layout(tiny, CLASSES) is None  # too small to hold a readable line
    assert overlay(gray(40, 30), tiny, CLASSES).size == (40, 30)


def test_many_classes_list_the_largest_and_count_the_rest():
    rng = np.random.default_rng(0)
    lab = rng.integers(0, 60, size=(200, 260)).astype(np.int64)
    lab[:100, :] = 7  # by far the largest class
    names = [f"class {i}" for i in range(60)]
    layout = legend_layout(lab, names)
    listed = [r.label for r in layout.rows if r.label is not None]
    assert 7 in listed and listed == sorted(listed)
    assert layout.rows[-1].label is None and layout.rows[-1].text == f"+{60 - len(listed)} more"
    x0, y0, x1, y1 = layout.box
    assert y1 - y0 + 1 <= 100 and x1 - x0 + 1 <= 0.6 * 260


def test_long_names_are_shortened_to_fit():
    lab = scene_labels()
    names = ("background", "a " + "very " * 30 + "long name", "b", "c")
    layout = legend_layout(lab, names)
    assert layout.rows[1].text.endswith("…")
    assert layout.box[2] - layout.box[0] + 1 <= 0.6 * lab.shape[1]


def test_segmentation_overlay_has_legend_and_label_png_is_unchanged():
    lab = torch.from_numpy(scene_labels())
    seg = Segmentation(
        labels=(lab,), scores=(torch.zeros(4, *lab.shape),), classes=CLASSES[:4], images=(gray(320, 256),)
    )
    ov = seg.overlay(0)
    assert ov.size == (320, 256)
    assert not np.array_equal(np.asarray(ov), np.asarray(seg.overlay(0, legend=False)))
    png = seg.label_image(0)
    assert png.mode == "P" and np.array_equal(np.asarray(png), lab.numpy())
    assert png.getpalette()[:12] == palette()[:4].flatten().tolist()
    assert label_image(lab).mode == "P"


def test_label_png_is_a_palette_up_to_256_labels_and_16_bit_beyond(tmp_path):
    import io

    ids = np.arange(40 * 56).reshape(40, 56) % 300
    for n, mode in [(256, "P"), (257, "I;16"), (65536, "I;16")]:
        lab = ids % n
        buf = io.BytesIO()
        label_image(lab, num_labels=n).save(buf, format="PNG")
        with Image.open(buf) as back:
            assert back.mode == mode, n
            assert np.array_equal(np.asarray(back), lab), n  # the ids round-trip
    # the label count decides, not the ids a map happens to use: one format for every map of a run
    assert label_image(np.zeros((4, 4), np.int32), num_labels=300).mode == "I;16"
    assert label_image(np.full((4, 4), 299)).mode == "I;16"  # no count: judged from the values
    seg = Segmentation(
        labels=(torch.from_numpy(ids).int(),),
        scores=(torch.zeros(300, 40, 56),),
        classes=tuple(f"c{i}" for i in range(300)),
    )
    assert seg.label_image(0).mode == "I;16" and np.array_equal(np.asarray(seg.label_image(0)), ids)
    with pytest.raises(lava.LavaError, match="at most 65536 label ids"):
        label_image(ids, num_labels=65537)
    with pytest.raises(ValueError, match="not below num_labels=256"):
        label_image(ids, num_labels=256)


@pytest.mark.parametrize(
    "classes",
    [
        ("person", "traffic light on a pole at the crossing", "a very long class name that will not fit"),
        ("x",),
        tuple(f"class number {i} of a long vocabulary" for i in range(12)),
        ("supercalifragilisticexpialidocious" * 2, "dog"),
    ],
)
@pytest.mark.parametrize("image_size", [(64, 96), (96, 48)])
def test_heatmap_titles_are_not_clipped_or_overlapping(classes, image_size):
    import io

    h = Heatmaps(
        scores=torch.rand(1, len(classes), 8, 8),
        classes=classes,
        image_sizes=(image_size,),
        normalize="minmax",
    )
    fig = heatmap_figure(h, image=gray(image_size[1], image_size[0]))
    fig.savefig(io.BytesIO(), format="png")  # lays the figure out as a user's savefig would
    renderer = fig.canvas.get_renderer()
    fig_box = fig.bbox
    titles = [ax.title for ax in fig.axes if ax.title.get_text()]
    assert [t.get_text().replace("\n", " ").replace("- ", "").replace("-", "") for t in titles] == [
        c.replace("-", "") for c in classes
    ]
    boxes = [t.get_window_extent(renderer) for t in titles]
    for t, b in zip(titles, boxes):
        assert fig_box.x0 <= b.x0 and b.x1 <= fig_box.x1 and fig_box.y0 <= b.y0 and b.y1 <= fig_box.y1, t
    for (i, a), (j, b) in itertools.combinations(enumerate(boxes), 2):
        assert not a.overlaps(b), (titles[i].get_text(), titles[j].get_text())
    # nor does a title run into another panel's picture
    for t, b in zip(titles, boxes):
        for ax in fig.axes:
            if ax is not t.axes and ax.images:
                assert not b.overlaps(ax.get_window_extent(renderer)), t.get_text()
    import matplotlib.pyplot as plt

    plt.close(fig)

"""COCO output: lava's own RLE against pycocotools, ``Segmentation.to_coco`` and
``lava segment --format coco`` read back by ``pycocotools.coco.COCO``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import lava
from lava.cli import main
from lava.coco import counts_string, decode_rle, encode_rle, rle_counts, string_counts
from lava.types import Segmentation

mask_api = pytest.importorskip("pycocotools.mask")
COCO = pytest.importorskip("pycocotools.coco").COCO


def _masks():
    rng = np.random.default_rng(0)
    yield np.zeros((5, 7), bool)
    yield np.ones((5, 7), bool)
    first = np.zeros((4, 3), bool)
    first[0, 0] = True  # the first run of zeros is empty
    yield first
    yield rng.random((37, 53)) > 0.5  # many short runs
    big = np.zeros((300, 200), bool)
    big[40:260, 30:90] = True  # long runs: several 5-bit groups, negative differences
    yield big
    yield rng.random((64, 64)) > 0.97


@pytest.mark.parametrize("mask", list(_masks()), ids=lambda m: f"{m.shape[0]}x{m.shape[1]}")
def test_rle_is_what_pycocotools_writes_and_reads(mask):
    ours = encode_rle(mask)
    theirs = mask_api.encode(np.asfortranarray(mask.astype(np.uint8)))
    assert ours["size"] == list(theirs["size"])
    assert ours["counts"] == theirs["counts"].decode()
    assert np.array_equal(mask_api.decode({"size": ours["size"], "counts": ours["counts"].encode()}), mask)
    assert np.array_equal(decode_rle(ours), mask)
    assert string_counts(counts_string(rle_counts(mask))) == rle_counts(mask)
    assert decode_rle({"size": ours["size"], "counts": rle_counts(mask)}).sum() == mask.sum()


def _segmentation(background: bool) -> Segmentation:
    rng = np.random.default_rng(1)
    classes = ("cat", "sofa", "red lamp")
    labels = []
    for h, w in ((30, 40), (24, 16)):
        lab = rng.integers(0, len(classes) + background, (h, w))
        lab[: h // 2] = 1  # a big region besides the noise
        labels.append(torch.from_numpy(lab.astype(np.uint8)))
    labels[1][labels[1] == 2] = 1  # one class absent from the second image
    scores = tuple(torch.zeros(len(classes), *lab.shape) for lab in labels)
    names = ("background", *classes) if background else classes
    return Segmentation(labels=tuple(labels), scores=scores, classes=names)


@pytest.mark.parametrize("background", [False, True])
def test_to_coco_round_trips_through_pycocotools(tmp_path, background):
    seg = _segmentation(background)
    assert seg.has_background == background
    path = tmp_path / "coco.json"
    path.write_text(json.dumps(seg.to_coco(["a.png", "b.png"])))
    coco = COCO(str(path))
    cats = coco.loadCats(coco.getCatIds())
    assert [c["name"] for c in cats] == ["cat", "sofa", "red lamp"] and [c["id"] for c in cats] == [1, 2, 3]
    first = 1 if background else 0
    for image_id, labels in zip((1, 2), seg.labels):
        info = coco.loadImgs(image_id)[0]
        assert (info["height"], info["width"]) == tuple(labels.shape)
        anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
        present = sorted(set(labels.unique().tolist()) - ({0} if background else set()))
        assert sorted(a["category_id"] for a in anns) == [v - first + 1 for v in present]
        for cat in (1, 2, 3):
            want = (labels.numpy() == cat - 1 + first).astype(np.uint8)
            got = [coco.annToMask(a) for a in anns if a["category_id"] == cat]
            assert np.array_equal(got[0] if got else np.zeros_like(want), want)
            for a in anns:
                if a["category_id"] == cat:
                    assert a["area"] == want.sum() and a["iscrowd"] == 0
                    assert coco.annToRLE(a)["counts"] == a["segmentation"]["counts"]
                    assert np.allclose(a["bbox"], mask_api.toBbox(mask_api.encode(np.asfortranarray(want))))
    if background:  # the background label is no category and has no annotation
        assert all(a["category_id"] in (1, 2, 3) for a in coco.dataset["annotations"])


def test_segment_command_writes_one_coco_file(tmp_path, capsys):
    from conftest import scene

    paths = []
    for i, size in enumerate(((40, 56), (32, 32))):
        p = tmp_path / "in" / f"img{i}.png"
        p.parent.mkdir(exist_ok=True)
        scene(*size, seed=i).save(p)
        paths.append(str(p))
    out = tmp_path / "out"
    args = ["--classes", "cat,potted plant", "--model", "tiny-sd3", "--layers", "1,2", "--timestep", "400"]
    assert main(["segment", *paths, *args, "--format", "coco", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["coco.json"]
    coco = COCO(str(out / "coco.json"))
    assert [im["file_name"] for im in coco.loadImgs(coco.getImgIds())] == ["img0.png", "img1.png"]
    tiny = lava.load_backend("tiny-sd3")
    seg = lava.segment(paths, ["cat", "potted plant"], backend=tiny, layers=[1, 2], timestep=400)
    for image_id, labels in zip((1, 2), seg.labels):
        anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
        got = np.full(labels.shape, 255, np.uint8)
        for a in anns:
            got[coco.annToMask(a) == 1] = a["category_id"] - 1 + seg.has_background
        assert np.array_equal(got, labels.numpy())
    rc = main(["segment", *paths, *args, "--format", "coco", "--save-scores", "--out", str(tmp_path / "x")])
    assert rc == 1 and "--format png" in capsys.readouterr().err

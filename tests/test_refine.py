"""PAMR refinement (lava.refine): the kernel against an explicit loop, its convexity, the stage on
Heatmaps, and the ``refine=`` / ``--refine`` wiring."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import scene
from PIL import Image

import lava
from lava.errors import LavaError
from lava.stages.refine import pamr, pamr_affinity, refine, working_size
from lava.types import Heatmaps


def _two_regions(h: int = 32, w: int = 32, edge: int = 16) -> torch.Tensor:
    """``[1, 3, h, w]``: red left of column ``edge``, green from it on, with mild noise."""
    gen = torch.Generator().manual_seed(0)
    img = torch.zeros(1, 3, h, w)
    img[0, 0, :, :edge] = 0.85
    img[0, 1, :, edge:] = 0.75
    return (img + 0.03 * torch.rand(img.shape, generator=gen)).clamp(0, 1)


def _iou(pred: torch.Tensor, truth: torch.Tensor) -> float:
    return float((pred & truth).sum() / (pred | truth).sum())


def test_pamr_pulls_a_spilled_blob_back_inside_its_colour_region():
    # The object is the red half (x < 16); its score fades out only at x ≈ 22, as a coarse
    # attention map spilling over the edge would. Thresholded at 0.5 it covers x < 22.
    image = _two_regions()
    x = torch.arange(32, dtype=torch.float32)
    score = torch.sigmoid((21.5 - x) / 1.5).expand(32, 32)
    scores = torch.stack([score, 1 - score])[None]  # object, background
    truth = (x < 16).expand(32, 32)
    before = _iou(scores[0, 0] > 0.5, truth)
    after_scores = pamr(scores, image)
    after = _iou(after_scores[0, 0] > 0.5, truth)
    assert before == pytest.approx(16 / 22)
    assert after > before + 0.1, (before, after)
    assert after > 0.95  # 16/22 → 1.0 when written
    # The same through the stage: an 8×8 token-grid map spilling 1.5 tokens past the edge.
    coarse = torch.sigmoid((5.5 - torch.arange(8.0)) / 0.4).expand(8, 8)
    heat = Heatmaps(
        scores=torch.stack([coarse, 1 - coarse])[None],
        classes=("red", "green"),
        image_sizes=((32, 32),),
        normalize="minmax",
    )
    pixels = Image.fromarray((image[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8))
    out = refine(heat, [pixels], "pamr")
    assert out.scores.shape == (1, 2, 32, 32)  # 4x the 8x8 grid
    plain = lava.to_mask(heat).labels[0] == 0
    refined = lava.to_mask(out).labels[0] == 0
    assert _iou(refined, truth) > _iou(plain, truth) + 0.1
    assert out.classes == heat.classes and out.normalize == "minmax" and out.image_sizes == ((32, 32),)


def test_scores_stay_in_range_and_class_sums_are_kept():
    gen = torch.Generator().manual_seed(1)
    image = torch.rand(2, 3, 20, 24, generator=gen)
    raw = torch.rand(2, 4, 20, 24, generator=gen) * 3 - 1
    out = pamr(raw, image, iterations=5)
    lo = raw.amin(dim=(-2, -1), keepdim=True)
    hi = raw.amax(dim=(-2, -1), keepdim=True)
    assert (out >= lo - 1e-6).all() and (out <= hi + 1e-6).all()
    per_pixel = raw.softmax(dim=1)  # sums to 1 over classes: a convex combination keeps that
    assert torch.allclose(pamr(per_pixel, image).sum(dim=1), torch.ones(2, 20, 24), atol=1e-5)


def test_uniform_image_gives_uniform_affinity():
    image = torch.full((1, 3, 10, 12), 0.4)
    a = pamr_affinity(image, dilations=(1, 2, 4))
    assert a.shape == (1, 24, 10, 12)
    assert torch.allclose(a, torch.full_like(a, 1 / 24))


def _explicit_pamr_step(scores: np.ndarray, image: np.ndarray, dilations, lam: float = 0.1) -> np.ndarray:
    """One PAMR iteration written out pixel by pixel (float64): replicate borders, the 8 ring
    neighbours per dilation, σ per channel over those neighbours, logits averaged over channels,
    softmax over neighbours, weighted sum of the neighbours' scores."""
    _, h, w = scores.shape
    out = np.zeros_like(scores)
    for y in range(h):
        for x in range(w):
            nbrs = []
            for d in dilations:
                for dy in (-1, 0, 1):
                    for dx in (-1, 0, 1):
                        if dy == 0 and dx == 0:
                            continue
                        nbrs.append((min(max(y + d * dy, 0), h - 1), min(max(x + d * dx, 0), w - 1)))
            logits = []
            for ny, nx in nbrs:
                per_channel = []
                for ch in range(3):
                    values = [image[ch, py, px] for py, px in nbrs]
                    mean = sum(values) / len(values)
                    sigma = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
                    per_channel.append(-abs(image[ch, y, x] - image[ch, ny, nx]) / (lam * sigma + 1e-8))
                logits.append(sum(per_channel) / 3)
            top = max(logits)
            weights = [math.exp(v - top) for v in logits]
            total = sum(weights)
            for k, (ny, nx) in enumerate(nbrs):
                out[:, y, x] += weights[k] / total * scores[:, ny, nx]
    return out


@pytest.mark.parametrize("dilations", [(1,), (1, 2, 4)])
def test_vectorised_step_matches_an_explicit_loop(dilations):
    rng = np.random.default_rng(2)
    image = rng.random((3, 6, 6))
    image[:, :3, :] *= 0.2  # an edge, so the weights are far from uniform
    scores = rng.random((2, 6, 6))
    want = _explicit_pamr_step(scores, image, dilations)
    s, im = torch.from_numpy(scores)[None], torch.from_numpy(image)[None]
    got = pamr(s, im, iterations=1, dilations=dilations)
    np.testing.assert_allclose(got[0].numpy(), want, atol=1e-6, rtol=0)
    twice = _explicit_pamr_step(want, image, dilations)
    got2 = pamr(s, im, iterations=2, dilations=dilations)
    np.testing.assert_allclose(got2[0].numpy(), twice, atol=1e-6, rtol=0)
    single = pamr(s.float(), im.float(), iterations=1, dilations=dilations)  # the working precision
    np.testing.assert_allclose(single[0].numpy(), want, atol=1e-5, rtol=0)


def test_working_size_and_refusals():
    assert working_size((8, 8)) == (32, 32)
    assert working_size((64, 48)) == (256, 192)  # 4x would be 256 x 192: at the cap
    assert working_size((128, 64)) == (256, 128)  # capped: longer side 256
    assert working_size((8, 6), 40) == (40, 30)
    heat = Heatmaps(
        scores=torch.rand(1, 2, 4, 4), classes=("a", "b"), image_sizes=((8, 8),), normalize="minmax"
    )
    with pytest.raises(LavaError, match="unknown refine method 'crf'"):
        refine(heat, [scene(8, 8)], method="crf")
    # maps built by hand carry no model defaults: no method is no refinement
    assert refine(heat, [scene(8, 8)]) is heat
    with pytest.raises(LavaError, match="2 images for 1 heatmaps"):
        refine(heat, [scene(8, 8), scene(8, 8)], "pamr")
    # PIL, uint8 array, uint8 tensor and float tensor images at the working size read the same.
    pil = scene(16, 16)
    arr = np.array(pil)
    want = refine(heat, [pil], "pamr").scores
    assert want.shape == (1, 2, 16, 16)
    for same in (arr, torch.from_numpy(arr).permute(2, 0, 1), torch.from_numpy(arr / 255.0).permute(2, 0, 1)):
        assert torch.allclose(refine(heat, [same], "pamr").scores, want, atol=1e-6)


@pytest.mark.parametrize("which", ["tiny", "shapes"])
def test_segment_with_refine_runs_on_both_backends(which, request):
    backend = request.getfixturevalue(which)
    img = scene(40, 56)
    classes = ["red square", "blue circle"] if which == "shapes" else ["cat", "dog"]
    plain = lava.segment(img, classes, backend=backend, refine="none")
    seg = lava.segment(img, classes, backend=backend, refine="pamr")
    assert seg.labels[0].shape == (40, 56) and seg.scores[0].shape == (2, 40, 56)
    assert seg.classes == plain.classes
    assert torch.isfinite(seg.scores[0]).all()
    assert float(seg.scores[0].min()) >= 0.0 and float(seg.scores[0].max()) <= 1.0 + 1e-6
    assert not torch.equal(seg.scores[0], plain.scores[0])  # the refinement did something
    with pytest.raises(LavaError, match="unknown refine method"):
        lava.segment(img, classes, backend=backend, refine="crf")


def test_cli_refine_flag(tmp_path, capsys):
    from lava.cli import main

    path = tmp_path / "room.png"
    scene().save(path)
    out = tmp_path / "out"
    args = ["segment", str(path), "--classes", "cat,dog", "--model", "tiny-sd3", "--out", str(out)]
    assert main([*args, "--refine", "pamr"]) == 0
    assert Image.open(out / "room_labels.png").size == (56, 40)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main([*args, "--refine", "crf"])
    assert exit_.value.code != 0
    err = capsys.readouterr().err
    assert "--refine" in err and "unknown refinement 'crf'" in err and "pamr" in err


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    from eval_fixtures import make_voc

    return make_voc(tmp_path_factory.mktemp("voc"), n=2)


def _eval(voc, out, *extra) -> int:
    from lava.cli import main

    args = ["eval", "--dataset", "voc", "--root", str(voc.root), "--model", "tiny-sd3", "--out", str(out)]
    return main([*args, "--limit", "1", *extra])


def test_eval_refine_is_recorded_and_checked_on_resume(voc, tmp_path, capsys):
    out = tmp_path / "run"
    assert _eval(voc, out, "--refine", "pamr") == 0
    journal = out / "journal.rank0.jsonl"
    header = json.loads(journal.read_text().splitlines()[0])
    assert header["config"]["refine"] == "pamr"
    capsys.readouterr()
    assert _eval(voc, out) == 1  # the same folder without the refinement: refused, and named
    assert 'refine: "pamr" -> (unset)' in capsys.readouterr().err
    # A journal written before refine was recorded was made without it: a refined run must not
    # resume it as if it matched.
    plain = tmp_path / "plain"
    assert _eval(voc, plain) == 0
    lines = (plain / "journal.rank0.jsonl").read_text().splitlines()
    old = json.loads(lines[0])
    del old["config"]["refine"]
    (plain / "journal.rank0.jsonl").write_text("\n".join([json.dumps(old), *lines[1:]]) + "\n")
    capsys.readouterr()
    assert _eval(voc, plain, "--refine", "pamr") == 1
    assert 'refine: (unset) -> "pamr"' in capsys.readouterr().err
    assert _eval(voc, plain) == 0  # and without it, it resumes, saying nothing about refine
    assert "refine" not in capsys.readouterr().err


def test_sweep_accepts_refine(voc, tmp_path):
    from lava.cli import main

    out = tmp_path / "sweep"
    args = ["sweep", "--dataset", "voc", "--root", str(voc.root), "--model", "tiny-sd3", "--out", str(out)]
    assert main([*args, "--limit", "1", "--timesteps", "300", "--layers", "1", "--refine", "pamr"]) == 0
    header = json.loads((out / "journal.rank0.jsonl").read_text().splitlines()[0])
    assert header["config"]["refine"] == "pamr"


def test_the_backend_default_refinement_and_none(tiny, shapes):
    """``refine=None`` takes the backend's default (PAMR for lava-shapes, none for tiny-sd3);
    ``"none"`` turns it off; the CLI and eval record what ran."""
    img = scene(40, 56)
    assert shapes.defaults.refine == "pamr" and tiny.defaults.refine is None
    classes = ["red square", "blue circle"]
    default = lava.segment(img, classes, backend=shapes)
    pamr = lava.segment(img, classes, backend=shapes, refine="pamr")
    off = lava.segment(img, classes, backend=shapes, refine="none")
    assert torch.equal(default.scores[0], pamr.scores[0])
    assert not torch.equal(default.scores[0], off.scores[0])
    assert torch.equal(
        lava.segment(img, ["cat", "dog"], backend=tiny).scores[0],
        lava.segment(img, ["cat", "dog"], backend=tiny, refine="none").scores[0],
    )
    assert "refine pamr" in shapes.defaults.describe_mask()


def test_cli_default_refinement_is_announced_and_can_be_turned_off(tmp_path, capsys):
    from lava.cli import main

    path = tmp_path / "in.png"
    scene(40, 56).save(path)
    base = ["segment", str(path), "--classes", "red square,blue circle", "--out", str(tmp_path / "o")]
    assert main(base) == 0
    assert "refine pamr" in capsys.readouterr().err
    assert main([*base, "--refine", "none"]) == 0
    assert "refine" not in capsys.readouterr().err.split("running", 1)[1].splitlines()[0]

"""``lava explore``'s logic without a browser or Gradio: UI values → lava calls, the session cache
of captured maps, the timestep × block grid, file confinement, error messages, downloads."""

from __future__ import annotations

import shutil
import sys

import numpy as np
import pytest
import torch
from conftest import SCORE_ATOL, SCORE_RTOL
from PIL import Image

import lava
from lava.compose import ForwardKey
from lava.explore.app import EXAMPLES_DIR, copy_examples
from lava.explore.render import grid_image, heat_gallery, write_downloads
from lava.explore.session import (
    CacheKey,
    Explorer,
    MapCache,
    error_message,
    parse_timesteps,
    segment_kwargs,
    settings_from_ui,
)

SCENE = EXAMPLES_DIR / "scene_0.png"
CLASSES = "red square, blue triangle, yellow circle"


@pytest.fixture
def explorer(shapes, tmp_path):
    return Explorer(shapes, root=tmp_path)


@pytest.fixture
def scene_path(tmp_path):
    """The shipped example, inside the explorer's folder (where Gradio puts uploads)."""
    path = tmp_path / "upload" / "scene_0.png"
    path.parent.mkdir()
    shutil.copyfile(SCENE, path)
    return path


def ui(backend, **changes):
    values = dict(classes=CLASSES, timestep=50, blocks=["0"])
    values.update(changes)
    return settings_from_ui(backend, **values)


def assert_same(result, seg):
    """The explorer's result is ``lava.segment``'s: both run ``lava.compose`` with the same recipe
    and capture the same text keys (those the presence rule reads), so the same computation, and
    they agree bit for bit."""
    assert result.segmentation.classes == seg.classes
    assert torch.equal(result.segmentation.labels[0], seg.labels[0])
    assert torch.equal(result.segmentation.scores[0], seg.scores[0])


# ---- UI values → settings ------------------------------------------------------------------------


def test_defaults_are_the_models(shapes):
    s = ui(shapes)
    d = shapes.defaults
    assert s.classes == ("red square", "blue triangle", "yellow circle")
    r = s.recipe
    assert (r.aggregate.normalize, r.mask.background_threshold, r.mask.min_presence) == (
        d.normalize,
        d.background_threshold,
        d.min_presence,
    )
    assert r.refine_label == d.refine == "pamr" and s.layers == (0,)
    assert r.aggregate.presence == d.presence
    assert ui(shapes, refine="none").recipe.refine == ()


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(classes=""), "class name #1 is blank"),
        (dict(classes="red square, , blue circle"), "class name #2 is blank"),
        (dict(classes="red square, Red  Square"), "duplicate class name"),
        (dict(timestep=1000), "timestep must be in [0, 1000)"),
        (dict(timestep=-1), "timestep must be in [0, 1000)"),
        (dict(timestep=None), "no timestep given"),
        (dict(timestep="soon"), "timestep must be a number"),
        (dict(blocks=[]), "no block selected"),
        (dict(blocks=["7"]), "layer index 7 is out of range"),
        (dict(source="concept", softmax="cross"), "the concept source has no direction or softmax"),
        (dict(direction="sideways"), "direction must be one of image_to_text, text_to_image"),
        (dict(background_threshold=1.5), "background threshold must be between 0 and 1"),
        (dict(min_presence=float("nan")), "min presence must be between 0 and 1"),
        (dict(seed=1.5), "seed must be a whole number"),
        (dict(refine="blur"), "unknown refine method 'blur'"),
        (dict(classes="red square, background"), "a class is named 'background'"),
    ],
)
def test_bad_ui_values_raise_lava_errors_that_name_them(shapes, changes, message):
    with pytest.raises(lava.LavaError) as err:
        ui(shapes, **changes)
    assert message in str(err.value)
    assert error_message(err.value) == str(err.value)


def test_background_modes(shapes):
    assert ui(shapes, background="none").recipe.mask.background_threshold is None
    named = ui(shapes, background="class", classes="red square, background")
    assert named.classes == ("red square", "background") and named.recipe.mask.background_threshold is None
    assert ui(shapes, background="class").classes[-1] == "background"
    assert ui(shapes, background="class", classes="Background, red square").classes == (
        "Background",
        "red square",
    )
    assert ui(shapes, min_presence=0).recipe.mask.min_presence is None  # 0: every class competes


def test_parse_timesteps(shapes):
    assert parse_timesteps(shapes, "100, 300,300,900") == (100.0, 300.0, 900.0)
    for text, message in [("", "no timesteps"), ("1,x", "must be numbers"), ("1000", "timestep must be in")]:
        with pytest.raises(lava.LavaError, match=message):
            parse_timesteps(shapes, text)


# ---- results equal lava.segment --------------------------------------------------------------------


@pytest.mark.parametrize(
    "changes",
    [
        dict(),
        dict(timestep=300, blocks=["0", "2", "3"], tokens="clip", seed=3),
        dict(direction="text_to_image", softmax="cross", normalize="global"),
        dict(source="concept", blocks=["1", "3"]),
        dict(refine="pamr", background="none", min_presence=0),
        dict(background="class", background_threshold=0.5),
    ],
)
def test_run_equals_lava_segment(explorer, shapes, scene_path, changes):
    settings = ui(shapes, **changes)
    result = explorer.run(explorer.new_cache(), scene_path, settings)
    assert result.forwards == 1
    assert_same(result, lava.segment(SCENE, backend=shapes, **segment_kwargs(settings)))


def test_mask_settings_reuse_the_captured_maps(explorer, shapes, scene_path):
    cache = explorer.new_cache()
    first = explorer.run(cache, scene_path, ui(shapes))
    assert (first.forwards, explorer.forwards) == (1, 1)
    for changes in (
        dict(background_threshold=0.6),
        dict(min_presence=0),
        dict(background="none"),
        dict(normalize="global", tokens="clip"),
        dict(refine="pamr"),
    ):
        settings = ui(shapes, **changes)
        again = explorer.run(cache, scene_path, settings)
        assert again.forwards == 0, changes
        assert_same(again, lava.segment(SCENE, backend=shapes, **segment_kwargs(settings)))
    assert explorer.forwards == 1


def test_forward_inputs_run_the_model_and_blocks_accumulate(explorer, shapes, scene_path):
    cache = explorer.new_cache()
    explorer.run(cache, scene_path, ui(shapes, blocks=["0"]))
    explorer.run(cache, scene_path, ui(shapes, blocks=["2", "3"]))  # new blocks: one forward over 0, 2, 3
    assert explorer.forwards == 2
    for blocks in (["0"], ["3"], ["0", "2"], ["0", "2", "3"]):
        settings = ui(shapes, blocks=blocks)
        result = explorer.run(cache, scene_path, settings)
        assert result.forwards == 0, blocks
        assert_same(result, lava.segment(SCENE, backend=shapes, **segment_kwargs(settings)))
    for changes in (dict(timestep=400), dict(seed=1), dict(classes="red square"), dict(softmax="cross")):
        assert explorer.run(cache, scene_path, ui(shapes, **changes)).forwards == 1, changes
    # a new session does not see another's maps
    assert explorer.run(explorer.new_cache(), scene_path, ui(shapes)).forwards == 1


def test_a_changed_image_is_a_new_forward(explorer, shapes, scene_path, tmp_path):
    cache = explorer.new_cache()
    explorer.run(cache, scene_path, ui(shapes))
    other = tmp_path / "upload" / "other.png"
    shutil.copyfile(EXAMPLES_DIR / "scene_1.png", other)
    assert explorer.run(cache, other, ui(shapes)).forwards == 1
    same_pixels = tmp_path / "upload" / "copy.png"
    shutil.copyfile(scene_path, same_pixels)
    assert explorer.run(cache, same_pixels, ui(shapes)).forwards == 0


def test_cache_is_bounded():
    cache = MapCache(size=2)
    forward = ForwardKey(50.0, 0, None, None, "mean", "auto", "attention", None)
    keys = [CacheKey(str(i), ("a",), forward, ("image_to_text", "joint"), False, "peak") for i in range(3)]
    fake = [type("S", (), {"maps": {0: None}, "layers": (0,)})() for _ in range(3)]
    for k, s in zip(keys, fake):
        cache.put(k, s)
    assert len(cache) == 2 and cache.get(keys[0], [0]) is None and cache.get(keys[2], [0]) is fake[2]


# ---- the grid --------------------------------------------------------------------------------------


def test_grid_one_forward_per_timestep_for_all_blocks(explorer, shapes, scene_path):
    cache = explorer.new_cache()
    settings = ui(shapes)
    grid = explorer.grid(cache, scene_path, settings, "blue triangle", (100, 500), (0, 1, 3))
    assert grid.forwards == 2 and explorer.forwards == 2
    assert grid.columns == (0, 1, 3, "mean")
    # The explorer reads as lava.segment does: the model's prompt layout (one class per prompt here).
    layout = settings.recipe.prompt.max_classes_per_prompt
    prompt = lava.encode_prompt(shapes, settings.classes, max_classes_per_prompt=layout)
    for t in (100, 500):
        noisy = lava.noise(shapes, Image.open(SCENE).convert("RGB"), timestep=t)
        for col in grid.columns:
            layers = [0, 1, 3] if col == "mean" else [col]
            slices = lava.capture(shapes, noisy, prompt, layers=layers)
            alone = lava.aggregate(slices, prompt, normalize="minmax")
            # The grid's forward captured every text key, this one the class keys only: two
            # computations, equal up to float rounding (conftest.SCORE_ATOL).
            torch.testing.assert_close(
                grid.maps[(float(t), col)], alone.scores[0, 1], atol=SCORE_ATOL, rtol=SCORE_RTOL
            )
    # again, and the main view at a grid timestep and block: all from the cache
    assert explorer.grid(cache, scene_path, settings, "red square", (500, 100), (1, 3)).forwards == 0
    assert explorer.run(cache, scene_path, ui(shapes, timestep=100, blocks=["1", "3"])).forwards == 0
    picture = grid_image(grid)
    assert picture.mode == "RGB" and picture.size[0] > picture.size[1]  # 4 columns, 2 rows
    with pytest.raises(lava.LavaError, match="not among the classes"):
        explorer.grid(cache, scene_path, settings, "green circle", (100,), (0,))


# ---- inputs from clients ---------------------------------------------------------------------------


def test_images_only_from_the_apps_folder(explorer, tmp_path):
    for path, message in [
        (None, "no image"),
        ("", "no image"),
        (SCENE, "not one this app received"),
        (tmp_path / ".." / "elsewhere.png", "not one this app received"),
        ("/etc/passwd", "not one this app received"),
    ]:
        with pytest.raises(lava.ImageError, match=message):
            explorer.load(path)
    link = tmp_path / "link.png"
    link.symlink_to(SCENE)  # a link inside the folder to a file outside it is outside
    with pytest.raises(lava.ImageError, match="not one this app received"):
        explorer.load(link)


def test_unreadable_and_oversized_images(shapes, tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    big = tmp_path / "big.png"
    Image.new("RGB", (400, 300)).save(big)
    explorer = Explorer(shapes, root=tmp_path, max_pixels=100_000)
    with pytest.raises(lava.ImageError, match="cannot read the upload as an image"):
        explorer.load(text)
    with pytest.raises(lava.ImageError, match=r"400x300 px \(0.1 megapixels\).*at most 0.1 megapixels"):
        explorer.load(big)


def test_unexpected_errors_say_little_and_go_to_the_log(caplog):
    try:
        raise RuntimeError("tensor shapes do not match at /secret/path.py")
    except RuntimeError as err:
        message = error_message(err)
    assert message == "internal error (RuntimeError); the server log has the details"
    assert "Traceback" in caplog.text and "/secret/path.py" in caplog.text
    assert error_message(FileNotFoundError(2, "No such file or directory", "x.png")) == (
        "no such file or directory: x.png"
    )


# ---- pictures and downloads ------------------------------------------------------------------------


def test_downloads_and_heatmaps(explorer, shapes, scene_path, tmp_path):
    settings = ui(shapes)
    result = explorer.run(explorer.new_cache(), scene_path, settings)
    files = write_downloads(tmp_path / "out", result, "scene_0")
    assert [f.name for f in files] == [
        "scene_0_labels.png",
        "scene_0_overlay.png",
        "scene_0_classes.txt",
        "scene_0_scores.npz",
    ]
    seg = lava.segment(SCENE, backend=shapes, **segment_kwargs(settings))
    with Image.open(files[0]) as labels:
        assert labels.mode == "P" and np.array_equal(np.asarray(labels), seg.labels[0].numpy())
    assert files[2].read_text().splitlines() == list(seg.classes)
    with np.load(files[3]) as npz:
        assert np.array_equal(npz["scores"], seg.scores[0].numpy())
        assert list(npz["classes"]) == list(settings.classes)
    gallery = heat_gallery(result)
    assert [caption.split(" (")[0] for _, caption in gallery] == list(settings.classes)
    assert all(picture.size == (128, 128) for picture, _ in gallery)


def test_copy_examples(tmp_path):
    examples = copy_examples(tmp_path)
    assert examples["scene_0"] == (tmp_path / "scene_0.png", CLASSES)
    assert (tmp_path / "scene_0.png").read_bytes() == SCENE.read_bytes()


# ---- the command -----------------------------------------------------------------------------------


def test_explore_without_gradio_says_how_to_install(monkeypatch, capsys):
    from lava.cli import main

    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio → ImportError
    assert main(["explore", "--port", "7999"]) == 1
    err = capsys.readouterr().err
    assert "lava explore needs Gradio" in err and 'pip install -e ".[explore]"' in err
    assert "using lava-shapes" not in err  # refused before any model loads


def test_explore_dry_run_plans_and_other_methods_are_refused(capsys):
    from lava.cli import main

    assert main(["explore", "--dry-run"]) == 0  # the plan, and no app
    assert "estimated peak" in capsys.readouterr().out
    assert main(["explore", "--method", "maskclip"]) == 1
    assert "--method maskclip has no blocks or timesteps to explore" in capsys.readouterr().err


def test_explore_options(capsys):
    from lava.cli import build_parser

    args = build_parser().parse_args(["explore"])
    assert (args.host, args.port, args.max_upload, args.model) == ("127.0.0.1", 7860, 10, None)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["explore", "--max-upload", "-1"])
    assert "expected a positive number of megabytes" in capsys.readouterr().err


def test_old_result_folders_are_removed(tmp_path):
    import os
    import time

    from lava.explore.handlers import fresh_folder

    old = tmp_path / "old"
    old.mkdir()
    (old / "labels.png").write_bytes(b"x")
    hour_ago = time.time() - 3700
    os.utime(old, (hour_ago, hour_ago))
    recent = fresh_folder(tmp_path)
    newer = fresh_folder(tmp_path)
    assert not old.exists() and recent.is_dir() and newer.is_dir() and recent != newer


@pytest.mark.parametrize(
    "changes", [dict(tokens="t5"), dict(source="concept"), dict(background_threshold=0.3)]
)
def test_other_backends(tiny, tmp_path, changes):
    """tiny-sd3 (CLIP+T5, no mask defaults): the same equality, and /segment's defaults need no
    threshold."""
    path = tmp_path / "scene.png"
    shutil.copyfile(SCENE, path)
    explorer = Explorer(tiny, root=tmp_path)
    background = "threshold" if "background_threshold" in changes else "none"
    settings = settings_from_ui(
        tiny, classes="cat, dog", timestep=500, blocks=["1", "2"], background=background, **changes
    )
    assert_same(
        explorer.run(explorer.new_cache(), path, settings),
        lava.segment(SCENE, backend=tiny, **segment_kwargs(settings)),
    )
    defaults = explorer.default_settings("cat, dog")
    assert (defaults.background, defaults.layers, defaults.timestep) == ("none", (1, 2), 500.0)
    with pytest.raises(lava.LavaError, match="tiny-sd3 has no default: enter one"):
        settings_from_ui(tiny, classes="cat", timestep=500, blocks=["1"], background="threshold")


def test_propagation_refinement_equals_lava_segment(explorer, shapes, scene_path):
    """A propagation step reads the forward's own image attention, as segment's does."""
    settings = ui(shapes, refine="propagate,pamr")
    result = explorer.run(explorer.new_cache(), scene_path, settings)
    assert_same(result, lava.segment(scene_path, backend=shapes, **segment_kwargs(settings)))

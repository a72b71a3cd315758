"""The Python API at its edges: odd inputs, streaming results, numpy views, model-loading errors."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from conftest import scene

import lava
from lava.errors import ClassNameError, ImageError, LavaError

CLASSES = ["cat", "dog"]


@pytest.mark.parametrize(
    ("images", "message"),
    [
        (None, "no images given (got None)"),
        (b"\x89PNG...", "got raw bytes: pass a file path, or decode them first"),
        (bytearray(b"abc"), "got raw bytes"),
        ([], "no images given"),
        (42, "expected an image path, a PIL image, a uint8 array or a list of them, got int"),
        ([b"abc"], "got raw bytes"),
    ],
)
def test_unusable_image_inputs_raise_image_error(tiny, images, message):
    with pytest.raises(ImageError) as caught:
        lava.segment(images, CLASSES, backend=tiny)
    assert message in str(caught.value)


def test_segment_iter_streams_what_segment_collects(tiny):
    imgs = [scene(40, 56, seed=0), scene(24, 32, seed=1), scene(40, 56, seed=2)]
    whole = lava.segment(imgs, CLASSES, backend=tiny, timestep=300, layers=[1])
    parts = list(lava.segment_iter(imgs, CLASSES, backend=tiny, timestep=300, layers=[1]))
    assert [i for i, _ in parts] == [0, 1, 2]
    for i, one in parts:
        assert len(one) == 1 and one.classes == whole.classes and one.images[0].size == imgs[i].size
        assert torch.equal(one.labels[0], whole.labels[i])
        assert torch.equal(one.scores[0], whole.scores[i])


def test_segment_iter_reads_each_path_only_when_its_turn_comes(tiny, tmp_path, monkeypatch):
    import lava.pipeline as pipeline

    paths = []
    for i in range(3):
        paths.append(tmp_path / f"{i}.png")
        scene(seed=i).save(paths[-1])
    opened = []
    real = pipeline.load_image
    monkeypatch.setattr(pipeline, "load_image", lambda im: opened.append(im) or real(im))
    stream = lava.segment_iter(paths, CLASSES, backend=tiny)
    for n, (i, _) in enumerate(stream):
        assert opened == paths[: n + 1] and i == n


def test_numpy_views(tiny, image):
    seg = lava.segment(image, CLASSES, backend=tiny, background_threshold=0.3)
    labels, scores, classes = seg.numpy(0)
    assert isinstance(labels, np.ndarray) and isinstance(scores, np.ndarray)
    assert labels.shape == (image.height, image.width) and labels.dtype == np.uint8
    assert scores.shape == (2, image.height, image.width) and scores.dtype == np.float32
    assert classes == ("background", "cat", "dog")
    np.testing.assert_array_equal(labels, seg.labels[0].numpy())
    np.testing.assert_array_equal(scores, seg.scores[0].numpy())
    assert np.shares_memory(labels, seg.labels[0].numpy())  # a view, not a copy
    with pytest.raises(ValueError, match="read-only"):
        labels[0, 0] = 1  # the result stays frozen
    assert seg.numpy(0).labels is not None and seg.numpy().classes == classes


@pytest.mark.parametrize("value", [1.5, -0.1, float("nan")])
def test_thresholds_outside_unit_interval_are_refused(tiny, image, value):
    with pytest.raises(LavaError, match="must be between 0 and 1"):
        lava.segment(image, CLASSES, backend=tiny, background_threshold=value)
    with pytest.raises(LavaError, match="must be between 0 and 1"):
        lava.segment(image, CLASSES, backend=tiny, min_presence=value)


def test_background_class_and_threshold(tiny, image):
    with pytest.raises(ClassNameError, match="a class is named 'background' and a background threshold"):
        lava.segment(image, ["cat", "background"], backend=tiny, background_threshold=0.4)
    with pytest.raises(ClassNameError):
        lava.segment(
            image, ["cat", "background"], backend=tiny, mask_config=lava.MaskConfig(background_threshold=0.4)
        )
    # A threshold that is only the backend's default gives way to the named class: one "background".
    with_default = dataclasses.replace(
        tiny, defaults=dataclasses.replace(tiny.defaults, background_threshold=0.4)
    )
    seg = lava.segment(image, ["cat", "background"], backend=with_default)
    assert seg.classes == ("cat", "background")
    assert lava.segment(image, ["cat"], backend=with_default).classes == ("background", "cat")


def test_negative_layers_count_from_the_end(tiny, image):
    last = tiny.num_blocks - 1
    a = lava.segment(image, CLASSES, backend=tiny, layers=[-1])
    b = lava.segment(image, CLASSES, backend=tiny, layers=[last])
    assert torch.equal(a.scores[0], b.scores[0])


# ---- model-loading errors -----------------------------------------------------------------------


def _chained(outer: BaseException, inner_type: type) -> BaseException:
    inner = inner_type.__new__(inner_type)  # the hub's errors need an HTTP response to construct
    outer.__cause__ = inner
    return outer


def test_load_error_messages_say_what_to_do():
    from huggingface_hub import errors as hub

    from lava.backends import load_error_message

    repo = "stabilityai/stable-diffusion-3-medium-diffusers"
    diffusers_text = OSError("Cannot load model ... Please check out the root cause in the stacktrace above.")
    gated = load_error_message(repo, _chained(diffusers_text, hub.GatedRepoError))
    assert gated.startswith(f"{repo} is a gated repository on the Hugging Face hub: accept its licence")
    assert "log in" in gated and "save_pretrained()" in gated and "stacktrace" not in gated
    missing = load_error_message("nobody/nothing", _chained(OSError("x"), hub.RepositoryNotFoundError))
    assert missing.startswith("nobody/nothing was not found on the Hugging Face hub")
    offline = load_error_message(repo, _chained(OSError("x"), hub.OfflineModeIsEnabled))
    assert "not in the local Hugging Face cache and offline mode is on (HF_HUB_OFFLINE)" in offline
    no_network = load_error_message(repo, _chained(OSError("x"), ConnectionError))
    assert "not in the local Hugging Face cache and the hub cannot be reached (no network?)" in no_network


def test_modules_and_stage_functions_never_share_a_name():
    """``import lava.stages.X`` is always a module; ``lava.X`` stays the stage function whichever is
    imported first (the stage modules live in ``lava.stages``, their functions at the top)."""
    import importlib
    import types

    import lava

    for name in ("noise", "capture", "aggregate", "refine", "propagate"):
        module = importlib.import_module(f"lava.stages.{name}")
        assert isinstance(module, types.ModuleType)
        assert callable(getattr(lava, name)) and not isinstance(getattr(lava, name), types.ModuleType)
        assert getattr(lava, name) is getattr(module, name)
    import lava.stages.capture as c

    assert callable(c.transformer_inputs)

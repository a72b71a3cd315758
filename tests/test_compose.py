"""One composition, one set of defaults: every stage called with no options does what ``segment``
does, every option is declared once, and recipes share forward passes."""

from __future__ import annotations

import argparse

import pytest
import torch
from conftest import scene

import lava
from lava import compose
from lava.config import Reading, Recipe, recipe
from lava.errors import LavaError
from lava.options import OPTIONS

CLASSES = ["red square", "blue triangle", "yellow circle"]


@pytest.mark.parametrize("which", ["shapes", "tiny", "tiny_flux"])
def test_stage_by_stage_equals_segment(which, request):
    # The same computation both ways (the stages composed by hand and by lava.segment), so the
    # results are compared bit for bit.
    backend = request.getfixturevalue(which)
    image = scene(32, 32, seed=3)
    noisy = lava.noise(backend, image)
    prompt = lava.encode_prompt(backend, CLASSES)
    slices = lava.capture(backend, noisy, prompt)
    heat = lava.refine(lava.aggregate(slices, prompt), [image])
    by_hand = lava.to_mask(heat)
    seg = lava.segment(image, CLASSES, backend=backend)
    assert by_hand.classes == seg.classes
    assert torch.equal(by_hand.labels[0], seg.labels[0])
    assert torch.equal(by_hand.scores[0], seg.scores[0])


def test_stages_take_the_models_defaults(shapes):
    d = shapes.defaults
    image = scene(32, 32, seed=1)
    prompt = lava.encode_prompt(shapes, CLASSES)
    slices = lava.capture(shapes, lava.noise(shapes, image), prompt)
    assert slices.layers == tuple(d.layers) and slices.defaults == d
    # the capture keeps the text keys the model's presence rule reads (the filler keys too for "null")
    assert slices.columns == prompt.keys_for(d.presence)
    nulls = lava.capture(shapes, lava.noise(shapes, image), prompt, columns=prompt.keys_for("null"))
    assert nulls.columns == prompt.text_keys()
    heat = lava.aggregate(slices, prompt)
    assert heat.normalize == d.normalize and heat.defaults == d
    seg = lava.to_mask(heat)
    assert seg.classes[0] == "background"  # the model's background threshold applies


def test_recipe_fills_every_setting_from_the_model(tiny):
    d = tiny.defaults
    r = recipe(tiny)
    assert r.reading.timesteps == (float(d.timestep),) and r.reading.layers == tuple(d.layers)
    assert r.reading.seeds == (0,) and r.reading.view == ("image_to_text", "joint")
    assert r.aggregate.normalize == d.normalize and r.aggregate.presence == d.presence
    assert r.mask.background_threshold == d.background_threshold
    assert r.refine_label == d.refine


def test_recipe_options_none_is_the_model_zero_is_off(shapes):
    r = recipe(shapes, background_threshold=0, min_presence=0, refine="none", normalize=None)
    assert r.mask.background_threshold is None and r.mask.min_presence is None
    assert r.refine == () and r.aggregate.normalize == shapes.defaults.normalize
    assert recipe(shapes, refine="propagate,pamr").refine_label == "propagate,pamr"
    # a class named "background" takes the place of the model's default threshold
    assert recipe(shapes, classes=["background", "red circle"]).mask.background_threshold is None
    with pytest.raises(lava.ClassNameError):
        recipe(shapes, classes=["background", "red circle"], background_threshold=0.3)


def test_recipe_refuses_bad_options_by_name(tiny):
    with pytest.raises(LavaError, match="unknown option"):
        recipe(tiny, timestpe=5)
    with pytest.raises(LavaError, match="direction must be one of"):
        recipe(tiny, direction="sideways")
    with pytest.raises(LavaError, match="not both"):
        recipe(tiny, timestep=100, timesteps=[100, 200])
    with pytest.raises(LavaError, match="concept"):
        recipe(tiny, source="concept", softmax="cross")
    with pytest.raises(LavaError, match="between 0 and 1"):
        recipe(tiny, min_presence=2)
    with pytest.raises(LavaError, match="out of range"):
        recipe(tiny, layers=[99])


def test_recipe_replace_by_option_name(tiny):
    r = recipe(tiny)
    changed = r.replace(timestep=300, layers=(1,), softmax="cross", min_presence=0.5, refine="pamr")
    assert changed.reading.timesteps == (300.0,) and changed.reading.layers == (1,)
    assert changed.reading.softmax == "cross" and changed.mask.min_presence == 0.5
    assert changed.refine_label == "pamr" and r.refine_label == tiny.defaults.refine
    with pytest.raises(LavaError, match="unknown option"):
        r.replace(colour="red")


def test_segment_takes_a_recipe_or_options_not_both(tiny, image):
    r = recipe(tiny, layers=[1])
    a = lava.segment(image, ["cat", "dog"], backend=tiny, recipe=r)
    b = lava.segment(image, ["cat", "dog"], backend=tiny, layers=[1])
    assert torch.equal(a.labels[0], b.labels[0]) and torch.equal(a.scores[0], b.scores[0])
    with pytest.raises(LavaError, match="not both"):
        lava.segment(image, ["cat"], backend=tiny, recipe=r, layers=[1])
    with pytest.raises(LavaError, match="unknown option"):
        lava.segment(image, ["cat"], backend=tiny, layer=[1])


def test_recipes_share_forward_passes(tiny, image, monkeypatch):
    calls = []
    real = compose.capture_views

    def counting(*args, **kwargs):
        calls.append(kwargs["layers"])
        return real(*args, **kwargs)

    monkeypatch.setattr(compose, "capture_views", counting)
    prompt = compose.prepare_prompt(tiny, ["cat", "dog"], recipe(tiny).prompt)
    one, two = recipe(tiny, layers=[0]), recipe(tiny, layers=[2], softmax="cross")
    heats = compose.read_heatmaps(tiny, [image], prompt, [one, two])
    assert calls == [[0, 2]]  # one forward, both blocks and both views
    alone = compose.read_heatmaps(tiny, [image], prompt, [two])[0]
    # the same block and view computed in a forward that also captured block 0: the same
    # arithmetic per block, so equal up to float noise (stated tolerance)
    torch.testing.assert_close(heats[1].scores, alone.scores, rtol=1e-5, atol=1e-6)


def test_ensemble_runs_are_every_timestep_with_every_seed():
    r = Reading(timesteps=(10.0, 20.0), seeds=(0, 1))
    assert r.runs == [(10.0, 0), (10.0, 1), (20.0, 0), (20.0, 1)]
    with pytest.raises(LavaError, match="at least one"):
        Reading(seeds=())


def test_every_cli_flag_of_an_option_comes_from_its_declaration():
    from lava.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    segment = sub.choices["segment"]
    flags = {s: a for a in segment._actions for s in a.option_strings}
    for o in OPTIONS.values():
        if o.flag is None:
            continue
        action = flags[o.flag]
        assert action.dest == o.name and action.help == o.help
        assert action.choices == o.choices


def test_segment_documents_every_option():
    for name in OPTIONS:
        assert f"{name}:" in lava.segment.__doc__


def test_a_recipe_is_a_value():
    r = Recipe()
    assert r == Recipe() and hash(r) == hash(Recipe())

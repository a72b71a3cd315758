"""The unseen-words protocol of scripts/measure.py: names no training caption held count as no class."""

from __future__ import annotations

import torch

from lava.reference.scenes import class_names, heldout_seeds, make_scene
from scripts.measure import SETTINGS, UNSEEN_WORDS, measure_many
from scripts.sweep import to_global


def test_unseen_words_are_not_scene_words_and_map_to_no_class():
    from lava.reference.scenes import scene_words

    assert len(UNSEEN_WORDS) == 28 and not set(UNSEEN_WORDS) & set(scene_words())
    classes = ["red circle", "cat", "blue square"]
    labels = torch.tensor([[0, 1, 2]])
    got = to_global(labels, classes, "colour_shape")
    names = class_names()
    assert got.tolist() == [[names.index("red circle"), 0, names.index("blue square")]]


def test_unseen_protocol_runs_on_a_scene(shapes):
    seeds = heldout_seeds(1, "hard")
    [m] = measure_many(shapes, [SETTINGS["defaults"]], "hard", "unseen", seeds)
    assert 0.0 <= m.miou <= 1.0
    assert make_scene(seeds[0]).objects

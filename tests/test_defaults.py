"""A backend's mask defaults are applied by every entry point unless told otherwise."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

import lava
from lava.cli import main
from lava.reference.export import export
from lava.reference.scenes import class_names, heldout_seeds, make_scene


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    return export(tmp_path_factory.mktemp("shapes") / "hard", count=3, split="hard")


def _explicit(backend) -> dict:
    d = backend.defaults
    return dict(
        normalize=d.normalize,
        background_threshold=d.background_threshold or 0,
        min_presence=d.min_presence or 0,
        presence=d.presence,
        max_classes_per_prompt=d.max_classes_per_prompt or 0,
    )


def test_segment_uses_the_backend_defaults(tiny, image):
    custom = dataclasses.replace(
        tiny,
        defaults=dataclasses.replace(
            tiny.defaults, normalize="global", background_threshold=0.3, min_presence=0.5
        ),
    )
    plain = lava.segment(image, ["cat", "dog", "bus"], backend=custom)
    spelled = lava.segment(
        image,
        ["cat", "dog", "bus"],
        backend=tiny,
        normalize="global",
        background_threshold=0.3,
        min_presence=0.5,
    )
    assert plain.classes == spelled.classes == ("background", "cat", "dog", "bus")
    assert torch.equal(plain.labels[0], spelled.labels[0])
    # A keyword overrides the default; 0 switches background off.
    off = lava.segment(image, ["cat", "dog", "bus"], backend=custom, background_threshold=0)
    assert off.classes == ("cat", "dog", "bus")


def test_reference_model_defaults_are_measured(shapes):
    d = shapes.defaults
    assert "measure" in d.mask_source or "sweep" in d.mask_source
    plain = lava.segment(
        make_scene(heldout_seeds(1, "hard")[0]).render(64), list(class_names()[1:]), backend=shapes
    )
    spelled = lava.segment(
        make_scene(heldout_seeds(1, "hard")[0]).render(64),
        list(class_names()[1:]),
        backend=shapes,
        **_explicit(shapes),
    )
    assert torch.equal(plain.labels[0], spelled.labels[0])


def test_cli_segment_uses_the_model_defaults(shapes, tmp_path):
    scene = make_scene(heldout_seeds(2, "hard")[1])
    path = tmp_path / "scene.png"
    Image.fromarray(scene.render(64)).save(path)
    classes = list(class_names()[1:])
    assert main(["segment", str(path), "--classes", ",".join(classes), "--out", str(tmp_path / "out")]) == 0
    got = np.asarray(Image.open(tmp_path / "out" / "scene_labels.png"))
    want = lava.segment(path, classes, backend=shapes)
    assert np.array_equal(got, want.labels[0].numpy())
    listed = (tmp_path / "out" / "scene_classes.txt").read_text().split("\n")
    assert listed[0] == ("background" if shapes.defaults.background_threshold is not None else classes[0])


def test_cli_eval_with_no_flags_uses_the_model_defaults(shapes, export_dir, tmp_path):
    plain, spelled = tmp_path / "plain", tmp_path / "spelled"
    assert main(["eval", "--dataset", "folder", "--root", str(export_dir), "--out", str(plain)]) == 0
    d = shapes.defaults
    flags = ["--normalize", d.normalize, "--min-presence", str(d.min_presence or 0), "--presence", d.presence]
    flags += ["--max-classes-per-prompt", str(d.max_classes_per_prompt or 0)]
    if d.background_threshold is not None:
        flags += ["--background", "threshold", "--background-threshold", str(d.background_threshold)]
    args = ["eval", "--dataset", "folder", "--root", str(export_dir), "--out", str(spelled), *flags]
    assert main(args) == 0
    a = json.loads((plain / "report.json").read_text())
    b = json.loads((spelled / "report.json").read_text())
    assert a["protocol"] == "all"  # the open-vocabulary protocol is the default
    assert a["config"]["normalize"] == d.normalize
    assert a["config"]["background_threshold"] == d.background_threshold
    assert a["config"]["presence"] == d.presence
    assert a["miou"] == pytest.approx(b["miou"], abs=1e-9)


def test_cli_sweep_uses_the_model_defaults(shapes, export_dir, tmp_path):
    out = tmp_path / "sweep"
    args = ["sweep", "--dataset", "folder", "--root", str(export_dir), "--timesteps", "200", "--layers", "1"]
    assert main([*args, "--out", str(out)]) == 0
    config = json.loads((out / "sweep.json").read_text())["config"]
    assert config["normalize"] == shapes.defaults.normalize
    assert config["background_threshold"] == shapes.defaults.background_threshold
    assert config["presence"] == shapes.defaults.presence


def test_models_lists_mask_defaults_and_their_source(shapes, capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert shapes.defaults.describe_mask() in out
    assert shapes.defaults.mask_source in out


def test_presence_rule_is_the_models_and_either_rule_is_a_keyword(shapes):
    # lava-shapes v2 measured the map-peak rule best (docs/open-vocabulary.md); "null" (against the
    # filler tokens, the first model's default) stays a keyword.
    assert shapes.defaults.presence == "peak"
    image = make_scene(heldout_seeds(3, "hard")[2]).render(64)
    classes = list(class_names()[1:])
    plain = lava.segment(image, classes, backend=shapes)
    peak = lava.segment(image, classes, backend=shapes, presence="peak")
    null = lava.segment(image, classes, backend=shapes, presence="null")
    assert torch.equal(plain.labels[0], peak.labels[0])
    assert lava.load_backend("tiny-sd3").defaults.presence == "peak"
    with pytest.raises(lava.LavaError, match="presence must be one of"):
        lava.segment(image, classes, backend=shapes, presence="bogus")
    assert null.labels[0].shape == plain.labels[0].shape


def test_prompt_layout_is_the_models_unless_given(tiny, image):
    from lava.config import recipe

    classes = ["cat", "dog", "bus"]
    custom = dataclasses.replace(tiny, defaults=dataclasses.replace(tiny.defaults, max_classes_per_prompt=1))
    assert recipe(tiny, classes=classes).prompt.max_classes_per_prompt is None
    assert recipe(custom, classes=classes).prompt.max_classes_per_prompt == 1
    assert recipe(custom, classes=classes, max_classes_per_prompt=2).prompt.max_classes_per_prompt == 2
    # 0: as many names per prompt as fit, whatever the model's default.
    assert recipe(custom, classes=classes, max_classes_per_prompt=0).prompt.max_classes_per_prompt == 0
    # The prompt stage reads the same layout when given none (as every stage takes the model's).
    assert lava.encode_prompt(custom, classes).num_prompts == 3
    assert lava.encode_prompt(custom, classes, max_classes_per_prompt=0).num_prompts == 1
    plain = lava.segment(image, classes, backend=custom)
    spelled = lava.segment(image, classes, backend=tiny, max_classes_per_prompt=1)
    assert torch.equal(plain.labels[0], spelled.labels[0])
    one = lava.segment(image, classes, backend=custom, max_classes_per_prompt=0)
    assert torch.equal(one.labels[0], lava.segment(image, classes, backend=tiny).labels[0])


def test_reference_model_reads_one_class_per_prompt(shapes):
    # lava-shapes' plain call gives every class a prompt of its own (#20, docs/open-vocabulary.md):
    # in a shared prompt its causal text encoder mixes each name with the names before it.
    assert shapes.defaults.max_classes_per_prompt == 1
    image = make_scene(heldout_seeds(3, "hard")[2]).render(64)
    classes = list(class_names()[1:])
    plain = lava.segment(image, classes, backend=shapes)
    split = lava.segment(image, classes, backend=shapes, max_classes_per_prompt=1)
    shared = lava.segment(image, classes, backend=shapes, max_classes_per_prompt=0)
    assert torch.equal(plain.labels[0], split.labels[0])
    assert not torch.equal(plain.labels[0], shared.labels[0])

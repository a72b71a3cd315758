"""`--preset seg4diff`: Seg4Diff's published SD3 setting in one flag, on tiny-sd3 (where some of its
values have to be overridden: a toy model has 4 blocks and a 128 px position embedding)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import scene
from eval_fixtures import recompute_miou, shapes_folder

import lava
from lava.cli import main
from lava.cli.preset import explicit_options
from lava.options import OPTIONS
from lava.presets import EVAL_OPTIONS, LOAD_OPTIONS, PRESETS, SEG4DIFF, Preset, seg4diff_timestep
from lava.stages.noise import input_size

TOY = ("--model", "tiny-sd3", "--resolution", "32x32", "--dtype", "float32", "--layers", "1")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return shapes_folder(tmp_path_factory.mktemp("shapes"))


def test_seg4diff_timestep_is_timesteps_minus_8_of_28_with_shift_3(tiny):
    from lava.backends.sd3 import SEG4DIFF_T

    t = seg4diff_timestep()
    assert t == pytest.approx(SEG4DIFF_T, abs=0.01)
    # tiny-sd3 carries SD3-medium's scheduler (shift 3): the backend's own schedule agrees.
    assert tiny.timestep_for_step(-8, 28) == t
    assert tiny.sigma_for_timestep(t) == pytest.approx(0.515, abs=1e-3)


def test_seg4diff_preset_values_and_sources():
    o = SEG4DIFF.options
    assert PRESETS["seg4diff"] is SEG4DIFF and SEG4DIFF.model == "sd3-medium" and SEG4DIFF.method == "lava"
    assert o["drop_t5"] is True and o["max_sequence_length"] == 77 and o["dtype"] == "float16"
    assert o["resolution"] == "1024x1024" and o["layers"] == [9]
    assert (o["direction"], o["softmax"], o["normalize"], o["tokens"]) == (
        "image_to_text",
        "joint",
        "none",
        "clip",
    )
    assert (o["protocol"], o["background"]) == ("present", "none")
    for key in o:
        if key not in ("source", "min_presence", "background_threshold"):
            assert "cvlab-kaist/Seg4Diff" in SEG4DIFF.sources[key], key


def test_every_preset_key_has_a_place():
    # Each value goes to lava.segment (a lava.options name), lava.load_backend or EvalSettings; a
    # sweep's grid names options too. The three dicts split the options between them.
    for preset in PRESETS.values():
        for key in preset.options:
            assert key in OPTIONS or key in LOAD_OPTIONS or key in EVAL_OPTIONS, (preset.name, key)
        for key in preset.grid:
            assert key in OPTIONS, (preset.name, key)
        split = {**preset.segment_options(), **preset.load_options(), **preset.eval_options()}
        assert sorted(split) == sorted(preset.options)
    with pytest.raises(ValueError, match="unknown option"):
        Preset("x", "p", "lava", "tiny-sd3", {"timestpe": 5}, {})


def test_preset_options_from_python():
    assert SEG4DIFF.load_options() == {"drop_t5": True, "max_sequence_length": 77, "dtype": "float16"}
    assert SEG4DIFF.eval_options() == {"protocol": "present", "background": "none"}
    opts = SEG4DIFF.segment_options()
    assert opts["timestep"] == seg4diff_timestep()  # the resolver is called
    assert not any(callable(v) for v in opts.values())
    opts["layers"].append(10)  # each call hands out its own values
    assert SEG4DIFF.segment_options()["layers"] == [9] and SEG4DIFF.options["layers"] == [9]


def test_seg4diff_from_python_equals_its_options_spelled_out():
    # sd3-medium cannot be downloaded here: tiny-sd3 stands in, with the two values a toy model
    # cannot take (4 blocks, a 128 px position embedding) and float32 on the CPU overridden.
    backend = lava.load_backend("tiny-sd3", **{**SEG4DIFF.load_options(), "dtype": "float32"})
    assert not backend.has_t5 and backend.text_len == 77 + 77  # T5 dropped: 154 text tokens
    toy = {"layers": [1], "resolution": "32x32"}
    image, classes = scene(40, 56, seed=2), ["cat", "dog", "sofa"]
    a = lava.segment(image, classes, backend=backend, **{**SEG4DIFF.segment_options(), **toy})
    b = lava.segment(
        image,
        classes,
        backend=backend,
        resolution="32x32",
        layers=[1],
        timestep=seg4diff_timestep(),
        direction="image_to_text",
        softmax="joint",
        source="attention",
        tokens="clip",
        normalize="none",
        min_presence=0,
        background_threshold=0,
    )
    assert a.classes == b.classes == tuple(classes)  # no background label: the threshold is off
    assert torch.equal(a.labels[0], b.labels[0]) and torch.equal(a.scores[0], b.scores[0])
    r = SEG4DIFF.recipe(backend, **toy)
    assert r.reading.timesteps == (seg4diff_timestep(),) and r.reading.layers == (1,)
    assert (r.aggregate.tokens, r.aggregate.normalize) == ("clip", "none")
    assert r.mask.background_threshold is None and r.mask.min_presence is None
    c = lava.segment(image, classes, backend=backend, recipe=r)
    assert torch.equal(a.scores[0], c.scores[0])
    from lava.evaluation.runner import EvalSettings

    settings = EvalSettings(**SEG4DIFF.eval_options(), method=SEG4DIFF.method, recipe=r)
    assert (settings.protocol, settings.background, settings.recipe) == ("present", "none", r)


def test_eval_with_the_preset_records_every_resolved_setting(folder, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["eval", "--dataset", "folder", "--root", str(folder), "--out", str(out), "--preset", "seg4diff"]
    assert main([*args, *TOY, "--save-predictions"]) == 0
    config = json.loads((out / "journal.rank0.jsonl").read_text().splitlines()[0])["config"]
    assert config["preset"] == "seg4diff"
    assert config["text_tokens"] == 77 + 77 and config["text_encoders"] == "CLIP"  # T5 dropped, 154 tokens
    assert config["timestep"] == pytest.approx(515.072, abs=1e-3)
    assert (config["protocol"], config["background"], config["normalize"], config["tokens"]) == (
        "present",
        "none",
        "none",
        "clip",
    )
    assert config["min_presence"] is None and config["input_resolution"] == "32x32"
    report = json.loads((out / "report.json").read_text())
    assert report["miou"] == pytest.approx(recompute_miou(folder, out), abs=1e-6)
    err = capsys.readouterr().err
    assert "kept the options given (--dtype float32, --resolution 32x32, --layers [1])" in err
    assert "does not reproduce Seg4Diff" in err


def test_options_given_win_over_the_preset_even_abbreviated(folder, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["eval", "--dataset", "folder", "--root", str(folder), "--out", str(out), "--preset", "seg4diff"]
    assert main([*args, *TOY, "--proto", "all", "--limit", "1"]) == 0
    config = json.loads((out / "journal.rank0.jsonl").read_text().splitlines()[0])["config"]
    assert config["protocol"] == "all"  # typed (abbreviated), so kept although it is the parser default
    assert "--protocol all" in capsys.readouterr().err


def test_explicit_options_sees_typed_options_only():
    given = explicit_options(["eval", "--dataset", "voc", "--root", "x", "--proto", "all", "--drop-t5"])
    assert {"dataset", "root", "protocol", "drop_t5"} <= given
    assert "normalize" not in given and "background" not in given


def test_preset_of_another_method_is_refused(folder, tmp_path, capsys):
    args = ["eval", "--dataset", "folder", "--root", str(folder), "--out", str(tmp_path / "o")]
    assert main([*args, "--preset", "seg4diff", "--method", "maskclip", "--model", "tiny-clip"]) == 1
    assert "--preset seg4diff is a setting of --method lava, not --method maskclip" in capsys.readouterr().err


def test_sweep_with_the_preset_keeps_its_own_grid(folder, tmp_path):
    out = tmp_path / "sweep"
    args = ["sweep", "--dataset", "folder", "--root", str(folder), "--out", str(out), "--preset", "seg4diff"]
    toy = ("--model", "tiny-sd3", "--resolution", "32x32", "--dtype", "float32")
    assert main([*args, *toy, "--timesteps", "300", "--layers", "0,2", "--limit", "1"]) == 0
    summary = json.loads((out / "sweep.json").read_text())
    assert [c["layers"] for c in summary["cells"]] == [[0], [2]] and summary["protocol"] == "present"


def test_stretched_resolution_ignores_the_aspect_ratio(tiny):
    assert input_size(tiny, (16, 24), "32x32") == (32, 32)
    assert input_size(tiny, (16, 24), "64x32") == (32, 64)  # W x H
    assert input_size(tiny, (16, 24), 32) == (20, 32)  # a number keeps the aspect ratio
    from lava.cli.args import resolution

    assert resolution("1024X768") == "1024x768" and resolution("native") is None


def test_coco_object80_scores_the_things_only(tmp_path):
    import numpy as np
    from eval_fixtures import make_coco_object

    from lava.evaluation import dataset_info, load_dataset

    info = dataset_info("coco_object80")
    assert info.num_classes == 80 and info.background is None and info.classes[0] == "person"
    assert info.classes == dataset_info("coco_object").classes[1:]
    fake = make_coco_object(tmp_path, n=1)
    _, label = load_dataset("coco_object80", fake.root)[0].load()
    raw = fake.raw_labels[fake.ids[0]]
    np.testing.assert_array_equal(label, np.where(raw == 0, 255, raw.astype(np.int64) - 1))

"""Every method (lava, maskclip, stableseg) through `lava eval`, `lava sweep` and `lava segment`
on tiny offline models: same data loading, protocol, mask stage, metrics, journal and reports.

The numbers come from random weights and mean nothing; what is checked is that each report's
mIoU is exactly what its saved predictions give when counted again here with numpy."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from eval_fixtures import one_and_two_processes, recompute_miou, shapes_folder
from PIL import Image

from lava.cli import main

MODELS = {"lava": "tiny-sd3", "maskclip": "tiny-clip", "stableseg": "tiny-sd15"}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return shapes_folder(tmp_path_factory.mktemp("shapes"))


def _eval(folder: Path, out: Path, method: str, *extra: str) -> int:
    args = ["eval", "--dataset", "folder", "--root", str(folder), "--out", str(out)]
    return main([*args, "--method", method, "--model", MODELS[method], *extra])


@pytest.mark.parametrize("method", ["lava", "maskclip", "stableseg"])
@pytest.mark.parametrize("protocol", ["present", "all"])
def test_every_method_report_equals_recount_of_its_predictions(folder, tmp_path, method, protocol, capsys):
    out = tmp_path / "run"
    assert _eval(folder, out, method, "--protocol", protocol, "--save-predictions", "--visualize", "1") == 0
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == method and report["num_images"] == 3
    assert report["config"]["method"] == method and report["config"]["model"] == MODELS[method]
    assert report["miou"] == pytest.approx(recompute_miou(folder, out), abs=1e-6)
    assert len(list((out / "vis").glob("*.png"))) == 1
    shown = capsys.readouterr().out
    assert f"protocol={protocol}" in shown
    if method != "lava":
        assert f"method {method}" in report["protocol_description"]


def test_method_background_threshold_mode_runs_through_the_same_mask_stage(folder, tmp_path):
    out = tmp_path / "run"
    extra = ("--background", "threshold", "--background-threshold", "0.5", "--normalize", "minmax")
    assert _eval(folder, out, "stableseg", *extra, "--save-predictions") == 0
    report = json.loads((out / "report.json").read_text())
    assert "background=threshold" in report["protocol_description"]
    assert report["miou"] == pytest.approx(recompute_miou(folder, out), abs=1e-6)


def test_resume_refuses_another_method_and_names_it(folder, tmp_path, capsys):
    out = tmp_path / "run"
    assert _eval(folder, out, "maskclip", "--limit", "1") == 0
    capsys.readouterr()
    assert _eval(folder, out, "stableseg") == 1
    err = capsys.readouterr().err
    assert 'method: "maskclip" -> "stableseg"' in err
    # And a rerun with the same method resumes.
    assert _eval(folder, out, "maskclip") == 0
    assert "(1 resumed)" in capsys.readouterr().out


def test_stableseg_sweep_cells_equal_single_evals(folder, tmp_path):
    out = tmp_path / "sweep"
    args = ["sweep", "--dataset", "folder", "--root", str(folder), "--out", str(out)]
    grid = ["--timesteps", "100,400", "--layers", "0,3", "--with-mean"]
    assert main([*args, "--method", "stableseg", "--model", "tiny-sd15", *grid]) == 0
    summary = json.loads((out / "sweep.json").read_text())
    assert summary["method"] == "stableseg" and len(summary["cells"]) == 2 * 3
    cells = {(c["timestep"], tuple(c["layers"])): c["miou"] for c in summary["cells"]}
    single = tmp_path / "single"
    assert _eval(folder, single, "stableseg", "--timestep", "400", "--layers", "0,3") == 0
    got = json.loads((single / "report.json").read_text())["miou"]
    assert got == pytest.approx(cells[(400.0, (0, 3))], abs=1e-6)
    assert "**stableseg**" in (out / "sweep.md").read_text()


@pytest.mark.parametrize(
    ("method", "extra", "named"),
    [
        ("maskclip", ("--direction", "text_to_image"), "--direction"),
        ("stableseg", ("--source", "concept"), "--source"),
        ("maskclip", ("--drop-t5",), "--drop-t5"),
    ],
)
def test_lava_only_options_are_refused_for_other_methods(folder, tmp_path, capsys, method, extra, named):
    assert _eval(folder, tmp_path / "run", method, *extra) == 1
    err = capsys.readouterr().err
    assert named in err and "only apply to --method lava" in err
    assert not (tmp_path / "run").exists()  # refused before any model loads


def test_maskclip_refuses_a_timestep(folder, tmp_path, capsys):
    assert _eval(folder, tmp_path / "run", "maskclip", "--timestep", "500") == 1
    assert "maskclip reads no diffusion timestep" in capsys.readouterr().err


def test_model_of_another_method_is_named(folder, tmp_path, capsys):
    args = ["eval", "--dataset", "folder", "--root", str(folder), "--out", str(tmp_path / "o")]
    assert main([*args, "--model", "tiny-clip"]) == 1
    assert "tiny-clip is a model for --method maskclip" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["maskclip", "stableseg"])
def test_segment_command_with_a_method(folder, tmp_path, method, capsys):
    out = tmp_path / "seg"
    images = [str(folder / "images" / "s0.png"), str(folder / "images" / "s1.png")]
    args = ["segment", *images, "--classes", "red square,blue circle", "--out", str(out), "--save-scores"]
    assert main([*args, "--method", method, "--model", MODELS[method]]) == 0
    for stem, size in (("s0", (24, 32)), ("s1", (20, 20))):
        labels = np.asarray(Image.open(out / f"{stem}_labels.png"))
        assert labels.shape == size
        scores = np.load(out / f"{stem}_scores.npz")["scores"]
        assert scores.shape == (2, *size)
        np.testing.assert_array_equal(labels, scores.argmax(0))  # no threshold: the best class
    err = capsys.readouterr().err
    assert f"({method})" in err and "RANDOM weights" in err


def test_python_api_takes_a_segmenter(folder):
    import lava
    from lava.methods import load_segmenter

    seg = load_segmenter("stableseg", "tiny-sd15")
    result = lava.segment(str(folder / "images" / "s0.png"), ["red square", "blue circle"], backend=seg)
    assert result.labels[0].shape == (24, 32) and result.classes == ("red square", "blue circle")
    with pytest.raises(lava.LavaError, match="direction"):
        lava.segment(str(folder / "images" / "s0.png"), ["a", "b"], backend=seg, direction="text_to_image")


@pytest.mark.slow
def test_two_process_gloo_equals_one_process_for_maskclip(folder, tmp_path):
    args = ["-m", "lava.cli", "eval", "--dataset", "folder", "--root", str(folder)]
    args += ["--method", "maskclip", "--model", "tiny-clip"]
    one, two = tmp_path / "one", tmp_path / "two"
    one_and_two_processes(args, one, two)
    a = json.loads((one / "report.json").read_text())
    b = json.loads((two / "report.json").read_text())
    assert a["num_images"] == b["num_images"] == 3 and a["miou"] == b["miou"]
    assert len(list(two.glob("journal.rank*.jsonl"))) == 2


def test_method_lists_agree():
    from lava.cli import args
    from lava.evaluation import runner
    from lava.methods import DEFAULT_MODELS, METHODS

    assert args.METHODS == runner.METHODS == METHODS
    assert args.METHOD_MODELS == DEFAULT_MODELS


def test_documented_comparison_commands_parse():
    """Every `lava eval`/`lava sweep` line of docs/evaluation.md's "Comparing methods" section is a
    valid command line (parsed, not run: they name real weights and datasets)."""
    import re
    import shlex

    from lava.cli import build_parser

    text = (Path(__file__).parent.parent / "docs" / "evaluation.md").read_text()
    section = text.split("## Comparing methods", 1)[1].split("\n## ", 1)[0]
    block = section.replace("\\\n", " ")
    lines = [m.group(1) for m in re.finditer(r"^\s*lava ((?:eval|sweep) .*)$", block, re.M)]
    assert len(lines) >= 8
    parser = build_parser()
    for line in lines:
        words = shlex.split(line.replace("$D", "/data").replace("$ds", "voc20"))
        args = parser.parse_args(words)
        assert args.command in ("eval", "sweep")


def test_models_lists_the_comparison_methods_and_presets(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "clip-vit-b16         --method maskclip: openai/clip-vit-base-patch16" in out
    assert "sd1.5                --method stableseg: stable-diffusion-v1-5/stable-diffusion-v1-5" in out
    assert "timestep 100 is unmeasured" in out and "seg4diff" in out


def test_methods_refuse_propagation_and_average_ensembles(tmp_path):
    """A comparison method keeps no MM-DiT attention to propagate with (refused by name instead of
    ignored); its ensembles run through the same composition as lava's (one run per seed, maps
    averaged), in lava.segment as in lava eval."""
    import lava
    from lava.config import recipe
    from lava.errors import LavaError
    from lava.methods import load_segmenter

    image = Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8))
    maskclip = load_segmenter("maskclip", "tiny-clip")
    with pytest.raises(LavaError, match="propagate"):
        lava.segment(image, ["cat", "dog"], backend=maskclip, refine="propagate")
    with pytest.raises(LavaError, match="propagate"):
        recipe(maskclip, refine="propagate,pamr")
    with pytest.raises(LavaError, match="softmax"):
        recipe(maskclip, softmax="cross")
    # MaskCLIP draws no noise: every seed's maps are the same, so is their mean
    one = lava.segment(image, ["cat", "dog"], backend=maskclip, seed=0)
    two = lava.segment(image, ["cat", "dog"], backend=maskclip, seeds=[0, 1])
    torch.testing.assert_close(one.scores[0], two.scores[0])

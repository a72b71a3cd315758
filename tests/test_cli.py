"""The ``lava`` command end to end on generated images."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import scene
from PIL import Image

from lava.cli import main


@pytest.fixture
def img_path(tmp_path):
    path = tmp_path / "in" / "room.png"
    path.parent.mkdir()
    scene().convert("RGBA").save(path)
    return path


def test_segment_writes_all_outputs(img_path, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(
        [
            "segment",
            str(img_path),
            "--classes",
            "cat,potted plant",
            "--model",
            "tiny-sd3",
            "--out",
            str(out),
            "--save-scores",
            "--heatmaps",
            "--layers",
            "1,2",
            "--timestep",
            "400",
        ]
    )
    assert rc == 0
    err = capsys.readouterr().err
    assert "RANDOM weights" in err and "meaningless" in err  # tiny-sd3 says so
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "room_classes.txt",
        "room_heatmaps.png",
        "room_labels.png",
        "room_overlay.png",
        "room_scores.npz",
    ]
    labels = Image.open(out / "room_labels.png")
    assert labels.mode == "P" and labels.size == (56, 40)
    assert set(np.unique(np.asarray(labels))) <= {0, 1}
    assert Image.open(out / "room_overlay.png").size == (56, 40)
    data = np.load(out / "room_scores.npz")
    assert data["scores"].shape == (2, 40, 56)
    assert list(data["classes"]) == ["cat", "potted plant"]
    assert (out / "room_classes.txt").read_text().split("\n")[:2] == ["cat", "potted plant"]


def test_more_than_256_labels_are_a_16_bit_png_that_the_folder_reader_reads(img_path, tiny, tmp_path):
    import json

    import lava
    from lava.evaluation import load_dataset

    names = [f"thing {i}" for i in range(300)]
    out = tmp_path / "out"
    args = ["segment", str(img_path), "--classes", ",".join(names), "--model", "tiny-sd3", "--out", str(out)]
    assert main(args) == 0
    with Image.open(out / "room_labels.png") as im:
        assert im.mode == "I;16" and im.size == (56, 40)
        got = np.asarray(im)
    want = lava.segment(img_path, names, backend=tiny)  # the same computation as the command's
    assert want.classes == tuple(names) and np.array_equal(got, want.labels[0].numpy())
    assert (out / "room_classes.txt").read_text().splitlines() == names
    # A folder dataset of these 300 classes reads the file back as the same ids (65535 = ignore)
    root = tmp_path / "ds"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    (root / "classes.txt").write_text("\n".join(names) + "\n")
    Image.open(img_path).convert("RGB").save(root / "images" / "room.png")
    truth = got.copy()
    truth[0] = 65535
    Image.fromarray(truth).save(root / "labels" / "room.png")
    data = load_dataset("folder", root)
    assert data.info.ignore_index == 65535
    _, label = data[0].load()
    assert np.array_equal(label, truth)
    # lava eval --save-predictions writes 16-bit predictions in dataset ids, read back alike
    run = tmp_path / "run"
    args = ["eval", "--dataset", "folder", "--root", str(root), "--model", "tiny-sd3", "--out", str(run)]
    assert main([*args, "--save-predictions"]) == 0
    with Image.open(run / "predictions" / "room.png") as im:
        assert im.mode == "I;16"
        predicted = np.asarray(im)
    assert predicted.shape == truth.shape and predicted.max() < 300
    assert json.loads((run / "report.json").read_text())["num_images"] == 1


def test_more_labels_than_a_16_bit_png_holds_are_refused_before_the_model_loads(img_path, tmp_path, capsys):
    names = ",".join(f"c{i}" for i in range(65536))
    # an unknown model would fail first if it were loaded before the check
    out = tmp_path / "o"
    args = ["segment", str(img_path), "--classes", names, "--model", "nope-model", "--out", str(out)]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "65537 labels" in err and "at most 65536 label ids" in err
    assert not out.exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["segment", "{missing}", "--classes", "cat"], "image file not found"),
        (["segment", "{text}", "--classes", "cat"], "cannot read"),
        (["segment", "{img}", "--classes", ""], "blank"),
        (["segment", "{img}", "--classes", "cat,cat"], "duplicate class name"),
        (["segment", "{img}", "--classes", "cat", "--model", "nope-model"], "unknown model 'nope-model'"),
        (["segment", "{img}", "--classes", "cat", "--layers", "17"], "out of range"),
        (["segment", "{img}", "--classes", "cat", "--timestep", "1000"], "timestep must be in"),
        (["segment", "{img}", "--classes", "cat", "--resolution", "4096"], "position embedding"),
        (["segment", "{img}", "{img2}", "--classes", "cat"], "would write the same output"),
    ],
)
def test_errors_exit_nonzero_with_one_line_and_write_nothing(args, message, img_path, tmp_path, capsys):
    text = tmp_path / "notes.png"
    text.write_text("hello")
    other = tmp_path / "other"
    other.mkdir()
    img2 = other / img_path.name
    scene().save(img2)
    subst = {
        "{missing}": str(tmp_path / "missing.png"),
        "{text}": str(text),
        "{img}": str(img_path),
        "{img2}": str(img2),
    }
    out = tmp_path / "out"
    rc = main([subst.get(a, a) for a in args] + ["--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0
    assert err[-1].startswith("lava: error:") and message in err[-1]
    assert not out.exists() or not any(out.iterdir())


def test_failure_mid_write_leaves_no_partial_set(img_path, tmp_path, monkeypatch):
    from lava.types import Segmentation

    def broken_overlay(self, *a, **kw):
        raise OSError("disk full")

    # The label map is written first; the overlay fails: the set must vanish whole.
    monkeypatch.setattr(Segmentation, "overlay", broken_overlay)
    out = tmp_path / "out"
    rc = main(["segment", str(img_path), "--classes", "cat", "--out", str(out)])
    assert rc == 1
    assert list(out.iterdir()) == []


def test_models_lists_backends(capsys):
    assert main(["models"]) == 0
    text = capsys.readouterr().out
    assert "tiny-sd3" in text and "stabilityai/stable-diffusion-3-medium-diffusers" in text
    assert "Seg4Diff" in text


def test_console_script_help():
    res = subprocess.run(
        [sys.executable, "-m", "lava.cli", "segment", "--help"], capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0
    assert "--classes" in res.stdout and "examples:" in res.stdout
    res = subprocess.run(
        [sys.executable, "-m", "lava.cli", "segment"], capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 2 and "--classes" in res.stderr


def test_default_model_is_the_shipped_reference(tmp_path, capsys):
    example = Path(__file__).parents[1] / "lava" / "assets" / "examples" / "scene_0.png"
    out = tmp_path / "out"
    assert main(["segment", str(example), "--classes", "red circle,background", "--out", str(out)]) == 0
    assert "using lava-shapes" in capsys.readouterr().err
    assert (out / "scene_0_labels.png").exists()


# ---- start-up: --version, --help without heavy imports -----------------------------------------


def test_version(capsys):
    import lava

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"lava {lava.__version__}"


def test_building_the_parser_imports_nothing_heavy():
    code = (
        "import sys, lava.cli; lava.cli.build_parser(); "
        "print(sorted(m for m in ('torch', 'diffusers', 'transformers', 'matplotlib') if m in sys.modules))"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"


def test_every_command_has_its_module_and_verbose_flag():
    import importlib

    from lava.cli import COMMANDS, build_parser

    parser = build_parser()
    for name in COMMANDS:
        module = importlib.import_module(f"lava.cli.{name}")
        assert callable(module.add_parser) and callable(module.run)
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, command in sub.choices.items():
        assert any("--verbose" in a.option_strings for a in command._actions), name


def test_stage_functions_stay_functions_after_their_modules_load():
    # lava.noise / capture / aggregate / refine / propagate are functions even after their
    # modules (lava.stages.*) load first, in a fresh interpreter.
    code = (
        "import lava.stages.noise, lava.stages.capture, lava.stages.aggregate, lava.stages.refine, "
        "lava.stages.propagate; import lava; "
        "from lava.stages.capture import capture_views; from lava.stages.refine import pamr; "
        "print(all(callable(f) and not isinstance(f, type(lava)) "
        "for f in (lava.noise, lava.capture, lava.aggregate, lava.segment, lava.refine, lava.propagate)))"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.stdout.strip() == "True", res.stderr


# ---- quiet by default ----------------------------------------------------------------------------


def test_library_chatter_only_with_verbose(tmp_path):
    example = Path(__file__).parents[1] / "lava" / "assets" / "examples" / "scene_0.png"
    classes = ",".join(f"shape number {i}" for i in range(30))  # several prompts, long token lists
    base = [sys.executable, "-m", "lava.cli", "segment", str(example), "--classes", classes]
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "", "OMP_NUM_THREADS": "1"}
    res = subprocess.run([*base, "--out", str(tmp_path / "a")], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    noise = [line for line in res.stderr.splitlines() if not line.startswith("lava:")]
    assert noise == []
    res = subprocess.run([*base, "--out", str(tmp_path / "b"), "-v"], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    assert "prompt 1:" in res.stderr


def test_library_output_switches_levels_and_tokenizer_warnings():
    # What `lava` sets for the command it runs (`lava.cli.main`), --verbose or not.
    code = (
        "import sys\n"
        "from lava.backends.loading import set_library_output\n"
        "set_library_output(sys.argv[1] == 'v')\n"
        "from lava.backends.tiny import build_tokenizers\n"
        "build_tokenizers()[0]('word ' * 500)\n"
    )
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": ""}
    quiet = subprocess.run([sys.executable, "-c", code, "q"], capture_output=True, text=True, env=env)
    loud = subprocess.run([sys.executable, "-c", code, "v"], capture_output=True, text=True, env=env)
    assert quiet.returncode == loud.returncode == 0, quiet.stderr + loud.stderr
    assert "Token indices" not in quiet.stderr
    assert "Token indices" in loud.stderr


# ---- streaming many images -------------------------------------------------------------------------


def _images(tmp_path, n):
    paths = []
    for i in range(n):
        paths.append(tmp_path / "in" / f"img{i}.png")
        paths[-1].parent.mkdir(exist_ok=True)
        scene(seed=i).save(paths[-1])
    return paths


def test_each_image_is_written_before_the_next_is_segmented(tmp_path, monkeypatch, capsys):
    import lava.cli.segment as seg_cmd

    paths = _images(tmp_path, 3)
    out = tmp_path / "out"
    real = seg_cmd.write_set
    seen = []

    def checking(files, seg, classes):
        # When image i is written, images < i are complete on disk and none after it has started.
        i = len(seen)
        assert sorted(p.name for p in out.glob("*")) == sorted(
            f"img{j}_{k}" for j in range(i) for k in ("labels.png", "overlay.png", "classes.txt")
        )
        seen.append(i)
        real(files, seg, classes)

    monkeypatch.setattr(seg_cmd, "write_set", checking)
    args = ["segment", *map(str, paths), "--classes", "cat,dog", "--model", "tiny-sd3", "--out", str(out)]
    assert main(args) == 0
    assert seen == [0, 1, 2]


def test_interrupt_leaves_whole_sets_only(tmp_path, monkeypatch):
    import lava.cli.segment as seg_cmd

    paths = _images(tmp_path, 3)
    out = tmp_path / "out"
    real = seg_cmd.write_set
    calls = {"n": 0}

    def interrupted(files, seg, classes):
        calls["n"] += 1
        if calls["n"] == 2:
            from lava import io

            # Ctrl-C in the middle of writing the second set, after its label map is on disk (as a temp).
            with io.atomic_files(list(files.values())) as tmps:
                seg.label_image(0).save(tmps[0], format="PNG")
                raise KeyboardInterrupt
        real(files, seg, classes)

    monkeypatch.setattr(seg_cmd, "write_set", interrupted)
    args = ["segment", *map(str, paths), "--classes", "cat", "--model", "tiny-sd3", "--out", str(out)]
    args += ["--save-scores"]
    assert main(args) == 130
    assert sorted(p.name for p in out.iterdir()) == [
        "img0_classes.txt",
        "img0_labels.png",
        "img0_overlay.png",
        "img0_scores.npz",
    ]


def test_interrupt_during_the_renames_is_held_until_the_set_is_complete(tmp_path):
    import os as os_
    import signal

    from lava import io

    files = [tmp_path / f"f{i}.txt" for i in range(3)]
    real_replace = os_.replace
    moved = []

    def replace_and_signal(src, dst):
        real_replace(src, dst)
        moved.append(dst)
        if len(moved) == 1:
            signal.raise_signal(signal.SIGINT)  # arrives after the first rename of three

    # The held interrupt is delivered to the handler in force before, which must raise
    # KeyboardInterrupt: Python's default one. A suite started in the background (nohup, `&`)
    # inherits SIGINT ignored, and an ignored signal rightly stays ignored; so install it here.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt), pytest.MonkeyPatch.context() as mp:
            mp.setattr(io.os, "replace", replace_and_signal)
            with io.atomic_files(files) as tmps:
                for t in tmps:
                    t.write_text("x")
    finally:
        signal.signal(signal.SIGINT, previous)
    assert all(f.read_text() == "x" for f in files)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f0.txt", "f1.txt", "f2.txt"]


# ---- the output folder, checked before the model loads ---------------------------------------------


def test_out_is_a_file(img_path, tmp_path, capsys):
    out = tmp_path / "taken"
    out.write_text("not a folder")
    # An unknown model would fail first if the model were loaded before the output check.
    rc = main(["segment", str(img_path), "--classes", "cat", "--model", "nope-model", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 1
    assert (
        err == f"lava: error: --out {out} is a file, not a folder: pass a folder (it is created if missing)"
    )


def test_out_below_a_file(img_path, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" / "sub"
    assert (
        main(["segment", str(img_path), "--classes", "cat", "--model", "nope-model", "--out", str(out)]) == 1
    )
    err = capsys.readouterr().err
    assert "is a file, not a folder" in err and "Errno" not in err


def test_folder_in_the_way_of_an_output_file(img_path, tmp_path, capsys):
    out = tmp_path / "out"
    (out / "room_overlay.png").mkdir(parents=True)
    assert (
        main(["segment", str(img_path), "--classes", "cat", "--model", "nope-model", "--out", str(out)]) == 1
    )
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == f"lava: error: cannot write {out / 'room_overlay.png'}: a folder of that name is in the way"


def test_read_only_output_folder_in_plain_words(img_path, tmp_path, monkeypatch, capsys):
    import errno

    import lava.cli.output as output

    out = tmp_path / "out"
    out.mkdir()

    def read_only(*a, dir=None, **kw):
        raise OSError(errno.EROFS, "Read-only file system", str(Path(dir) / ".room_labels.png.x1y2.tmp.png"))

    monkeypatch.setattr(output.tempfile, "TemporaryFile", read_only)
    assert (
        main(["segment", str(img_path), "--classes", "cat", "--model", "nope-model", "--out", str(out)]) == 1
    )
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == f"lava: error: cannot write to the output folder {out}: the file system is read-only"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_unwritable_output_folder(img_path, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o555)
    try:
        assert main(["segment", str(img_path), "--classes", "cat", "--out", str(out)]) == 1
    finally:
        out.chmod(0o755)
    assert "permission denied" in capsys.readouterr().err


def test_write_errors_name_the_result_not_the_temporary(tmp_path):
    import errno

    from lava import io
    from lava.errors import OutputError

    target = tmp_path / "a_labels.png"
    with pytest.raises(OutputError) as caught, io.atomic_files([target]) as (tmp,):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp))
    assert str(caught.value) == f"cannot write {target}: no space left on the device"
    assert list(tmp_path.iterdir()) == []


# ---- odd values --------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["2", "-0.5", "nan", "abc"])
def test_background_threshold_outside_unit_interval_is_refused(img_path, value, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["segment", str(img_path), "--classes", "cat", "--background-threshold", value])
    assert exit_.value.code == 2
    assert "expected a number between 0 and 1" in capsys.readouterr().err


def test_background_class_with_threshold_is_refused(img_path, tmp_path, capsys):
    out = tmp_path / "out"
    # Refused before any model loads: the unknown model would be reported otherwise.
    args = ["segment", str(img_path), "--classes", "cat,background", "--model", "nope", "--out", str(out)]
    assert main([*args, "--background-threshold", "0.4"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "a class is named 'background' and a background threshold (0.4) is set" in err
    assert not out.exists() or not any(out.iterdir())


def test_help_documents_negative_layers_and_resolution_rounding(capsys):
    for command in ("segment", "eval", "sweep"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "negative numbers count from the last block (-1 = the last)" in text, command
        assert "rounded to the model's token grid" in text, command


def test_resolution_off_the_grid_is_said_once(img_path, tmp_path, capsys):
    args = ["segment", str(img_path), "--classes", "cat", "--model", "tiny-sd3", "--out", str(tmp_path / "o")]
    assert main([*args, "--resolution", "33"]) == 0
    err = capsys.readouterr().err
    assert err.count("--resolution 33 is not a multiple of tiny-sd3's token size") == 1
    assert main([*args, "--resolution", "32"]) == 0
    assert "not a multiple" not in capsys.readouterr().err


# ---- models that cannot be loaded --------------------------------------------------------------------


def test_uncached_model_offline_says_so(img_path, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "OMP_NUM_THREADS": "1"}
    args = ["segment", str(img_path), "--classes", "cat", "--model", "lava-tests/not-cached-anywhere"]
    res = subprocess.run(
        [sys.executable, "-m", "lava.cli", *args, "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert res.returncode == 1
    err = res.stderr.strip().splitlines()
    assert len(err) == 1, res.stderr
    assert err[0].startswith(
        "lava: error: lava-tests/not-cached-anywhere is not in the local Hugging Face cache"
    )
    assert "offline mode is on (HF_HUB_OFFLINE)" in err[0] and "save_pretrained" in err[0]
    assert "stacktrace" not in res.stderr


# ---- what segment runs, in one line ------------------------------------------------------------------


def _summary(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("lava: running ")]


def test_segment_says_what_it_runs_in_one_line(img_path, tmp_path, capsys):
    base = ["segment", str(img_path), "--classes", "cat,dog", "--model", "tiny-sd3"]
    assert main([*base, "--out", str(tmp_path / "a")]) == 0
    (line,) = _summary(capsys.readouterr().err)
    assert line == (
        "lava: running tiny-sd3 (variant tiny-sd3): timestep 500, blocks [1, 2], resolution 32 px (native), "
        "float32 on cpu, text encoders CLIP+T5"
    )
    args = ["--sigma", "0.25", "--layers", "-1", "--resolution", "64", "--drop-t5", "--max-memory", "1GiB"]
    assert main([*base, *args, "--out", str(tmp_path / "b")]) == 0
    err = capsys.readouterr().err
    (line,) = _summary(err)
    assert line.startswith(
        "lava: running tiny-sd3 (variant tiny-sd3): timestep 250 (sigma 0.25), blocks [3], resolution 64 px, "
        "float32 on cpu, text encoders CLIP; memory plan for 64x44 px within 1GiB: estimated peak "
    )
    assert "memory plan" not in err.replace(line, "")  # the plan is part of the line, not said twice


def test_segment_summary_waits_for_valid_settings(img_path, tmp_path, capsys):
    args = ["segment", str(img_path), "--classes", "cat", "--model", "tiny-sd3", "--timestep", "1000"]
    assert main([*args, "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert _summary(err) == [] and "timestep must be in" in err

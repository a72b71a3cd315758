"""The ``lava`` command end to end on generated images."""

from __future__ import annotations

import subprocess
import sys

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


def test_failure_mid_write_leaves_no_partial_file(img_path, tmp_path, monkeypatch):
    from lava import io

    def broken_save(image, path):
        def write(tmp):
            tmp.write_bytes(b"\x89PNG half")
            raise OSError("disk full")

        return io.atomic_write(path, write)

    monkeypatch.setattr(io, "save_png", broken_save)
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
    from pathlib import Path

    example = Path(__file__).parents[1] / "lava" / "assets" / "examples" / "scene_0.png"
    out = tmp_path / "out"
    assert main(["segment", str(example), "--classes", "red circle,background", "--out", str(out)]) == 0
    assert "using lava-shapes" in capsys.readouterr().err
    assert (out / "scene_0_labels.png").exists()

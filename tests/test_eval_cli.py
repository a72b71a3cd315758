"""`lava eval` and `lava sweep` end to end on tiny-sd3 over a generated VOC-layout dataset."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from eval_fixtures import make_voc, one_and_two_processes
from PIL import Image

import lava.evaluation.runner as runner
from lava import compose
from lava.cli import main
from lava.errors import LavaError


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    return make_voc(tmp_path_factory.mktemp("voc"), n=4)


def _eval(voc, out, *extra):
    args = ["eval", "--dataset", "voc", "--root", str(voc.root), "--model", "tiny-sd3", "--out", str(out)]
    return main([*args, *extra])


def _recompute_miou(voc, out: Path, num_classes: int = 21) -> float:
    """mIoU from the saved prediction PNGs, counted here with numpy (not lava's metrics)."""
    conf = np.zeros((num_classes, num_classes), dtype=np.int64)
    year = Path(voc.root) / "VOCdevkit" / "VOC2012"
    for pred_path in sorted((out / "predictions").glob("*.png")):
        pred = np.asarray(Image.open(pred_path)).astype(np.int64)
        gt = np.asarray(Image.open(year / "SegmentationClass" / pred_path.name)).astype(np.int64)
        keep = gt != 255
        np.add.at(conf, (gt[keep], pred[keep]), 1)
    tp = np.diag(conf)
    union = conf.sum(0) + conf.sum(1) - tp
    return float(np.mean(tp[union > 0] / union[union > 0]))


def test_eval_writes_report_and_predictions(voc, tmp_path, capsys):
    out = tmp_path / "run"
    assert _eval(voc, out, "--save-predictions", "--visualize", "2", "--protocol", "present") == 0
    report = json.loads((out / "report.json").read_text())
    for key in (
        "miou",
        "per_class_iou",
        "pixel_accuracy",
        "protocol",
        "dataset",
        "num_images",
        "config",
        "versions",
    ):
        assert key in report
    assert report["protocol"] == "present" and report["dataset"] == "voc21" and report["num_images"] == 4
    assert set(report["per_class_iou"]) >= {"background", "aeroplane", "tvmonitor"}
    absent = [c for c, v in report["per_class_iou"].items() if v is None]
    assert "chair" in absent  # no image holds class 9, nor can the present protocol predict it
    assert len(list((out / "predictions").glob("*.png"))) == 4
    assert len(list((out / "vis").glob("*.png"))) == 2
    assert (out / "per_class.csv").read_text().startswith("class,iou,accuracy")
    assert report["miou"] == pytest.approx(_recompute_miou(voc, out), abs=1e-6)
    assert "protocol=present" in capsys.readouterr().out


def test_resume_after_kill_gives_identical_totals(voc, tmp_path, monkeypatch):
    full = tmp_path / "full"
    assert _eval(voc, full) == 0

    resumed = tmp_path / "resumed"
    real_append = runner.Journal.append
    calls = {"n": 0}

    def dying_append(self, image_id, cells):
        if calls["n"] == 2:
            # A kill mid-write: half a line reaches the journal, then the process dies.
            with open(self.path, "a") as fh:
                fh.write('{"id": "' + image_id + '", "cells": {"t=')
            raise KeyboardInterrupt
        calls["n"] += 1
        real_append(self, image_id, cells)

    monkeypatch.setattr(runner.Journal, "append", dying_append)
    assert _eval(voc, resumed) == 130
    assert not (resumed / "report.json").exists()
    monkeypatch.setattr(runner.Journal, "append", real_append)
    assert _eval(voc, resumed) == 0

    a = json.loads((full / "report.json").read_text())
    b = json.loads((resumed / "report.json").read_text())
    assert b["num_images"] == a["num_images"] == 4
    assert a["per_class_iou"] == b["per_class_iou"] and a["miou"] == b["miou"]


def test_resume_refuses_other_settings_and_names_them(voc, tmp_path, capsys):
    out = tmp_path / "run"
    assert _eval(voc, out, "--limit", "1") == 0
    capsys.readouterr()
    assert _eval(voc, out, "--timestep", "123", "--seed", "7") == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert (
        "holds results for 1 image(s) made with other settings (seed: 0 -> 7; timestep: 500.0 -> 123.0)"
        in err
    )


@pytest.mark.parametrize(
    ("first", "then", "named"),
    [
        ((), ("--drop-t5",), 'text_encoders: "CLIP+T5" -> "CLIP"'),
        (("--dtype", "float32"), ("--dtype", "bfloat16"), 'dtype: "torch.float32" -> "torch.bfloat16"'),
        ((), ("--normalize", "global"), 'normalize: "minmax" -> "global"'),
    ],
)
def test_resume_refuses_other_prediction_settings(voc, tmp_path, capsys, first, then, named):
    out = tmp_path / "run"
    assert _eval(voc, out, "--limit", "1", *first) == 0
    capsys.readouterr()
    assert _eval(voc, out, *then) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"holds results for 1 image(s) made with other settings ({named})" in err


def test_journal_records_what_changes_a_prediction(voc, tmp_path):
    out = tmp_path / "run"
    assert _eval(voc, out, "--limit", "1", "--device", "cpu") == 0
    config = json.loads((out / "journal.rank0.jsonl").read_text().splitlines()[0])["config"]
    assert config["text_encoders"] == "CLIP+T5" and config["text_dtype"] == "torch.float32"
    assert config["dtype"] == "torch.float32" and config["attention_impl"] == "torch"
    assert config["vae_tiling"] is False and config["input_resolution"] == 32
    assert config["classes"][:2] == ["background", "aeroplane"] and len(config["classes"]) == 21
    for key in ("template", "separator", "normalize", "background", "background_threshold", "min_presence"):
        assert key in config
    assert "max_classes_per_prompt" in config and "resolution" in config


def test_journal_names_a_changed_class_list_briefly(tmp_path):
    old = {"classes": [f"c{i}" for i in range(21)], "seed": 0}
    journal = runner.Journal(tmp_path, {"classes": [f"c{i}" for i in range(20)] + ["sofa"], "seed": 0})
    (tmp_path / "journal.rank0.jsonl").write_text(
        json.dumps({"settings": "x", "config": old}) + "\n" + json.dumps({"id": "a", "cells": {}}) + "\n"
    )
    with pytest.raises(LavaError) as caught:
        journal.load(21)
    assert 'classes: 21 entries -> 21 entries (added "sofa"; removed "c20")' in str(caught.value)


def test_journal_of_an_older_lava_resumes_and_says_what_it_did_not_record(voc, tmp_path, capsys):
    out = tmp_path / "run"
    assert _eval(voc, out, "--limit", "2") == 0
    journal = out / "journal.rank0.jsonl"
    lines = journal.read_text().splitlines()
    header = json.loads(lines[0])
    for key in ("text_encoders", "attention_impl"):  # not recorded by lava before they were added
        del header["config"][key]
    header["settings"] = runner.settings_hash(header["config"])
    journal.write_text("\n".join([json.dumps(header), *lines[1:]]) + "\n")
    capsys.readouterr()
    assert _eval(voc, out) == 0
    captured = capsys.readouterr()
    assert "over 4 images (2 resumed)" in captured.out
    assert "does not record attention_impl, text_encoders: those are assumed unchanged" in captured.err
    # A setting the older journal does record is still checked.
    assert _eval(voc, out, "--seed", "3") == 1
    assert "(seed: 0 -> 3)" in capsys.readouterr().err


def test_failed_run_does_not_lock_its_output_folder(voc, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"

    def failing(*a, **kw):
        raise ValueError("out of memory (simulated)")

    # A run that dies before its first image leaves a journal holding its settings only.
    monkeypatch.setattr(compose, "capture_views", failing)
    assert _eval(voc, out, "--timestep", "123") == 1
    journal = out / "journal.rank0.jsonl"
    assert len(journal.read_text().splitlines()) == 1
    monkeypatch.undo()
    # Corrected flags, same folder: the stale journal is replaced, not a reason to refuse.
    assert _eval(voc, out, "--limit", "2") == 0
    lines = journal.read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[0])["config"]["timestep"] == 500.0
    assert json.loads((out / "report.json").read_text())["num_images"] == 2


def test_sweep_one_forward_per_timestep(voc, tmp_path, monkeypatch):
    calls = []
    real = compose.capture_views

    def counting(backend, noisy, prompt, **kw):
        calls.append((noisy.timestep, tuple(kw["layers"]), tuple(kw["views"])))
        return real(backend, noisy, prompt, **kw)

    monkeypatch.setattr(compose, "capture_views", counting)
    out = tmp_path / "sweep"
    rc = main(
        [
            "sweep",
            "--dataset",
            "voc20",
            "--root",
            str(voc.root),
            "--model",
            "tiny-sd3",
            "--out",
            str(out),
            "--timesteps",
            "200,600",
            "--layers",
            "0,1,3",
            "--with-mean",
            "--limit",
            "3",
            "--views",
            "image_to_text:joint,text_to_image:cross",
        ]
    )
    assert rc == 0
    assert len(calls) == 3 * 2  # images × timesteps: every block and both views in the same pass
    assert all(layers == (0, 1, 3) and len(views) == 2 for _, layers, views in calls)
    for name in ("sweep.csv", "sweep.md", "sweep.png", "sweep.json"):
        assert (out / name).exists()
    summary = json.loads((out / "sweep.json").read_text())
    assert len(summary["cells"]) == 2 * 2 * 4  # 2 views × 2 timesteps × (3 single blocks + their mean)
    best = max(summary["cells"], key=lambda c: c["miou"])
    assert summary["best"]["miou"] == pytest.approx(best["miou"])
    assert "protocol=all" in (out / "sweep.md").read_text()


def test_sweep_cells_equal_single_evals(voc, tmp_path):
    out = tmp_path / "sweep"
    assert (
        main(
            [
                "sweep",
                "--dataset",
                "voc",
                "--root",
                str(voc.root),
                "--model",
                "tiny-sd3",
                "--out",
                str(out),
                "--timesteps",
                "300",
                "--layers",
                "1,2",
            ]
        )
        == 0
    )
    cells = {tuple(c["layers"]): c["miou"] for c in json.loads((out / "sweep.json").read_text())["cells"]}
    single = tmp_path / "single"
    assert _eval(voc, single, "--timestep", "300", "--layers", "2") == 0
    assert json.loads((single / "report.json").read_text())["miou"] == pytest.approx(cells[(2,)], abs=1e-6)


def test_missing_dataset_is_a_clear_error(tmp_path, capsys):
    rc = main(["eval", "--dataset", "voc", "--root", str(tmp_path / "nowhere"), "--model", "tiny-sd3"])
    assert rc == 1
    assert "lava: error:" in capsys.readouterr().err


@pytest.mark.slow
def test_two_process_gloo_equals_one_process(voc, tmp_path):
    args = ["-m", "lava.cli", "eval", "--dataset", "voc", "--root", str(voc.root), "--model", "tiny-sd3"]
    one, two = tmp_path / "one", tmp_path / "two"
    one_and_two_processes(args, one, two)
    a = json.loads((one / "report.json").read_text())
    b = json.loads((two / "report.json").read_text())
    assert b["num_images"] == a["num_images"] == 4
    assert a["per_class_iou"] == b["per_class_iou"] and a["miou"] == b["miou"]
    assert len(list(two.glob("journal.rank*.jsonl"))) == 2  # both ranks did work


def _make_folder(root: Path, n: int = 3) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    (root / "classes.txt").write_text("background\nred square\nblue circle\n")
    rng = np.random.default_rng(0)
    for i in range(n):
        label = np.zeros((24, 32), dtype=np.uint8)
        label[4:12, 4:12] = 1
        label[14:22, 18:30] = 2
        label[0, :] = 255
        img = (rng.random((24, 32, 3)) * 60).astype(np.uint8)
        img[label == 1] = (220, 30, 30)
        img[label == 2] = (30, 30, 220)
        Image.fromarray(img).save(root / "images" / f"s{i}.png")
        Image.fromarray(label).save(root / "labels" / f"s{i}.png")
    return root


def test_folder_dataset(tmp_path):
    from lava.evaluation import load_dataset

    root = _make_folder(tmp_path / "shapes")
    ds = load_dataset("folder", root)
    assert len(ds) == 3 and ds.info.classes == ("background", "red square", "blue circle")
    assert ds.info.background == 0
    image, label = ds[0].load()
    assert image.size == (32, 24) and set(np.unique(label)) == {0, 1, 2, 255}
    out = tmp_path / "out"
    assert (
        main(["eval", "--dataset", "folder", "--root", str(root), "--model", "tiny-sd3", "--out", str(out)])
        == 0
    )
    assert json.loads((out / "report.json").read_text())["num_images"] == 3
    (root / "classes.txt").unlink()
    with pytest.raises(Exception, match=r"missing .*classes.txt"):
        load_dataset("folder", root)


def test_folder_dataset_named_split_must_exist(tmp_path, capsys):
    from lava.evaluation import DatasetError, load_dataset

    root = _make_folder(tmp_path / "shapes")
    assert len(load_dataset("folder", root)) == 3  # no split named, no split files: every image
    with pytest.raises(DatasetError, match=r"split 'test' asked for, but .*test.txt is missing"):
        load_dataset("folder", root, "test")
    (root / "val.txt").write_text("s1\n")
    assert [s.id for s in load_dataset("folder", root)] == ["s1"]  # the default split is val
    args = ["eval", "--dataset", "folder", "--root", str(root), "--model", "tiny-sd3"]
    assert main([*args, "--split", "test", "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "split files present: ['val']" in err


def test_present_protocol_on_an_image_with_only_background(tmp_path):
    """With a background threshold (tiny-sd3 given one), an image whose ground truth holds only
    background names no class under ``--protocol present``: it is predicted background everywhere
    without a forward pass (before, eval named "background" and the threshold refused it)."""
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    (root / "classes.txt").write_text("background\nred square\n")
    rng = np.random.default_rng(0)
    empty = np.zeros((16, 16), dtype=np.uint8)
    square = empty.copy()
    square[4:12, 4:12] = 1
    for name, label in (("empty", empty), ("square", square)):
        img = (rng.random((16, 16, 3)) * 60).astype(np.uint8)
        img[label == 1] = (220, 30, 30)
        Image.fromarray(img).save(root / "images" / f"{name}.png")
        Image.fromarray(label).save(root / "labels" / f"{name}.png")
    out = tmp_path / "out"
    args = ["eval", "--dataset", "folder", "--root", str(root), "--model", "tiny-sd3", "--out", str(out)]
    assert main([*args, "--protocol", "present", "--background-threshold", "0.5", "--save-predictions"]) == 0
    pred = np.asarray(Image.open(out / "predictions" / "empty.png"))
    assert pred.shape == (16, 16) and (pred == 0).all()
    assert (out / "predictions" / "square.png").exists()

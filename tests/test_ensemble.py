"""Ensembles over timesteps and noise seeds: segment(timesteps=, seeds=), mean_heatmaps, the
CLI flags and the eval journal."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import scene
from PIL import Image

import lava
from lava.errors import LavaError
from lava.stages.aggregate import mean_heatmaps
from lava.stages.refine import refine
from lava.types import Heatmaps

CLASSES = ["cat", "dog"]


def _heat(backend, img, timestep, seed, refine_method=None):
    """One run by hand: noise → capture → aggregate (→ per-run propagation)."""
    noisy = lava.noise(backend, img, timestep=timestep, seed=seed)
    prompt = lava.encode_prompt(backend, CLASSES)
    slices = lava.capture(backend, noisy, prompt, keep_image_qk=refine_method is not None)
    heat = lava.aggregate(slices, prompt)  # the model's own settings
    return refine(heat, None, method=refine_method, slices=slices) if refine_method else heat


def test_one_timestep_or_seed_in_a_list_is_the_single_form(tiny):
    img = scene()
    for single, listed in (
        (dict(timestep=300), dict(timesteps=[300])),
        (dict(seed=4), dict(seeds=[4])),
        (dict(timestep=300, seed=4), dict(timesteps=[300.0], seeds=[4])),
    ):
        a = lava.segment(img, CLASSES, backend=tiny, **single)
        b = lava.segment(img, CLASSES, backend=tiny, **listed)
        assert torch.equal(a.scores[0], b.scores[0]) and torch.equal(a.labels[0], b.labels[0])


def test_the_ensemble_is_the_mean_of_its_runs(tiny):
    img = scene()
    runs = [(t, s) for t in (300.0, 600.0) for s in (0, 1)]
    heats = [_heat(tiny, img, t, s) for t, s in runs]
    mean = mean_heatmaps(heats)
    torch.testing.assert_close(mean.scores, sum(h.scores for h in heats) / 4)
    torch.testing.assert_close(mean.presence, sum(h.presence for h in heats) / 4)
    want = lava.to_mask(mean)  # the model's own mask settings
    got = lava.segment(img, CLASSES, backend=tiny, timesteps=[300, 600], seeds=[0, 1])
    assert torch.equal(got.scores[0], want.scores[0])
    single = lava.segment(img, CLASSES, backend=tiny, timestep=300)
    assert not torch.equal(got.scores[0], single.scores[0])
    # with propagation, each run is propagated by its own attention before the mean
    prop = mean_heatmaps([_heat(tiny, img, t, s, "propagate") for t, s in runs])
    got = lava.segment(img, CLASSES, backend=tiny, timesteps=[300, 600], seeds=[0, 1], refine="propagate")
    assert torch.equal(got.scores[0], lava.to_mask(prop).scores[0])


def test_mean_heatmaps_checks_its_runs():
    a = Heatmaps(scores=torch.rand(1, 2, 3, 3), classes=("a", "b"), image_sizes=((8, 8),), normalize="minmax")
    assert mean_heatmaps([a]) is a
    b = Heatmaps(scores=torch.rand(1, 2, 3, 3), classes=("a", "c"), image_sizes=((8, 8),), normalize="minmax")
    with pytest.raises(LavaError, match="same classes"):
        mean_heatmaps([a, b])
    with pytest.raises(LavaError, match="at least one"):
        mean_heatmaps([])
    c = Heatmaps(scores=torch.rand(1, 2, 3, 3), classes=("a", "b"), image_sizes=((8, 8),), normalize="minmax")
    assert mean_heatmaps([a, c]).presence is None  # a has none: no mean to take


def test_ensemble_refusals(tiny):
    img = scene()
    with pytest.raises(LavaError, match=r"timesteps=\[\.\.\.\] or timestep=\.\.\., not both"):
        lava.segment(img, CLASSES, backend=tiny, timestep=300, timesteps=[300, 500])
    with pytest.raises(LavaError, match=r"timesteps=\[\.\.\.\] or sigma=\.\.\., not both"):
        lava.segment(img, CLASSES, backend=tiny, sigma=0.5, timesteps=[300, 500])
    with pytest.raises(LavaError, match=r"seeds=\[\.\.\.\] or seed=\.\.\., not both"):
        lava.segment(img, CLASSES, backend=tiny, seed=1, seeds=[0, 1])
    with pytest.raises(LavaError, match="at least one value"):
        lava.segment(img, CLASSES, backend=tiny, seeds=[])


def test_cli_ensemble_and_refine_chain_flags(tmp_path, capsys):
    from lava.cli import main

    path = tmp_path / "room.png"
    scene().save(path)
    out = tmp_path / "out"
    args = ["segment", str(path), "--classes", "cat,dog", "--model", "tiny-sd3", "--out", str(out)]
    extra = ["--timesteps", "300,600", "--seeds", "0,1", "--refine", "propagate,pamr", "--save-scores"]
    assert main([*args, *extra]) == 0
    assert Image.open(out / "room_labels.png").size == (56, 40)
    err = capsys.readouterr().err
    assert "timesteps 300, 600 averaged, seeds 0, 1 averaged" in err
    img = Image.open(path).convert("RGB")
    tiny = lava.load_backend("tiny-sd3")
    want = lava.segment(
        img, CLASSES, backend=tiny, timesteps=[300, 600], seeds=[0, 1], refine="propagate,pamr"
    )
    saved = np.load(out / "room_scores.npz")["scores"]
    np.testing.assert_allclose(saved, want.scores[0].numpy(), atol=1e-6)
    for bad, message in (
        (["--seed", "1", "--seeds", "0,1"], "not allowed with argument"),
        (["--timestep", "300", "--timesteps", "300,600"], "not allowed with argument"),
        (["--refine", "pamr,propagate"], "'propagate' must come before 'pamr'"),
        (["--refine", "propagate,crf"], "unknown refinement 'crf'"),
        (["--seeds", "0,x"], "expected comma-separated numbers like 0,1,2"),
    ):
        with pytest.raises(SystemExit) as exit_:
            main([*args, *bad])
        assert exit_.value.code != 0
        assert message in capsys.readouterr().err


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    from eval_fixtures import make_voc

    return make_voc(tmp_path_factory.mktemp("voc"), n=2)


def _eval(voc, out, *extra) -> int:
    from lava.cli import main

    args = ["eval", "--dataset", "voc", "--root", str(voc.root), "--model", "tiny-sd3", "--out", str(out)]
    return main([*args, "--limit", "1", *extra])


def test_eval_records_the_ensemble_and_refuses_to_mix(voc, tmp_path, capsys):
    out = tmp_path / "run"
    assert _eval(voc, out, "--timesteps", "300,600", "--seeds", "0,1", "--refine", "propagate") == 0
    header = json.loads((out / "journal.rank0.jsonl").read_text().splitlines()[0])
    config = header["config"]
    assert config["timestep"] == [300.0, 600.0] and config["seeds"] == [0, 1]
    assert config["refine"] == "propagate"
    record = json.loads((out / "journal.rank0.jsonl").read_text().splitlines()[1])
    assert list(record["cells"]) == ["t=300+600|layers=1,2|image_to_text/joint"]
    capsys.readouterr()
    assert _eval(voc, out, "--timesteps", "300,600", "--seeds", "0,2", "--refine", "propagate") == 1
    assert "seeds: [0, 1] -> [0, 2]" in capsys.readouterr().err
    assert _eval(voc, out, "--timestep", "300", "--seeds", "0,1", "--refine", "propagate") == 1
    assert "timestep: [300.0, 600.0] -> 300.0" in capsys.readouterr().err
    # a journal from before seeds were recorded was made with one seed: an ensemble must not resume it
    plain = tmp_path / "plain"
    assert _eval(voc, plain) == 0
    lines = (plain / "journal.rank0.jsonl").read_text().splitlines()
    old = json.loads(lines[0])
    del old["config"]["seeds"]
    (plain / "journal.rank0.jsonl").write_text("\n".join([json.dumps(old), *lines[1:]]) + "\n")
    capsys.readouterr()
    assert _eval(voc, plain, "--seeds", "0,1") == 1
    assert "seeds: (unset) -> [0, 1]" in capsys.readouterr().err
    assert _eval(voc, plain) == 0
    assert "seeds" not in capsys.readouterr().err


def test_eval_ensemble_predicts_as_segment_does(voc, tiny, tmp_path):
    from lava.config import recipe
    from lava.evaluation.datasets import load_dataset
    from lava.evaluation.runner import Cell, EvalSettings, run, vocabulary

    data = load_dataset("voc", str(voc.root))[:1]
    settings = EvalSettings(recipe=recipe(tiny, seeds=(0, 1), refine="propagate,pamr"))
    cell = Cell((300.0, 600.0), tiny.check_layers(tiny.defaults.layers))
    got = {}
    run(
        tiny,
        data,
        [cell],
        settings,
        tmp_path / "run",
        config={"test": 1},
        on_prediction=lambda _id, _pred, seg, _ci: got.setdefault("seg", seg),
        progress=False,
    )
    image, label = data[0].load()
    names, _ = vocabulary(data.info, label, settings)
    want = lava.segment(
        image, names, backend=tiny, timesteps=[300, 600], seeds=[0, 1], refine="propagate,pamr"
    )
    assert torch.equal(got["seg"].scores[0], want.scores[0])
    with pytest.raises(LavaError, match=r"seeds=\[...\] or seed=..., not both"):
        recipe(tiny, seed=3, seeds=(0, 1))


def test_sweep_keeps_timesteps_as_its_grid_and_averages_seeds(voc, tmp_path, capsys):
    from lava.cli import main

    with pytest.raises(SystemExit):
        main(["sweep", "--help"])
    assert "each evaluated alone" in capsys.readouterr().out
    out = tmp_path / "sweep"
    args = ["sweep", "--dataset", "voc", "--root", str(voc.root), "--model", "tiny-sd3", "--out", str(out)]
    assert main([*args, "--limit", "1", "--timesteps", "300,600", "--layers", "1", "--seeds", "0,1"]) == 0
    lines = (out / "journal.rank0.jsonl").read_text().splitlines()
    assert json.loads(lines[0])["config"]["seeds"] == [0, 1]
    assert sorted(json.loads(lines[1])["cells"]) == [
        "t=300|layers=1|image_to_text/joint",
        "t=600|layers=1|image_to_text/joint",
    ]

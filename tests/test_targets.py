"""Issue #20's target cells (scripts/measure.py --targets): the same-colour split and the intervals."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lava.evaluation.metrics import compute_metrics
from lava.reference.scenes import (
    REPORTED_SCENES,
    SAME_START,
    SPLITS,
    heldout_seeds,
    make_scene,
    split_of,
    tuning_seeds,
)
from scripts.measure import (
    SETTINGS,
    TARGETS,
    Target,
    bootstrap_cells,
    interval,
    measure_targets,
    miou_of_counts,
    targets_markdown,
)


def test_same_split_scenes_share_one_colour_and_never_overlap_other_splits():
    seeds = heldout_seeds(50, "same")
    assert seeds[0] == SAME_START and all(split_of(s) == "same" for s in seeds)
    for seed in seeds:
        objects = make_scene(seed).objects
        assert 2 <= len(objects) <= 3 and len({o.colour for o in objects}) == 1
        assert len({o.shape for o in objects}) == len(objects)
    # The other held-out splits keep their scenes (same_colour defaults to 0 there).
    assert make_scene(heldout_seeds(1, "hard")[0]) == make_scene(heldout_seeds(1, "hard")[0], same_colour=0.0)
    assert split_of(SAME_START - 1) == "hard"
    starts = sorted(SPLITS.values())
    for split, start in SPLITS.items():
        end = next((s for s in starts if s > start), None)
        tuning = tuning_seeds(1000, split)
        assert end is None or tuning[-1] < end
        assert not set(heldout_seeds(REPORTED_SCENES, split)) & set(tuning)


def test_miou_of_counts_is_compute_metrics():
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 50, (6, 4, 5))
    counts[2, 3] = 0  # a class absent from truth...
    counts[2, :, 3] = 0  # ...and prediction: no IoU, left out of the mean
    got = miou_of_counts(counts)
    for k, c in enumerate(counts):
        want = compute_metrics(torch.as_tensor(c[:, :4]), list("abcd"), unassigned=torch.as_tensor(c[:, 4]))
        assert got[k] == pytest.approx(want.miou)


def test_bootstrap_cells_pairs_the_cells_of_one_split():
    rng = np.random.default_rng(1)
    present = [rng.integers(1, 30, (3, 4)) for _ in range(20)]
    half = [c // 2 for c in present]
    other = [rng.integers(1, 30, (3, 4)) for _ in range(7)]
    boot = bootstrap_cells(
        {"present": present, "copy": present, "other": other},
        {"present": "standard", "copy": "standard", "other": "same"},
        samples=300,
    )
    assert boot["present"].shape == boot["other"].shape == (300,)
    np.testing.assert_array_equal(boot["present"], boot["copy"])  # one draw per split
    point = float(miou_of_counts(np.sum(present, 0)))
    low, high = interval(boot["present"])
    assert low <= point <= high and low < high
    with pytest.raises(ValueError):
        bootstrap_cells({"a": present, "b": half[:5]}, {"a": "s", "b": "s"}, samples=10)


def test_targets_table_on_two_scenes(shapes):
    targets = [t for t in TARGETS if t.cell in ("present", "shape", "same", "all")]
    rows = measure_targets(
        shapes,
        {"defaults": SETTINGS["defaults"]},
        lambda split: heldout_seeds(2, split),
        samples=50,
        targets=targets,
    )
    assert [r["cell"] for r in rows] == ["present", "shape", "same", "all"]
    for r in rows:
        assert 0.0 <= r["interval"][0] <= r["miou"] <= r["interval"][1] <= 1.0
        assert r["met"] == (r.get("ratio", r["miou"]) >= r["target"])
    ratio = rows[-1]
    assert ratio["of"] == "present" and ratio["ratio"] == pytest.approx(
        ratio["miou"] / rows[0]["miou"], abs=1e-3
    )
    table = targets_markdown(rows)
    assert table.count("\n| ") == 4 + 1 and "× present" in table
    assert isinstance(TARGETS[0], Target)

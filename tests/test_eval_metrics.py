"""Metrics against an independent numpy statement of mmseg's IoU / accuracy definitions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lava.evaluation import ConfusionMatrix, compute_metrics, confusion_matrix

IGNORE = 255


def _names(c: int) -> list[str]:
    return [f"class{k}" for k in range(c)]


def _reference(preds: list[np.ndarray], targets: list[np.ndarray], c: int) -> dict:
    """mmseg's intersect_and_union summed over the set, then nanmean; written with plain numpy."""

    def in_range(v: np.ndarray) -> np.ndarray:  # mmseg's histc(min=0, max=C-1) drops the rest
        return v[(v >= 0) & (v < c)]

    inter, area_pred, area_gt = np.zeros(c), np.zeros(c), np.zeros(c)
    for pred, target in zip(preds, targets, strict=True):
        keep = target != IGNORE
        p, t = pred[keep].astype(np.int64), target[keep].astype(np.int64)
        inter += np.bincount(in_range(p[p == t]), minlength=c)
        area_pred += np.bincount(in_range(p), minlength=c)
        area_gt += np.bincount(t, minlength=c)
    union = area_pred + area_gt - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, inter / union, np.nan)
        acc = np.where(area_gt > 0, inter / area_gt, np.nan)
    return {
        "iou": iou,
        "acc": acc,
        "miou": np.nanmean(iou) if not np.isnan(iou).all() else math.nan,
        "macc": np.nanmean(acc) if not np.isnan(acc).all() else math.nan,
        "aacc": inter.sum() / area_gt.sum() if area_gt.sum() else math.nan,
    }


def _reference_matrix(pred: np.ndarray, target: np.ndarray, c: int) -> np.ndarray:
    matrix = np.zeros((c, c), dtype=np.int64)
    for p, t in zip(pred.ravel().tolist(), target.ravel().tolist(), strict=True):
        if t != IGNORE and 0 <= p < c:
            matrix[t, p] += 1
    return matrix


def _as_array(values: dict) -> np.ndarray:
    return np.array([math.nan if v is None else v for v in values.values()])


def _random_case(rng: np.random.Generator, c: int, shape: tuple[int, int], absent: set[int]):
    """Target with ~15% ignore and some classes never present; pred with ~10% out-of-range (255)."""
    allowed = np.array([k for k in range(c) if k not in absent])
    target = rng.choice(allowed, size=shape).astype(np.uint8)
    target[rng.random(shape) < 0.15] = IGNORE
    # Noisy copy of the target so IoUs are spread over (0, 1), not all near 1/c.
    pred = np.where(rng.random(shape) < 0.6, target, rng.integers(0, c, size=shape)).astype(np.uint8)
    pred[rng.random(shape) < 0.1] = IGNORE
    return pred, target


def _assert_matches_reference(metrics, ref: dict) -> None:
    np.testing.assert_allclose(_as_array(metrics.per_class_iou), ref["iou"], equal_nan=True)
    np.testing.assert_allclose(_as_array(metrics.per_class_accuracy), ref["acc"], equal_nan=True)
    np.testing.assert_allclose(
        [metrics.miou, metrics.mean_accuracy, metrics.pixel_accuracy],
        [ref["miou"], ref["macc"], ref["aacc"]],
        equal_nan=True,
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_confusion_matrix_matches_pixel_loop(seed: int) -> None:
    rng = np.random.default_rng(seed)
    pred, target = _random_case(rng, 7, (19, 23), absent={2, 5})
    pred[0, :5] = [7, 8, 100, 254, 255]  # just past the last class, and further
    got = confusion_matrix(torch.from_numpy(pred), torch.from_numpy(target), 7)
    assert got.dtype == torch.int64 and got.shape == (7, 7)
    np.testing.assert_array_equal(got.numpy(), _reference_matrix(pred, target, 7))
    assert got[[2, 5]].sum() == 0  # absent classes have empty rows


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_metrics_match_reference_over_a_set(seed: int) -> None:
    rng = np.random.default_rng(seed)
    c = 9
    # Class 3: absent everywhere -> None. Class 8: never in GT but predicted -> IoU 0, acc None.
    preds, targets = [], []
    for shape in [(16, 24), (11, 7), (30, 5)]:
        pred, target = _random_case(rng, c, shape, absent={3, 8})
        pred[pred == 3] = 0
        preds.append(pred)
        targets.append(target)
    preds[0][0, 0], targets[0][0, 0] = 8, 1
    acc = ConfusionMatrix(c)
    for pred, target in zip(preds, targets, strict=True):
        acc.update(torch.from_numpy(pred), torch.from_numpy(target))
    metrics = acc.compute(_names(c))
    ref = _reference(preds, targets, c)
    _assert_matches_reference(metrics, ref)
    assert metrics.per_class_iou["class3"] is None and metrics.per_class_accuracy["class3"] is None
    assert metrics.per_class_iou["class8"] == 0.0 and metrics.per_class_accuracy["class8"] is None
    # Whole-set accumulation, not a mean of per-image mIoUs.
    per_image = np.mean([_reference([p], [t], c)["miou"] for p, t in zip(preds, targets, strict=True)])
    assert not math.isclose(metrics.miou, per_image, rel_tol=1e-6)


def test_out_of_range_predictions_count_as_misses() -> None:
    target = torch.tensor([[0, 0, 1, 1]])
    pred = torch.tensor([[0, 255, 1, 1]])
    acc = ConfusionMatrix(2)
    acc.update(pred, target)
    assert acc.unassigned.tolist() == [1, 0]
    metrics = acc.compute(["a", "b"])
    assert metrics.per_class_iou == {"a": 0.5, "b": 1.0}  # no false positive charged to "b"
    assert metrics.pixel_accuracy == 0.75 and metrics.per_class_accuracy["a"] == 0.5
    # The bare [C, C] matrix has no column for them; passing unassigned restores the policy.
    assert compute_metrics(acc.matrix, ["a", "b"], unassigned=acc.unassigned) == metrics
    assert compute_metrics(acc.matrix, ["a", "b"]).per_class_iou["a"] == 1.0


def test_empty_predictions_score_zero() -> None:
    rng = np.random.default_rng(5)
    target = rng.integers(0, 4, size=(8, 8)).astype(np.uint8)
    pred = np.full_like(target, IGNORE)  # the model claimed nothing anywhere
    acc = ConfusionMatrix(4)
    acc.update(pred, target)
    metrics = acc.compute(_names(4))
    _assert_matches_reference(metrics, _reference([pred], [target], 4))
    assert metrics.miou == 0.0 and metrics.pixel_accuracy == 0.0


def test_no_pixels_at_all_gives_nan_not_zero() -> None:
    acc = ConfusionMatrix(3)
    acc.update(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))
    acc.update(torch.zeros(2, 2, dtype=torch.long), torch.full((2, 2), IGNORE))
    metrics = acc.compute(_names(3))
    assert acc.matrix.sum() == 0
    assert all(v is None for v in metrics.per_class_iou.values())
    assert math.isnan(metrics.miou) and math.isnan(metrics.pixel_accuracy)


def test_perfect_prediction_is_one() -> None:
    target = torch.randint(0, 5, (3, 10, 12), generator=torch.Generator().manual_seed(0))
    target[:, 0] = IGNORE
    pred = target.clone()
    pred[:, 0] = 4  # whatever is predicted on ignored pixels does not count
    metrics = compute_metrics(confusion_matrix(pred, target, 5), _names(5))
    assert metrics.miou == metrics.pixel_accuracy == metrics.mean_accuracy == 1.0
    assert set(metrics.per_class_iou.values()) == {1.0}


def test_all_wrong_is_zero() -> None:
    target = torch.randint(0, 5, (10, 12), generator=torch.Generator().manual_seed(1))
    pred = (target + 1) % 5
    metrics = compute_metrics(confusion_matrix(pred, target, 5), _names(5))
    assert metrics.miou == metrics.pixel_accuracy == metrics.mean_accuracy == 0.0


def test_merge_equals_single_accumulator() -> None:
    rng = np.random.default_rng(7)
    cases = [_random_case(rng, 6, (9, 13), absent={4}) for _ in range(6)]
    whole, first, second = ConfusionMatrix(6), ConfusionMatrix(6), ConfusionMatrix(6)
    for i, (pred, target) in enumerate(cases):
        whole.update(pred, target)
        (first if i % 2 else second).update(pred, target)
    merged = first.merge(second)
    assert merged is first
    assert torch.equal(merged.matrix, whole.matrix) and torch.equal(merged.unassigned, whole.unassigned)
    assert merged.compute(_names(6)) == whole.compute(_names(6))


def test_accepts_numpy_batches_and_mixed_dtypes() -> None:
    rng = np.random.default_rng(3)
    pred, target = _random_case(rng, 5, (4, 6), absent=set())
    from_numpy = confusion_matrix(pred.astype(np.int32)[None], target[None], 5)
    from_torch = confusion_matrix(torch.from_numpy(pred).long(), torch.from_numpy(target), 5)
    assert torch.equal(from_numpy, from_torch)


def test_invalid_inputs_raise() -> None:
    t = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match=r"shape \(2, 3\) != target shape \(3, 2\)"):
        confusion_matrix(t, t.T, 3)
    with pytest.raises(TypeError, match="integer"):
        confusion_matrix(t.float(), t, 3)
    with pytest.raises(ValueError, match=r"target holds values \[3, 7\]"):
        confusion_matrix(t, torch.tensor([[0, 3, 7], [1, 2, IGNORE]]), 3)
    with pytest.raises(ValueError, match="ignore_index 1 collides"):
        confusion_matrix(t, t, 3, ignore_index=1)
    with pytest.raises(ValueError, match="does not match 2 class names"):
        compute_metrics(torch.zeros(3, 3, dtype=torch.long), ["a", "b"])
    with pytest.raises(ValueError, match="unique"):
        compute_metrics(torch.zeros(2, 2, dtype=torch.long), ["a", "a"])
    with pytest.raises(ValueError, match="cannot merge"):
        ConfusionMatrix(3).merge(ConfusionMatrix(4))


def test_bootstrap_miou_brackets_the_dataset_value_and_collapses_on_identical_images():
    from lava.evaluation.metrics import bootstrap_miou

    rng = np.random.default_rng(0)
    names = ["a", "b", "c"]
    counts, total = [], ConfusionMatrix(3)
    for _ in range(40):
        target = rng.integers(0, 3, (8, 8))
        pred = np.where(rng.random((8, 8)) < 0.7, target, rng.integers(0, 3, (8, 8)))
        cm = ConfusionMatrix(3)
        cm.update(pred, target)
        total.merge(cm)
        counts.append(cm.counts)
    low, high = bootstrap_miou(counts, names, samples=300)
    assert low < total.compute(names).miou < high and high - low < 0.2
    same = bootstrap_miou([counts[0]] * 10, names, samples=50)
    cm = ConfusionMatrix(3).add_counts(counts[0])
    assert same[0] == pytest.approx(same[1]) == pytest.approx(cm.compute(names).miou)
    with pytest.raises(ValueError, match="at least one image"):
        bootstrap_miou([], names)

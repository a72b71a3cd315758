"""Semantic-segmentation metrics accumulated over a whole dataset (mmseg's definitions).

IoU, accuracies and mIoU are computed from counts summed over every pixel of the set, never as an
average of per-image scores. A class that is absent from both ground truth and prediction has no
IoU (``None``) and is left out of the mean, as mmseg's ``nanmean`` does.

Predictions outside ``0..C-1`` (e.g. 255 for "no class") are wrong for their ground-truth pixel, as
in mmseg: they add to that class's ground-truth area and union but are a false positive for no
class. A ``[C, C]`` matrix has no column for them, so they are kept next to it as ``unassigned``
(``[C]``, per ground-truth class); :class:`ConfusionMatrix` tracks it and hands it to
:func:`compute_metrics`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

ArrayLike = torch.Tensor | np.ndarray


def confusion_matrix(
    pred: ArrayLike, target: ArrayLike, num_classes: int, ignore_index: int = 255
) -> torch.Tensor:
    """Count (ground truth, prediction) pairs: int64 ``[C, C]``, rows = ground truth, cols = prediction.

    ``pred`` and ``target`` are integer tensors (or numpy arrays) of the same shape, e.g. ``[H, W]``
    or ``[B, H, W]``. Pixels whose target is ``ignore_index`` are skipped. Pixels predicted outside
    ``0..C-1`` appear in no column (see :meth:`ConfusionMatrix.update`, which counts them as misses).
    A target value that is neither a class id nor ``ignore_index`` raises ``ValueError``.
    """
    return _counts(pred, target, num_classes, ignore_index)[:, :num_classes].clone()


def _counts(pred: ArrayLike, target: ArrayLike, num_classes: int, ignore_index: int) -> torch.Tensor:
    """``[C, C + 1]`` counts on the CPU; column ``C`` gathers out-of-range predictions."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if 0 <= ignore_index < num_classes:
        raise ValueError(f"ignore_index {ignore_index} collides with class id range 0..{num_classes - 1}")
    pred_t, target_t = _as_int_tensor(pred, "pred"), _as_int_tensor(target, "target")
    if pred_t.shape != target_t.shape:
        raise ValueError(f"pred shape {tuple(pred_t.shape)} != target shape {tuple(target_t.shape)}")
    target_t = target_t.to(pred_t.device).reshape(-1).long()
    pred_t = pred_t.reshape(-1).long()

    keep = target_t != ignore_index
    target_t, pred_t = target_t[keep], pred_t[keep]
    bad = (target_t < 0) | (target_t >= num_classes)
    if bad.any():
        values = torch.unique(target_t[bad])[:10].tolist()
        raise ValueError(
            f"target holds values {values} that are neither class ids 0..{num_classes - 1} "
            f"nor ignore_index {ignore_index}"
        )
    pred_t = torch.where((pred_t >= 0) & (pred_t < num_classes), pred_t, num_classes)
    width = num_classes + 1
    flat = torch.bincount(target_t * width + pred_t, minlength=num_classes * width)
    return flat.reshape(num_classes, width).cpu()


def _as_int_tensor(x: ArrayLike, name: str) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else x
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or numpy array, got {type(x).__name__}")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer class ids, got dtype {t.dtype}")
    return t


class ConfusionMatrix:
    """Running confusion counts over a dataset; update per image (or batch), merge across workers."""

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self._counts = torch.zeros(num_classes, num_classes + 1, dtype=torch.int64)

    def update(self, pred: ArrayLike, target: ArrayLike) -> None:
        """Add one prediction/target pair of equal shape (any shape, integer ids)."""
        self._counts += _counts(pred, target, self.num_classes, self.ignore_index)

    def merge(self, other: ConfusionMatrix) -> ConfusionMatrix:
        """Add ``other``'s counts into this accumulator (in place) and return it."""
        if (other.num_classes, other.ignore_index) != (self.num_classes, self.ignore_index):
            raise ValueError(
                f"cannot merge a {other.num_classes}-class matrix (ignore {other.ignore_index}) into a "
                f"{self.num_classes}-class one (ignore {self.ignore_index})"
            )
        self._counts += other._counts
        return self

    @property
    def counts(self) -> torch.Tensor:
        """int64 ``[C, C + 1]``: the matrix plus the ``unassigned`` column (a copy) — the whole
        state, for saving, resuming and all-reducing across processes."""
        return self._counts.clone()

    def add_counts(self, counts: torch.Tensor) -> ConfusionMatrix:
        """Add a ``[C, C + 1]`` ``counts`` tensor (from another accumulator) in place."""
        counts = torch.as_tensor(counts, dtype=torch.int64).cpu()
        if counts.shape != self._counts.shape:
            raise ValueError(f"counts shape {tuple(counts.shape)} != {tuple(self._counts.shape)}")
        self._counts += counts
        return self

    @property
    def matrix(self) -> torch.Tensor:
        """int64 ``[C, C]``: rows = ground truth, cols = prediction (a copy)."""
        return self._counts[:, : self.num_classes].clone()

    @property
    def unassigned(self) -> torch.Tensor:
        """int64 ``[C]``: pixels of each ground-truth class predicted outside ``0..C-1``."""
        return self._counts[:, self.num_classes].clone()

    def compute(self, class_names: Sequence[str]) -> SegMetrics:
        """Metrics of everything accumulated so far (out-of-range predictions count as misses)."""
        return compute_metrics(self.matrix, class_names, unassigned=self.unassigned)


@dataclass(frozen=True)
class SegMetrics:
    """Scores in ``[0, 1]``. Per-class values are ``None`` where undefined (see module docstring).

    ``miou``/``mean_accuracy`` are ``nan`` only when no class has a defined value (no pixels).
    """

    miou: float
    per_class_iou: dict[str, float | None]
    pixel_accuracy: float
    mean_accuracy: float
    per_class_accuracy: dict[str, float | None]


def compute_metrics(
    matrix: torch.Tensor, class_names: Sequence[str], unassigned: torch.Tensor | None = None
) -> SegMetrics:
    """mIoU, per-class IoU, pixel accuracy and mean accuracy from a ``[C, C]`` confusion matrix.

    ``unassigned`` (``[C]``, optional) adds ground-truth pixels that were predicted outside
    ``0..C-1``: they lower IoU and accuracy of their class without being anyone's false positive.
    IoU_c = TP / (GT_c + Pred_c - TP), None when GT_c + Pred_c = 0; accuracy_c = TP / GT_c, None
    when GT_c = 0; pixel accuracy = sum TP / sum GT.
    """
    counts = torch.as_tensor(matrix).to(torch.float64).cpu()
    num_classes = len(class_names)
    if len(set(class_names)) != num_classes:
        raise ValueError("class_names must be unique: they key the per-class results")
    if counts.shape != (num_classes, num_classes):
        raise ValueError(f"matrix shape {tuple(counts.shape)} does not match {num_classes} class names")
    tp = counts.diagonal()
    gt = counts.sum(dim=1)
    if unassigned is not None:
        missed = torch.as_tensor(unassigned).to(torch.float64).cpu()
        if missed.shape != (num_classes,):
            raise ValueError(f"unassigned shape {tuple(missed.shape)} != ({num_classes},)")
        gt = gt + missed
    predicted = counts.sum(dim=0)
    union = gt + predicted - tp

    iou = [_ratio(t, u) for t, u in zip(tp.tolist(), union.tolist(), strict=True)]
    acc = [_ratio(t, g) for t, g in zip(tp.tolist(), gt.tolist(), strict=True)]
    total = gt.sum().item()
    return SegMetrics(
        miou=_mean(iou),
        per_class_iou=dict(zip(class_names, iou, strict=True)),
        pixel_accuracy=tp.sum().item() / total if total > 0 else math.nan,
        mean_accuracy=_mean(acc),
        per_class_accuracy=dict(zip(class_names, acc, strict=True)),
    )


def _ratio(num: float, den: float) -> float | None:
    return num / den if den > 0 else None


def _mean(values: Sequence[float | None]) -> float:
    defined = [v for v in values if v is not None]
    return sum(defined) / len(defined) if defined else math.nan


def bootstrap_miou(
    counts: Sequence[torch.Tensor],
    class_names: Sequence[str],
    *,
    samples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """``(low, high)``: a percentile bootstrap interval of the dataset mIoU over images.

    ``counts`` holds one ``[C, C + 1]`` ``ConfusionMatrix.counts`` per image. Each sample draws
    as many images with replacement and recomputes mIoU from their summed counts (the dataset
    definition, not a mean of per-image scores), so the interval says how much a number could
    move on another draw of images of the same kind.
    """
    if not counts:
        raise ValueError("bootstrap_miou needs the counts of at least one image")
    stacked = torch.stack([torch.as_tensor(c, dtype=torch.int64) for c in counts])
    n, c = len(counts), len(class_names)
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(samples):
        total = stacked[torch.from_numpy(rng.integers(0, n, n))].sum(0)
        values.append(compute_metrics(total[:, :c], class_names, unassigned=total[:, c]).miou)
    tail = 100 * (1 - level) / 2
    low, high = np.nanpercentile(values, [tail, 100 - tail])
    return float(low), float(high)

"""Evaluation harness pieces: benchmark dataset readers, class-name tables and mIoU metrics.

Names are imported on first use (PEP 562) so that the ``lava`` command can list the datasets in
its ``--help`` without loading torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_exports as _lazy_exports

_EXPORTS = {
    "DATASET_NAMES": "datasets",
    "LAYOUTS": "datasets",
    "DatasetError": "datasets",
    "DatasetInfo": "datasets",
    "Sample": "datasets",
    "SegmentationDataset": "datasets",
    "dataset_info": "datasets",
    "load_dataset": "datasets",
    "ConfusionMatrix": "metrics",
    "SegMetrics": "metrics",
    "bootstrap_miou": "metrics",
    "compute_metrics": "metrics",
    "confusion_matrix": "metrics",
}

__all__ = [
    "DATASET_NAMES",
    "LAYOUTS",
    "ConfusionMatrix",
    "DatasetError",
    "DatasetInfo",
    "Sample",
    "SegMetrics",
    "SegmentationDataset",
    "bootstrap_miou",
    "compute_metrics",
    "confusion_matrix",
    "dataset_info",
    "load_dataset",
]


__getattr__, __dir__ = _lazy_exports(__name__, _EXPORTS, globals())


if TYPE_CHECKING:
    from .datasets import (
        DATASET_NAMES,
        LAYOUTS,
        DatasetError,
        DatasetInfo,
        Sample,
        SegmentationDataset,
        dataset_info,
        load_dataset,
    )
    from .metrics import ConfusionMatrix, SegMetrics, bootstrap_miou, compute_metrics, confusion_matrix

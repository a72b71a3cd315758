"""Evaluation harness pieces: benchmark dataset readers, class-name tables and mIoU metrics."""

from lava.evaluation.datasets import (
    DATASET_NAMES,
    LAYOUTS,
    DatasetError,
    DatasetInfo,
    Sample,
    SegmentationDataset,
    dataset_info,
    load_dataset,
)
from lava.evaluation.metrics import ConfusionMatrix, SegMetrics, compute_metrics, confusion_matrix

__all__ = [
    "DATASET_NAMES",
    "LAYOUTS",
    "ConfusionMatrix",
    "DatasetError",
    "DatasetInfo",
    "Sample",
    "SegMetrics",
    "SegmentationDataset",
    "compute_metrics",
    "confusion_matrix",
    "dataset_info",
    "load_dataset",
]

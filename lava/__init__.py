"""lava: training-free open-vocabulary semantic segmentation from SD3-family MM-DiT attention.

The five stages are plain functions over frozen dataclasses (``lava.types``)::

    noisy   = lava.noise(backend, images, timestep=515)
    prompt  = lava.encode_prompt(backend, ["cat", "dog", "sofa"])
    slices  = lava.capture(backend, noisy, prompt, layers=[9])
    heat    = lava.aggregate(slices, prompt)
    seg     = lava.to_mask(heat)

and ``lava.segment(images, classes, backend=...)`` composes them.
"""

from . import kernels
from .aggregate import aggregate
from .backends import Backend, from_pipeline, list_backends, load_backend
from .capture import capture, capturing
from .errors import ClassNameError, ImageError, LavaError, ModelError
from .images import load_image
from .mask import to_mask
from .noise import noise
from .pipeline import segment
from .prompts import encode_prompt
from .types import (
    AggregateConfig,
    AttentionSlices,
    CapturePlan,
    Heatmaps,
    MaskConfig,
    NoisyLatents,
    PromptEncoding,
    Segmentation,
)

__version__ = "0.1.0"

__all__ = [
    "AggregateConfig",
    "AttentionSlices",
    "Backend",
    "CapturePlan",
    "ClassNameError",
    "Heatmaps",
    "ImageError",
    "LavaError",
    "MaskConfig",
    "ModelError",
    "NoisyLatents",
    "PromptEncoding",
    "Segmentation",
    "aggregate",
    "capture",
    "capturing",
    "encode_prompt",
    "from_pipeline",
    "kernels",
    "list_backends",
    "load_backend",
    "load_image",
    "noise",
    "segment",
    "to_mask",
]

"""lava: training-free open-vocabulary semantic segmentation from SD3-family MM-DiT attention.

The five stages are plain functions over frozen dataclasses (``lava.types``)::

    noisy   = lava.noise(backend, images, timestep=515)
    prompt  = lava.encode_prompt(backend, ["cat", "dog", "sofa"])
    slices  = lava.capture(backend, noisy, prompt, layers=[9])
    heat    = lava.aggregate(slices, prompt)
    seg     = lava.to_mask(heat)

and ``lava.segment(images, classes, backend=...)`` composes them. Called with no options, every
stage takes the model's own settings, as ``segment`` does. ``lava.recipe(backend, **options)``
resolves a call's settings into one value (``lava.Recipe``), and ``lava.read_heatmaps`` /
``lava.segmentation`` run the stages for several recipes, sharing forward passes.

The public names are imported on first use (PEP 562), so ``import lava`` and the ``lava``
command's ``--help`` stay fast: torch and diffusers load only when a stage is needed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._lazy import lazy_exports as _lazy_exports

__version__ = "0.1.0"

# public name -> the submodule that defines it
_EXPORTS = {
    "AggregateConfig": "types",
    "AttentionSlices": "types",
    "Backend": "backends",
    "CapturePlan": "types",
    "ClassNameError": "errors",
    "Heatmaps": "types",
    "ImageError": "errors",
    "LavaError": "errors",
    "MaskConfig": "types",
    "ModelError": "errors",
    "NoisyLatents": "types",
    "PAMR": "stages.refine",
    "PromptConfig": "config",
    "Propagate": "stages.refine",
    "PromptEncoding": "types",
    "Reading": "config",
    "Recipe": "config",
    "Segmentation": "types",
    "aggregate": "stages.aggregate",
    "capture": "stages.capture",
    "capturing": "stages.capture",
    "encode_prompt": "stages.prompts",
    "from_pipeline": "backends",
    "generate": "generation",
    "GenerateResult": "generation",
    "list_backends": "backends",
    "load_backend": "backends",
    "load_image": "images",
    "mean_heatmaps": "stages.aggregate",
    "noise": "stages.noise",
    "propagate": "stages.propagate",
    "read_heatmaps": "compose",
    "recipe": "config",
    "refine": "stages.refine",
    "segment": "pipeline",
    "segment_iter": "pipeline",
    "segmentation": "compose",
    "split_classes": "stages.prompts",
    "to_mask": "stages.mask",
    "trace": "tracing",
    "Trace": "tracing",
}

__all__ = [
    "PAMR",
    "AggregateConfig",
    "AttentionSlices",
    "Backend",
    "CapturePlan",
    "ClassNameError",
    "GenerateResult",
    "Heatmaps",
    "ImageError",
    "LavaError",
    "MaskConfig",
    "ModelError",
    "NoisyLatents",
    "PromptConfig",
    "PromptEncoding",
    "Propagate",
    "Reading",
    "Recipe",
    "Segmentation",
    "Trace",
    "aggregate",
    "capture",
    "capturing",
    "encode_prompt",
    "from_pipeline",
    "generate",
    "kernels",
    "list_backends",
    "load_backend",
    "load_image",
    "mean_heatmaps",
    "noise",
    "propagate",
    "read_heatmaps",
    "recipe",
    "refine",
    "segment",
    "segment_iter",
    "segmentation",
    "split_classes",
    "to_mask",
    "trace",
]


__getattr__, __dir__ = _lazy_exports(__name__, _EXPORTS, globals(), submodules=("kernels",))


if TYPE_CHECKING:  # names for type checkers and IDEs; at run time __getattr__ provides them
    from . import kernels
    from .backends import Backend, from_pipeline, list_backends, load_backend
    from .compose import read_heatmaps, segmentation
    from .config import PromptConfig, Reading, Recipe, recipe
    from .errors import ClassNameError, ImageError, LavaError, ModelError
    from .generation import GenerateResult, generate
    from .images import load_image
    from .pipeline import segment, segment_iter
    from .stages.aggregate import aggregate, mean_heatmaps
    from .stages.capture import capture, capturing
    from .stages.mask import to_mask
    from .stages.noise import noise
    from .stages.prompts import encode_prompt, split_classes
    from .stages.propagate import propagate
    from .stages.refine import PAMR, Propagate, refine
    from .tracing import Trace, trace
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

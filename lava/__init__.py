"""lava: training-free open-vocabulary semantic segmentation from SD3-family MM-DiT attention.

The five stages are plain functions over frozen dataclasses (``lava.types``)::

    noisy   = lava.noise(backend, images, timestep=515)
    prompt  = lava.encode_prompt(backend, ["cat", "dog", "sofa"])
    slices  = lava.capture(backend, noisy, prompt, layers=[9])
    heat    = lava.aggregate(slices, prompt)
    seg     = lava.to_mask(heat)

and ``lava.segment(images, classes, backend=...)`` composes them.

The public names are imported on first use (PEP 562), so ``import lava`` and the ``lava``
command's ``--help`` stay fast: torch and diffusers load only when a stage is needed.
"""

from __future__ import annotations

import sys as _sys
import types as _types
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
    "PAMR": "refine",
    "Propagate": "refine",
    "PromptEncoding": "types",
    "Segmentation": "types",
    "aggregate": "aggregate",
    "capture": "capture",
    "capturing": "capture",
    "encode_prompt": "prompts",
    "from_pipeline": "backends",
    "list_backends": "backends",
    "load_backend": "backends",
    "load_image": "images",
    "mean_heatmaps": "aggregate",
    "noise": "noise",
    "propagate": "propagate",
    "refine": "refine",
    "segment": "pipeline",
    "segment_iter": "pipeline",
    "to_mask": "mask",
}

__all__ = [
    "PAMR",
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
    "Propagate",
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
    "mean_heatmaps",
    "noise",
    "propagate",
    "refine",
    "segment",
    "segment_iter",
    "to_mask",
]


__getattr__, __dir__ = _lazy_exports(__name__, _EXPORTS, globals(), submodules=("kernels",))


class _Package(_types.ModuleType):
    """The ``lava`` package object: keeps ``lava.noise``, ``lava.capture``, ``lava.aggregate``,
    ``lava.refine`` and ``lava.propagate`` the functions even after their submodules of the same
    name are imported.

    The import system binds every submodule it loads onto its package (``lava.noise =
    <module lava.noise>``). With eager imports the function was bound afterwards and won; with
    lazy ones a submodule imported first (by ``lava.segment``, say) would shadow the function.
    """

    def __setattr__(self, name: str, value) -> None:
        if (
            isinstance(value, _types.ModuleType)
            and _EXPORTS.get(name) == name
            and callable(getattr(value, name, None))
        ):
            return
        super().__setattr__(name, value)


_sys.modules[__name__].__class__ = _Package

if TYPE_CHECKING:  # names for type checkers and IDEs; at run time __getattr__ provides them
    from . import kernels
    from .aggregate import aggregate, mean_heatmaps
    from .backends import Backend, from_pipeline, list_backends, load_backend
    from .capture import capture, capturing
    from .errors import ClassNameError, ImageError, LavaError, ModelError
    from .images import load_image
    from .mask import to_mask
    from .noise import noise
    from .pipeline import segment, segment_iter
    from .prompts import encode_prompt
    from .propagate import propagate
    from .refine import PAMR, Propagate, refine
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

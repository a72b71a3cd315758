"""Backends found by name: the registry of built-in models, hub ids and local folders.

``lava-shapes`` is registered from ``lava.reference``, which builds on this package's ``Backend``
and ``from_pipeline``; the registry is the one place that knows every model.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import ModelError
from ..reference import REFERENCE_DEFAULTS, load_reference_backend
from . import chroma, flux, flux2, qwen, sd3, zimage
from .base import Backend, VariantDefaults, resolve_device, resolve_dtype
from .loading import library_output
from .pretrained import (
    load_chroma,
    load_flux,
    load_flux2,
    load_pretrained,
    load_qwen_image,
    load_sd3,
    load_zimage,
    refuse_drop_qwen,
    refuse_drop_t5,
)
from .sd3 import DEFAULTS, HUB_IDS
from .tiny import TINY_MAX_SEQUENCE_LENGTH, build_tiny_flux_pipeline, build_tiny_pipeline
from .tiny_chroma import build_tiny_chroma_pipeline
from .tiny_flux2 import TINY_FLUX2_MAX_SEQUENCE_LENGTH, build_tiny_flux2_pipeline
from .tiny_qwen import TINY_QWEN_MAX_SEQUENCE_LENGTH, build_tiny_qwen_pipeline
from .tiny_zimage import build_tiny_zimage_pipeline
from .wrap import from_pipeline


def _tiny_backend(
    pipe,
    *,
    name: str,
    variant: str,
    defaults: VariantDefaults,
    device,
    dtype,
    offload_text_encoders: bool,
    max_sequence_length: int | None,
) -> Backend:
    """A tiny pipeline built in code as a backend: CPU and float32 unless told otherwise."""
    dev = resolve_device(device if device is not None else "cpu")
    backend = from_pipeline(
        pipe,
        name=name,
        device=dev,
        dtype=resolve_dtype(dtype or "float32", dev),
        offload_text_encoders=offload_text_encoders,
        max_sequence_length=max_sequence_length,
        defaults=defaults,
    )
    backend.variant = variant
    backend.info["random_weights"] = True
    return backend


def _load_tiny(
    *,
    device=None,
    dtype=None,
    drop_t5: bool = False,
    offload_text_encoders: bool = False,
    variant: str = "sd3",
    seed: int = 0,
    max_sequence_length: int = TINY_MAX_SEQUENCE_LENGTH,
    **kw,
) -> Backend:
    return _tiny_backend(
        build_tiny_pipeline(variant, seed=seed, t5=not drop_t5, **kw),
        name="tiny-sd3",
        variant=f"tiny-{variant}",
        defaults=DEFAULTS["tiny-sd3"],
        device=device,
        dtype=dtype,
        offload_text_encoders=offload_text_encoders,
        max_sequence_length=max_sequence_length,
    )


def _refusing(message: str) -> Callable[[bool], None]:
    """A ``drop_t5`` check that raises ``message`` when T5 (or whatever encoder) is asked to go."""

    def refuse(drop_t5: bool) -> None:
        if drop_t5:
            raise ModelError(message)

    return refuse


@dataclass(frozen=True)
class _TinyModel:
    """A toy model built in code (one registry name): its builder, defaults, text window, what
    ``drop_t5`` does to it and its ``list_backends`` line."""

    name: str
    build: Callable[..., Any]
    defaults: VariantDefaults
    window: int
    refuse_drop: Callable[[bool], None]
    about: str

    def load(
        self,
        *,
        device=None,
        dtype=None,
        drop_t5: bool = False,
        offload_text_encoders: bool = False,
        seed: int = 0,
        max_sequence_length: int | None = None,
        **kw,
    ) -> Backend:
        self.refuse_drop(drop_t5)
        return _tiny_backend(
            self.build(seed=seed, **kw),
            name=self.name,
            variant=self.name,
            defaults=self.defaults,
            device=device,
            dtype=dtype,
            offload_text_encoders=offload_text_encoders,
            max_sequence_length=max_sequence_length or self.window,
        )


_TINY_MODELS = (
    _TinyModel(
        "tiny-flux",
        build_tiny_flux_pipeline,
        flux.DEFAULTS["tiny-flux"],
        TINY_MAX_SEQUENCE_LENGTH,
        lambda drop_t5: refuse_drop_t5("tiny-flux", drop_t5),
        "toy FLUX.1-dev built in code, random weights (offline); blocks 0-1 double-stream, 2-3 single",
    ),
    _TinyModel(
        "tiny-chroma",
        build_tiny_chroma_pipeline,
        chroma.DEFAULTS["tiny-chroma"],
        TINY_MAX_SEQUENCE_LENGTH,
        _refusing("tiny-chroma's text sequence is T5 alone (Chroma has no CLIP): T5 cannot be dropped"),
        "toy Chroma1 built in code, random weights (offline); blocks 0-1 double-stream, 2-3 single",
    ),
    _TinyModel(
        "tiny-flux2",
        build_tiny_flux2_pipeline,
        flux2.DEFAULTS["tiny-flux2"],
        TINY_FLUX2_MAX_SEQUENCE_LENGTH,
        _refusing("tiny-flux2 is a FLUX.2 model: it has no T5 to drop; leave out --drop-t5 / drop_t5"),
        "toy FLUX.2 klein built in code (tiny Qwen3 encoder), random weights (offline); "
        "blocks 0-1 double-stream, 2-3 single",
    ),
    _TinyModel(
        "tiny-z-image",
        build_tiny_zimage_pipeline,
        zimage.DEFAULTS["tiny-z-image"],
        TINY_MAX_SEQUENCE_LENGTH,
        _refusing("tiny-z-image's text sequence is its Qwen3 encoder's alone: it cannot be dropped"),
        "toy Z-Image built in code, random weights (offline); blocks 0-3 single-stream, Qwen3 text",
    ),
    _TinyModel(
        "tiny-qwen-image",
        build_tiny_qwen_pipeline,
        qwen.DEFAULTS["tiny-qwen-image"],
        TINY_QWEN_MAX_SEQUENCE_LENGTH,
        lambda drop_t5: refuse_drop_qwen("tiny-qwen-image", drop_t5),
        "toy Qwen-Image built in code, random weights (offline); 3 double-stream blocks, "
        "Qwen2.5-VL text behind the pipeline's chat template",
    ),
)

# Each family's released models: (its module, with ``HUB_IDS`` and ``DEFAULTS``; the loader;
# the ``list_backends`` line of a short name and its hub id).
_HUB_FAMILIES = (
    (sd3, load_sd3, lambda short, hub: hub),
    (flux, load_flux, lambda short, hub: f"{hub}; blocks 0-18 double-stream, 19-56 single-stream"),
    (
        chroma,
        load_chroma,
        lambda short, hub: f"{hub}; blocks 0-18 double-stream, 19-56 single-stream; T5 only",
    ),
    (flux2, load_flux2, lambda short, hub: f"{hub}; {flux2.BLOCK_SCHEME[short]}"),
    (zimage, load_zimage, lambda short, hub: f"{hub}; blocks 0-29 single-stream (image+caption), Qwen3 text"),
    (
        qwen,
        load_qwen_image,
        lambda short, hub: f"{hub}; 60 double-stream blocks 0-59, Qwen2.5-VL-7B text encoder",
    ),
)

REGISTRY: dict[str, Callable[..., Backend]] = {
    "tiny-sd3": _load_tiny,
    **{tiny.name: tiny.load for tiny in _TINY_MODELS},
    "lava-shapes": load_reference_backend,
}
for _family, _loader, _ in _HUB_FAMILIES:
    for _short, _hub in _family.HUB_IDS.items():
        REGISTRY[_short] = functools.partial(_loader, _hub)


def list_backends() -> list[tuple[str, str, VariantDefaults]]:
    """``(name, what it loads, defaults)`` for every registered backend."""
    rows = [
        (
            "lava-shapes",
            "small SD3-architecture model trained on synthetic shapes, shipped (offline)",
            REFERENCE_DEFAULTS,
        ),
        ("tiny-sd3", "toy SD3 built in code, random weights (offline)", DEFAULTS["tiny-sd3"]),
    ]
    rows += [(tiny.name, tiny.about, tiny.defaults) for tiny in _TINY_MODELS]
    for family, _, about in _HUB_FAMILIES:
        rows += [(short, about(short, hub), family.DEFAULTS[short]) for short, hub in family.HUB_IDS.items()]
    return rows


def load_backend(
    name_or_path: str,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    drop_t5: bool = False,
    offload_text_encoders: bool = False,
    verbose: bool = False,
    **kw: Any,
) -> Backend:
    """A backend from a registry name (``"tiny-sd3"``, ``"sd3-medium"``, ``"flux-dev"``, ``"tiny-flux"``,
    ...), a hub id, or a folder (SD3 or Flux, as its ``model_index.json`` says).

    Args:
        device: ``"cuda"``, ``"cpu"``...; default CUDA when available.
        dtype: default bf16 on CUDA, fp32 on CPU.
        drop_t5: skip the T5 encoder (its part of the text sequence is then zeros).
        offload_text_encoders: keep the text encoders on the CPU; only their outputs move.
        verbose: let diffusers and transformers print while loading (their warnings and
            "Loading weights" bars), as configured. By default they are quiet for the load (and
            restored after it), as under the ``lava`` command without ``--verbose``; hub download
            bars are shown either way.
    """
    opts = dict(
        device=device, dtype=dtype, drop_t5=drop_t5, offload_text_encoders=offload_text_encoders, **kw
    )
    if name_or_path in REGISTRY:
        load = functools.partial(REGISTRY[name_or_path], **opts)
    else:
        path = os.path.expanduser(name_or_path)
        if os.path.isdir(path):
            load = functools.partial(load_pretrained, path, **opts)
        elif name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
            raise ModelError(f"model folder not found: {name_or_path}")
        elif name_or_path.count("/") == 1:  # a hub id: org/name
            load = functools.partial(load_pretrained, name_or_path, **opts)
        else:
            raise ModelError(
                f"unknown model {name_or_path!r}: expected one of {sorted(REGISTRY)}, a hub id such as "
                f"{HUB_IDS['sd3-medium']!r}, or a local folder"
            )
    if verbose:
        return load()
    with library_output(verbose=False):
        return load()

"""Backends found by name: the registry of built-in models, hub ids and local folders.

``lava-shapes`` is registered from ``lava.reference``, which builds on this package's ``Backend``
and ``from_pipeline``; the registry is the one place that knows every model.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import torch

from ..errors import ModelError
from ..reference import REFERENCE_DEFAULTS, load_reference_backend
from . import chroma, flux, flux2, qwen, zimage
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


def _load_tiny_flux(
    *,
    device=None,
    dtype=None,
    drop_t5: bool = False,
    offload_text_encoders: bool = False,
    seed: int = 0,
    max_sequence_length: int = TINY_MAX_SEQUENCE_LENGTH,
    **kw,
) -> Backend:
    refuse_drop_t5("tiny-flux", drop_t5)
    return _tiny_backend(
        build_tiny_flux_pipeline(seed=seed, **kw),
        name="tiny-flux",
        variant="tiny-flux",
        defaults=flux.DEFAULTS["tiny-flux"],
        device=device,
        dtype=dtype,
        offload_text_encoders=offload_text_encoders,
        max_sequence_length=max_sequence_length,
    )


def _load_tiny_chroma(
    *,
    device=None,
    dtype=None,
    drop_t5: bool = False,
    offload_text_encoders: bool = False,
    seed: int = 0,
    max_sequence_length: int = TINY_MAX_SEQUENCE_LENGTH,
    **kw,
) -> Backend:
    if drop_t5:
        raise ModelError("tiny-chroma's text sequence is T5 alone (Chroma has no CLIP): T5 cannot be dropped")
    return _tiny_backend(
        build_tiny_chroma_pipeline(seed=seed, **kw),
        name="tiny-chroma",
        variant="tiny-chroma",
        defaults=chroma.DEFAULTS["tiny-chroma"],
        device=device,
        dtype=dtype,
        offload_text_encoders=offload_text_encoders,
        max_sequence_length=max_sequence_length,
    )


def _load_tiny_flux2(
    *,
    device=None,
    dtype=None,
    drop_t5: bool = False,
    offload_text_encoders: bool = False,
    seed: int = 0,
    max_sequence_length: int = TINY_FLUX2_MAX_SEQUENCE_LENGTH,
    **kw,
) -> Backend:
    if drop_t5:
        raise ModelError("tiny-flux2 is a FLUX.2 model: it has no T5 to drop; leave out --drop-t5 / drop_t5")
    return _tiny_backend(
        build_tiny_flux2_pipeline(seed=seed, **kw),
        name="tiny-flux2",
        variant="tiny-flux2",
        defaults=flux2.DEFAULTS["tiny-flux2"],
        device=device,
        dtype=dtype,
        offload_text_encoders=offload_text_encoders,
        max_sequence_length=max_sequence_length,
    )


def _load_tiny_zimage(
    *,
    device=None,
    dtype=None,
    drop_t5: bool = False,
    offload_text_encoders: bool = False,
    seed: int = 0,
    max_sequence_length: int = TINY_MAX_SEQUENCE_LENGTH,
    **kw,
) -> Backend:
    from .tiny_zimage import build_tiny_zimage_pipeline

    if drop_t5:
        raise ModelError("tiny-zimage's text sequence is its Qwen3 encoder's alone: it cannot be dropped")
    return _tiny_backend(
        build_tiny_zimage_pipeline(seed=seed, **kw),
        name="tiny-zimage",
        variant="tiny-zimage",
        defaults=zimage.DEFAULTS["tiny-zimage"],
        device=device,
        dtype=dtype,
        offload_text_encoders=offload_text_encoders,
        max_sequence_length=max_sequence_length,
    )


def _load_tiny_qwen(
    *,
    device=None,
    dtype=None,
    drop_t5: bool = False,
    offload_text_encoders: bool = False,
    seed: int = 0,
    max_sequence_length: int | None = None,
    **kw,
) -> Backend:
    from .tiny_qwen import TINY_QWEN_MAX_SEQUENCE_LENGTH, build_tiny_qwen_pipeline

    refuse_drop_qwen("tiny-qwen", drop_t5)
    return _tiny_backend(
        build_tiny_qwen_pipeline(seed=seed, **kw),
        name="tiny-qwen",
        variant="tiny-qwen",
        defaults=qwen.DEFAULTS["tiny-qwen"],
        device=device,
        dtype=dtype,
        offload_text_encoders=offload_text_encoders,
        max_sequence_length=max_sequence_length or TINY_QWEN_MAX_SEQUENCE_LENGTH,
    )


REGISTRY: dict[str, Callable[..., Backend]] = {
    "tiny-sd3": _load_tiny,
    "tiny-flux": _load_tiny_flux,
    "tiny-chroma": _load_tiny_chroma,
    "tiny-flux2": _load_tiny_flux2,
    "tiny-qwen": _load_tiny_qwen,
    "tiny-zimage": _load_tiny_zimage,
    "lava-shapes": load_reference_backend,
}


for _short, _hub in HUB_IDS.items():
    REGISTRY[_short] = lambda _hub=_hub, **kw: load_sd3(_hub, **kw)


for _short, _hub in flux.HUB_IDS.items():
    REGISTRY[_short] = lambda _hub=_hub, **kw: load_flux(_hub, **kw)


for _short, _hub in chroma.HUB_IDS.items():
    REGISTRY[_short] = lambda _hub=_hub, **kw: load_chroma(_hub, **kw)


for _short, _hub in flux2.HUB_IDS.items():
    REGISTRY[_short] = lambda _hub=_hub, **kw: load_flux2(_hub, **kw)


for _short, _hub in qwen.HUB_IDS.items():
    REGISTRY[_short] = lambda _hub=_hub, **kw: load_qwen_image(_hub, **kw)


for _short, _hub in zimage.HUB_IDS.items():
    REGISTRY[_short] = lambda _hub=_hub, **kw: load_zimage(_hub, **kw)


def list_backends() -> list[tuple[str, str, VariantDefaults]]:
    """``(name, what it loads, defaults)`` for every registered backend."""
    rows = [
        (
            "lava-shapes",
            "small SD3-architecture model trained on synthetic shapes, shipped (offline)",
            REFERENCE_DEFAULTS,
        )
    ]
    rows.append(("tiny-sd3", "toy SD3 built in code, random weights (offline)", DEFAULTS["tiny-sd3"]))
    rows.append(
        (
            "tiny-flux",
            "toy FLUX.1-dev built in code, random weights (offline); blocks 0-1 double-stream, 2-3 single",
            flux.DEFAULTS["tiny-flux"],
        )
    )
    rows.append(
        (
            "tiny-chroma",
            "toy Chroma1 built in code, random weights (offline); blocks 0-1 double-stream, 2-3 single",
            chroma.DEFAULTS["tiny-chroma"],
        )
    )
    rows.append(
        (
            "tiny-flux2",
            "toy FLUX.2 klein built in code (tiny Qwen3 encoder), random weights (offline); "
            "blocks 0-1 double-stream, 2-3 single",
            flux2.DEFAULTS["tiny-flux2"],
        )
    )
    rows.append(
        (
            "tiny-zimage",
            "toy Z-Image built in code, random weights (offline); blocks 0-3 single-stream, Qwen3 text",
            zimage.DEFAULTS["tiny-zimage"],
        )
    )
    rows.append(
        (
            "tiny-qwen",
            "toy Qwen-Image built in code, random weights (offline); 3 double-stream blocks, "
            "Qwen2.5-VL text behind the pipeline's chat template",
            qwen.DEFAULTS["tiny-qwen"],
        )
    )
    rows += [(short, hub, DEFAULTS[short]) for short, hub in HUB_IDS.items()]
    rows += [
        (short, f"{hub}; blocks 0-18 double-stream, 19-56 single-stream", flux.DEFAULTS[short])
        for short, hub in flux.HUB_IDS.items()
    ]
    rows += [
        (short, f"{hub}; blocks 0-18 double-stream, 19-56 single-stream; T5 only", chroma.DEFAULTS[short])
        for short, hub in chroma.HUB_IDS.items()
    ]
    rows += [
        (short, f"{hub}; {flux2.BLOCK_SCHEME[short]}", flux2.DEFAULTS[short])
        for short, hub in flux2.HUB_IDS.items()
    ]
    rows += [
        (short, f"{hub}; blocks 0-29 single-stream (image+caption), Qwen3 text", zimage.DEFAULTS[short])
        for short, hub in zimage.HUB_IDS.items()
    ]
    rows += [
        (short, f"{hub}; 60 double-stream blocks 0-59, Qwen2.5-VL-7B text encoder", qwen.DEFAULTS[short])
        for short, hub in qwen.HUB_IDS.items()
    ]
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

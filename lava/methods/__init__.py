"""Comparison methods behind lava's harness: MaskCLIP and StableSeg-style UNet cross-attention.

``lava`` (the default method) reads an MM-DiT's joint attention through the five stages
(``lava.backends``). The other methods are *segmenters* (``lava.methods.base.Segmenter``):
backend-like objects that turn an image and class names into ``Heatmaps``; from there on they
share lava's mask stage, refinements, evaluation protocols, journal, sharding and reports.

    seg = lava.methods.load_segmenter("maskclip", "clip-vit-b16")
    result = lava.segment("photo.jpg", ["cat", "sofa"], backend=seg)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..errors import ModelError
from .base import Segmenter, is_segmenter

METHODS = ("lava", "maskclip", "stableseg")

# The model each method uses when none is named (the published settings' models).
DEFAULT_MODELS = {"maskclip": "clip-vit-b16", "stableseg": "sd1.5"}


def _maskclip(model: str, **kw) -> Segmenter:
    if model == "tiny-clip":
        from .tiny import load_tiny_clip

        return load_tiny_clip(**kw)
    from .maskclip import load_maskclip

    return load_maskclip(model, **kw)


def _stableseg(model: str, **kw) -> Segmenter:
    if model == "tiny-sd15":
        from .tiny import load_tiny_sd15

        return load_tiny_sd15(**kw)
    from .stableseg import load_stableseg

    return load_stableseg(model, **kw)


_LOADERS: dict[str, Callable[..., Segmenter]] = {"maskclip": _maskclip, "stableseg": _stableseg}


def load_segmenter(method: str, model: str | None = None, **kw: Any) -> Segmenter:
    """The segmenter of ``method`` (``"maskclip"`` or ``"stableseg"``) over ``model``: a short
    name (``clip-vit-b16``, ``tiny-clip``; ``sd1.5``, ``sd2.1-base``, ``tiny-sd15``), a hub id
    or a local folder. ``device``/``dtype`` as for ``lava.load_backend``."""
    if method not in _LOADERS:
        raise ModelError(
            f"unknown method {method!r}: expected one of {METHODS} ('lava' loads through lava.load_backend)"
        )
    return _LOADERS[method](model or DEFAULT_MODELS[method], **kw)


def list_segmenters() -> list[tuple[str, str, str, Any]]:
    """``(method, model name, what it loads, VariantDefaults)`` for the comparison methods' named
    models (``lava models`` prints them). Any CLIP / SD 1.x-2.x hub id or folder also loads."""
    from .maskclip import DEFAULTS as MASKCLIP_DEFAULTS
    from .maskclip import HUB_IDS as CLIP_IDS
    from .stableseg import HUB_IDS as SD_IDS
    from .stableseg import defaults_for
    from .tiny import TOY_SOURCE, tiny_clip_defaults

    rows = [("maskclip", name, hub, MASKCLIP_DEFAULTS) for name, hub in CLIP_IDS.items()]
    toy = "built in code, random weights (offline)"
    rows.append(("maskclip", "tiny-clip", f"toy CLIP {toy}", tiny_clip_defaults()))
    rows += [("stableseg", name, hub, defaults_for(16, 512)) for name, hub in SD_IDS.items()]
    rows.append(("stableseg", "tiny-sd15", f"toy SD 1.5 {toy}", defaults_for(4, 32, TOY_SOURCE)))
    return rows


__all__ = ["DEFAULT_MODELS", "METHODS", "Segmenter", "is_segmenter", "list_segmenters", "load_segmenter"]

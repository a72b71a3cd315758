"""Backends found by name: a registry name, a hub id, a local folder, or a loaded pipeline.

``base`` (``Backend``), ``family`` (one adapter per MM-DiT family), ``sd3``/``flux`` (variants and
their defaults) and ``tiny`` (toy models built in code) are the parts; ``wrap`` turns a loaded
pipeline into a ``Backend``, ``pretrained`` loads one from the hub or a folder, ``loading`` reads
weights tensor by tensor, and ``registry`` finds a model by name (``load_backend``).

The names below are imported from their modules on first use (PEP 562): importing one part, as
the stages and ``lava.reference`` do, loads no other.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_exports as _lazy_exports

_EXPORTS = {
    "Backend": "base",
    "HEAVY_MODULES": "pretrained",
    "REGISTRY": "registry",
    "VariantDefaults": "base",
    "from_pipeline": "wrap",
    "lacks_t5": "pretrained",
    "list_backends": "registry",
    "load_backend": "registry",
    "load_error_message": "pretrained",
    "model_index": "pretrained",
    "place": "wrap",
    "text_dtype": "wrap",
}
_SUBMODULES = (
    "base",
    "chroma",
    "families",
    "family",
    "flux",
    "flux2",
    "flux2_sizes",
    "loading",
    "pretrained",
    "qwen",
    "registry",
    "sd3",
    "tiny",
    "tiny_chroma",
    "tiny_flux2",
    "tiny_qwen",
    "tiny_zimage",
    "tokens",
    "wrap",
    "zimage",
)

__all__ = [
    "REGISTRY",
    "Backend",
    "VariantDefaults",
    "from_pipeline",
    "list_backends",
    "load_backend",
    "place",
]

__getattr__, __dir__ = _lazy_exports(__name__, _EXPORTS, globals(), _SUBMODULES)

if TYPE_CHECKING:
    from .base import Backend, VariantDefaults
    from .registry import REGISTRY, list_backends, load_backend
    from .wrap import from_pipeline, place

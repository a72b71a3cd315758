"""Every family adapter, and the one function that picks a loaded transformer's.

A new family is one module with its adapter (a ``lava.backends.family.Family``) and one entry in
``FAMILIES``; nothing else in the capture, the stages or the CLI branches on the family.
"""

from __future__ import annotations

from ..errors import LavaError
from .chroma import CHROMA
from .family import FLUX, SD3, Family
from .flux2 import FLUX2
from .qwen import QWEN
from .zimage import ZIMAGE

# Matched by the transformer's class name first, in this order; then by structure, for models
# that subclass or copy diffusers' classes (a Flux-like model has single-stream blocks).
FAMILIES: tuple[Family, ...] = (CHROMA, FLUX2, QWEN, ZIMAGE, SD3, FLUX)


def family_of(transformer) -> Family:
    """The adapter of a loaded transformer: by its class (or a base class) name, else its structure."""
    names = {cls.__name__ for cls in type(transformer).__mro__}
    for family in FAMILIES:
        if names & set(family.transformer_classes):
            return family
    if hasattr(transformer, "single_transformer_blocks"):
        return FLUX
    if hasattr(transformer, "transformer_blocks"):
        return SD3
    known = ", ".join(c for f in FAMILIES for c in f.transformer_classes)
    raise LavaError(
        f"{type(transformer).__name__} is not an MM-DiT lava knows: expected one of {known} "
        "(or a model with transformer_blocks)"
    )


def family_named(class_name: str) -> Family | None:
    """The adapter that reads transformers of the diffusers class ``class_name`` (from a config's
    ``_class_name``, before anything is built), or ``None``."""
    for family in FAMILIES:
        if class_name in family.transformer_classes:
            return family
    return None

"""What every comparison method offers the shared harness, and the steps they share.

A *segmenter* is a backend-like object for a method that is not lava's MM-DiT attention
(``maskclip``, ``stableseg``). It carries ``name``, ``variant``, ``method``, ``defaults``
(``VariantDefaults``: the timestep and layers it reads, its resolution and mask settings, with
their source), ``device``, ``dtype`` and ``info``, checks ``timestep``/``layers`` like a
``Backend``, and turns one image and a class list into one ``Heatmaps`` per group of layers::

    segmenter.heatmaps(image, classes, timestep=t, layer_groups=[(0,), (0, 1)], ...) -> [Heatmaps, ...]

Everything after the heatmaps (refinement, ``lava.stages.mask.to_mask``, dataset ids, confusion
counts, journal, reports) is the same code lava's own method runs through.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from PIL import Image

from ..stages.aggregate import normalize_scores, peak_presence
from ..types import Heatmaps


@runtime_checkable
class Segmenter(Protocol):
    """The interface ``lava.methods`` segmenters share (see the module docstring)."""

    method: str
    name: str
    variant: str
    device: torch.device
    dtype: torch.dtype
    info: dict[str, Any]

    @property
    def defaults(self): ...

    def check_timestep(self, timestep: float) -> None: ...

    def check_layers(self, layers: Sequence[int]) -> tuple[int, ...]: ...

    def heatmaps(
        self,
        image: Image.Image,
        classes: Sequence[str],
        *,
        timestep: float,
        layer_groups: Sequence[tuple[int, ...]],
        normalize: str,
        seed: int = 0,
        resolution: int | str | None = None,
        template: str = "{}",
        separator: str = " ",
        max_classes_per_prompt: int | None = None,
    ) -> list[Heatmaps]: ...

    def prediction_settings(self) -> dict[str, Any]: ...

    def describe(self) -> str: ...


# Options (``lava.options``) only lava's own reading of MM-DiT attention has: a segmenter refuses
# them rather than ignore them.
LAVA_ONLY = ("sigma", "direction", "softmax", "heads", "impl", "source", "prompt_batch", "tokens", "presence")


def is_segmenter(obj: Any) -> bool:
    """Whether ``obj`` is a comparison-method segmenter (not a lava ``Backend``)."""
    return isinstance(getattr(obj, "method", None), str) and callable(getattr(obj, "heatmaps", None))


def refuse_lava_options(method: str, changed: Sequence[str], refine) -> None:
    """Refuse, for comparison method ``method``, the options only lava's own reading has: the
    ``changed`` reading options (they would be ignored) and a propagation step (it needs the
    MM-DiT's own image attention, which a segmenter keeps none of)."""
    from ..errors import LavaError
    from ..stages.refine import split_refine

    if changed:
        raise LavaError(
            f"{', '.join(changed)} choose how lava reads MM-DiT attention; method {method} has no "
            "such choice: leave them at their defaults"
        )
    if split_refine(refine)[0]:
        raise LavaError(
            f"refine propagate uses the MM-DiT's own image attention; method {method} keeps none: "
            "refine with pamr only"
        )


def to_heatmaps(scores: torch.Tensor, classes: Sequence[str], image: Image.Image, normalize: str) -> Heatmaps:
    """One image's raw class scores ``[C, h, w]`` → ``Heatmaps`` ``[1, C, h, w]``, normalised as
    lava's aggregate stage does, with the presence taken before normalisation (as there)."""
    raw = scores[None].float()
    return Heatmaps(
        scores=normalize_scores(raw, normalize).float(),
        classes=tuple(classes),
        image_sizes=((image.height, image.width),),
        normalize=normalize,
        presence=peak_presence(raw).float(),
    )

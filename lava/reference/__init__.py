"""``lava-shapes``: a small SD3-architecture MM-DiT trained by lava on synthetic shape scenes.

It ships inside the package (``lava/assets/lava-shapes``, a few MB of fp16 safetensors) so that
attention segmentation can be run, tested and measured offline, on a CPU, with real trained
weights. ``lava.load_backend("lava-shapes")`` loads it. See ``docs/reference-model.md``.

Importing this module is cheap (``list_backends`` reads ``REFERENCE_DEFAULTS``); torch modules
are only built by ``load_reference_backend``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ..backends.base import Backend, VariantDefaults, resolve_device, resolve_dtype
from ..backends.pretrained import load_sd3
from ..backends.wrap import from_pipeline
from ..errors import ModelError

__all__ = ["BACKGROUND_THRESHOLD", "REFERENCE_DEFAULTS", "load_reference_backend"]

# lava-shapes v2 (a VAE in front of the MM-DiT, docs/reference-model.md). Where to read:
# ``python -m scripts.sweep --tune --scenes 60 --timesteps 25,50,100,200`` on tuning scenes: block 2
# of 4 reads both vocabularies best (t = 25, 50 and 100 within 0.01). How to mask:
# ``python -m scripts.measure --tune`` ranks normalisation × background threshold × presence rule and
# floor × refinement by mean mIoU over both held-out splits and both protocols, on tuning scenes the
# reported tables do not use (docs/open-vocabulary.md).
REFERENCE_DEFAULTS = VariantDefaults(
    timestep=50.0,
    layers=(2,),
    resolution=64,
    source="measured by scripts.sweep on 60 held-out tuning scenes: block 2, t=50",
    normalize="minmax",
    background_threshold=0.2,
    min_presence=0.3,
    mask_source=(
        "measured by scripts.measure --tune on held-out tuning scenes, both protocols: per-class "
        "min-max, background below 0.2, classes whose map peaks below 0.3 of the strongest dropped, "
        "maps refined by PAMR; one prompt per class (scripts.measure --targets --tune, issue #20)"
    ),
    refine="pamr",
    # measure --tune with presence=peak,null on the v2 weights: the peak rule ranked first (the
    # filler-token rule, the first model's default, ranked below it in every cell).
    presence="peak",
    # One prompt per class name (issue #20, docs/open-vocabulary.md): in a shared prompt the causal
    # text encoder mixes each name with the names before it, so absent and unknown names draw the
    # present objects' attention. On 100 tuning scenes per split (``python -m scripts.measure
    # --targets --tune --scenes 100 --settings before-20,split-1-presence-0.5,split-1-presence-0.3``) all 12
    # names rose 0.362 -> 0.486 (standard) and 0.332 -> 0.492 (hard), 12 names + 28 unseen words
    # 0.317 -> 0.481 and 0.258 -> 0.465, present names 0.898 -> 0.884 and 0.793 -> 0.791, with the
    # presence floor lowered from 0.5 to 0.3 (at 0.5 present names fell to 0.861 / 0.747).
    max_classes_per_prompt=1,
)
# Background is a threshold on the min-max normalised maps (``MaskConfig(background_threshold=…)``):
# a class named "background" in the prompt localises worse in this model (sweep.py measures both).
BACKGROUND_THRESHOLD = REFERENCE_DEFAULTS.background_threshold


def load_reference_backend(
    *,
    device=None,
    dtype=None,
    drop_t5: bool = False,
    offload_text_encoders: bool = False,
    path=None,
    **kw,
) -> Backend:
    """The shipped ``lava-shapes`` model as a ``Backend`` (CPU and fp32 unless asked otherwise).

    ``drop_t5`` is accepted for interface parity and changes nothing: the model has no T5 (its
    T5 slots are always zeros). ``path`` loads weights from another folder written by
    ``python -m scripts.train --out PATH``.
    """
    from .model import ASSET_DIR, load_pipeline, read_config

    if kw:
        raise ModelError(f"lava-shapes takes no options {sorted(kw)}")
    del drop_t5  # no T5 to drop
    folder = Path(path or ASSET_DIR)
    dev = resolve_device(device if device is not None else "cpu")
    dt = resolve_dtype(dtype or "float32", dev)
    config, _ = read_config(folder)
    # A model trained at another size (``--resolution``) reads images at its own size.
    defaults = dataclasses.replace(REFERENCE_DEFAULTS, resolution=config.resolution)
    if (folder / "model_index.json").is_file():  # a stock SD3 folder: loaded like any other
        backend = load_sd3(
            str(folder),
            device=dev,
            dtype=dt,
            offload_text_encoders=offload_text_encoders,
            max_sequence_length=config.t5_tokens,
        )
        backend.name, backend.defaults = "lava-shapes", defaults
        backend.info.pop("no_t5", None)  # by design: its T5 slots are zeros
    else:  # the first model's folder layout (pixel space, no model_index.json)
        backend = from_pipeline(
            load_pipeline(folder),
            name="lava-shapes",
            device=dev,
            dtype=dt,
            offload_text_encoders=offload_text_encoders,
            max_sequence_length=config.t5_tokens,
            defaults=defaults,
        )
    backend.variant = "lava-shapes"
    backend.info["weights"] = str(folder)
    return backend

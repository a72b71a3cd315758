"""Configuration as values: what a call reads, and the one function that defaults it from the model.

A ``Recipe`` is everything that turns a prompt and images into labels besides the model: the
``Reading`` (when and where the attention is read, from which view), the ``AggregateConfig``,
the refinement chain and the ``MaskConfig``. ``recipe(backend, ...)`` builds one from the
options given (``lava.options`` declares each once) and fills everything not given from the
backend's defaults (``VariantDefaults``, see ``lava models``): ``None`` means the model's own
value, a background threshold or presence floor of ``0`` turns it off. ``lava.segment``,
``lava eval``/``sweep``, the explorer, the comparison methods and the measurement scripts all
resolve their settings here, so a setting means the same everywhere.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import LavaError
from .methods.base import LAVA_ONLY, is_segmenter, refuse_lava_options
from .options import (
    AGGREGATE,
    IMAGE_TO_TEXT,
    JOINT,
    MASK,
    OPTIONS,
    PROMPT,
    READING,
    REFINE,
    options_of,
    unknown_options,
)
from .stages.capture import check_source
from .stages.mask import check_background_class
from .stages.refine import RefineStep, refine_name, refine_steps, resolve_refine
from .types import AggregateConfig, MaskConfig


@dataclass(frozen=True)
class Reading:
    """Where and how one call reads the attention.

    ``timesteps``: the model timesteps read (several: an ensemble whose maps are averaged;
    ``None``: the model's one timestep); ``sigma`` instead of a timestep; ``seeds``: the noise
    seeds (several: an ensemble); every timestep runs with every seed, one forward each.
    ``layers``: the blocks read and averaged (``None``: the model's). ``resolution``: see
    ``lava.noise``. ``direction``/``softmax``/``heads``/``impl``: the attention slice
    (``lava.kernels``); ``source``: attention probabilities or the concept view;
    ``prompt_batch``: prompt rows per forward (memory, not results).
    """

    timesteps: tuple[float, ...] | None = None
    sigma: float | None = None
    seeds: tuple[int, ...] = (0,)
    layers: tuple[int, ...] | None = None
    resolution: int | str | None = None
    direction: str = IMAGE_TO_TEXT
    softmax: str = JOINT
    heads: str = "mean"
    impl: str = "auto"
    source: str = "attention"
    prompt_batch: int | None = None

    def __post_init__(self) -> None:
        for name in ("direction", "softmax", "heads", "impl", "source"):
            try:
                OPTIONS[name].check(getattr(self, name))
            except ValueError as err:
                raise LavaError(str(err)) from None
        check_source(self.source, [self.view])
        if not self.seeds or (self.timesteps is not None and not self.timesteps):
            raise LavaError(
                f"timesteps and seeds need at least one value each, got timesteps={self.timesteps} "
                f"seeds={self.seeds}"
            )
        if self.timesteps is not None and self.sigma is not None:
            raise LavaError("give timesteps or sigma, not both")

    @property
    def view(self) -> tuple[str, str]:
        return (self.direction, self.softmax)

    @property
    def runs(self) -> list[tuple[float | None, int]]:
        """The ``(timestep, seed)`` of each forward: every timestep with every seed, timestep-major
        (``None``: the model's timestep, or ``sigma``)."""
        times = self.timesteps if self.timesteps is not None else (None,)
        return [(t, s) for t in times for s in self.seeds]


@dataclass(frozen=True)
class PromptConfig:
    """How the class names are put into prompts (``lava.encode_prompt``)."""

    template: str = "{}"
    separator: str = " "
    max_classes_per_prompt: int | None = None


@dataclass(frozen=True)
class Recipe:
    """Everything besides the model that decides a prediction (see the module docstring).

    ``refine`` is the chain of refinement steps, in order (``()``: none; ``refine_label`` names it).
    """

    reading: Reading = field(default_factory=Reading)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    aggregate: AggregateConfig = field(default_factory=AggregateConfig)
    refine: tuple[RefineStep, ...] = ()
    mask: MaskConfig = field(default_factory=MaskConfig)

    @property
    def refine_label(self) -> str | None:
        """The chain as recorded and shown (``"pamr"``, ``"propagate,pamr"``; ``None``: no step)."""
        return refine_name(self.refine)

    def replace(self, **changes: Any) -> Recipe:
        """A copy with options changed by name (``recipe.replace(layers=(3,), refine="none")``);
        here ``refine=None`` also means no refinement (there is no model to take a default from)."""
        parts: dict[str, dict[str, Any]] = {}
        for name, value in changes.items():
            if name not in OPTIONS:
                raise LavaError(f"unknown option {name!r}; options are {', '.join(OPTIONS)}")
            parts.setdefault(OPTIONS[name].target, {})[name] = value
        out = self
        for target, values in parts.items():
            if target == REFINE:
                out = dataclasses.replace(out, refine=refine_steps(values["refine"]))
                continue
            if target == READING:
                values = _ensemble(values)
            part = {READING: "reading", PROMPT: "prompt", AGGREGATE: "aggregate", MASK: "mask"}[target]
            out = dataclasses.replace(out, **{part: dataclasses.replace(getattr(out, part), **values)})
        return out


def _check_unit(name: str, value: float | None) -> None:
    if value is not None and (math.isnan(value) or not 0.0 <= value <= 1.0):
        raise LavaError(f"{name} must be between 0 and 1 (scores are normalised to [0, 1]), got {value!r}")


def _ensemble(values: Mapping[str, Any]) -> dict[str, Any]:
    """``timestep``/``seed`` (one) and ``timesteps``/``seeds`` (an ensemble) as Reading fields."""
    timestep, timesteps = values.pop("timestep", None), values.pop("timesteps", None)
    seed, seeds = values.pop("seed", None), values.pop("seeds", None)
    if timesteps is not None and (timestep is not None or values.get("sigma") is not None):
        which = "timestep" if timestep is not None else "sigma"
        raise LavaError(f"give timesteps=[...] or {which}=..., not both (timestep=t is timesteps=[t])")
    if seeds is not None and seed is not None:
        raise LavaError("give seeds=[...] or seed=..., not both (seed=s is seeds=[s])")
    out = dict(values)
    if timesteps is not None or timestep is not None:
        out["timesteps"] = tuple(float(t) for t in (timesteps if timesteps is not None else [timestep]))
    if seeds is not None or seed is not None:
        out["seeds"] = tuple(int(s) for s in (seeds if seeds is not None else [seed]))
    if out.get("layers") is not None:
        out["layers"] = tuple(int(b) for b in out["layers"])
    return out


def recipe(
    backend,
    *,
    reading: Reading | None = None,
    aggregate_config: AggregateConfig | None = None,
    mask_config: MaskConfig | None = None,
    classes: Sequence[str] | None = None,
    **options: Any,
) -> Recipe:
    """The ``Recipe`` of a call: the options given (keywords of ``lava.options.OPTIONS``), else the
    configs given, else ``backend.defaults``. The result is complete: timesteps and layers name
    the model's own (layers checked against its blocks), refinement and mask settings are the
    values in force.

    ``classes`` (the names to segment) settle the background: a class named like the
    background label and a threshold cannot both label pixels "background", so a threshold asked
    for is refused (``ClassNameError``) and one that is only the model's default gives way.
    """
    unknown = unknown_options(options)
    if unknown:
        raise LavaError(f"unknown option(s) {', '.join(map(repr, unknown))}; lava reads {', '.join(OPTIONS)}")
    given = {k: v for k, v in options.items() if v is not None}
    for name, value in given.items():
        try:
            OPTIONS[name].check(value)
        except ValueError as err:
            raise LavaError(str(err)) from None
    d = backend.defaults

    def picked(target: str) -> dict[str, Any]:
        return {o.name: given[o.name] for o in options_of(target) if o.name in given}

    values = _ensemble(picked(READING))
    base = reading or Reading()
    read = dataclasses.replace(base, **values)
    if read.timesteps is None and read.sigma is None:
        read = dataclasses.replace(read, timesteps=(float(d.timestep),))
    read = dataclasses.replace(
        read, layers=tuple(backend.check_layers(read.layers if read.layers is not None else d.layers))
    )
    for t in read.timesteps or ():
        backend.check_timestep(t)

    # The model's prompt layout unless one is given (0 names per prompt: as many as fit).
    prompt = PromptConfig(**{"max_classes_per_prompt": d.max_classes_per_prompt, **picked(PROMPT)})

    agg = aggregate_config or AggregateConfig.for_model(d)
    agg = dataclasses.replace(agg, **picked(AGGREGATE))

    # A refinement may be given as a name, a chain or step objects (``PAMR(size=128)``).
    refine = refine_steps(resolve_refine(options.get("refine"), d.refine))
    if is_segmenter(backend):
        changed = [n for n in LAVA_ONLY if n in given and given[n] != OPTIONS[n].default]
        if agg.tokens != "all" and "tokens" not in changed:
            changed.append("tokens")
        refuse_lava_options(backend.method, changed, refine)

    _check_unit("background_threshold", given.get("background_threshold"))
    _check_unit("min_presence", given.get("min_presence"))
    # The model's default threshold gives way to a class named "background" (MaskConfig.for_model);
    # one asked for (a keyword or a config) is refused together with such a class.
    mask = mask_config or MaskConfig.for_model(d, classes or ())
    for name in ("background_threshold", "min_presence"):
        if name in given:  # 0 turns it off
            mask = dataclasses.replace(mask, **{name: given[name] or None})
    _check_unit("background_threshold", mask.background_threshold)
    _check_unit("min_presence", mask.min_presence)
    if classes is not None:
        check_background_class(classes, mask.background_threshold, mask.background_name)
    return Recipe(reading=read, prompt=prompt, aggregate=agg, refine=refine, mask=mask)

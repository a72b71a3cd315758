"""Every option that decides a prediction, declared once: its keyword, CLI flag, help and choices.

``lava.segment``'s keywords, the ``lava segment``/``eval``/``sweep`` flags, the explorer's choices
and the presets all read these declarations, so an option's name, meaning and allowed values
live in one place. ``lava.config.recipe`` turns the values given (``None``: the model's own
default, see ``lava models``; ``0`` turns a threshold off) into the stage configs.

Nothing here imports torch: ``lava --help`` builds its parser from this module.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

# ---- the values an option may take ---------------------------------------------------------------

IMAGE_TO_TEXT, TEXT_TO_IMAGE = "image_to_text", "text_to_image"
DIRECTIONS = (IMAGE_TO_TEXT, TEXT_TO_IMAGE)
JOINT, CROSS = "joint", "cross"
SOFTMAX_DOMAINS = (JOINT, CROSS)
# The view every default reading uses: image queries over text keys, softmax over all joint keys.
DEFAULT_VIEW = (IMAGE_TO_TEXT, JOINT)
HEAD_REDUCTIONS = ("mean", "none")
SOURCES = ("attention", "concept")
IMPLEMENTATIONS = ("auto", "naive", "torch", "triton")
TOKEN_PARTS = ("all", "clip", "t5")
NORMALIZATIONS = ("minmax", "global", "classes", "none")
PRESENCE_RULES = ("peak", "null")
REFINE_METHODS = ("propagate", "pamr")
NO_REFINE = "none"

# Which config an option sets (``lava.config.Recipe``'s parts and the prompt).
READING, PROMPT, AGGREGATE, REFINE, MASK = "reading", "prompt", "aggregate", "refine", "mask"


# ---- parsing text (the CLI's flags, the explorer's boxes) ----------------------------------------


def number_list(cast: Callable[[str], Any], example: str) -> Callable[[str], list]:
    """A parser of comma-separated numbers, e.g. ``9,10`` or ``200,500,800``."""

    def parse(text: str) -> list:
        try:
            return [cast(x) for x in str(text).split(",") if x.strip()]
        except ValueError:
            raise ValueError(f"expected comma-separated numbers like {example}, got {text!r}") from None

    return parse


int_list = number_list(int, "9,10")
float_list = number_list(float, "200,500,800")


def unit_interval(text: str) -> float:
    """A number in [0, 1] (thresholds on normalised scores)."""
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"expected a number between 0 and 1, got {text!r}") from None
    if math.isnan(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"expected a number between 0 and 1 (scores are normalised to [0, 1]), got {text!r}")
    return value


def stretch_size(resolution: object) -> tuple[int, int] | None:
    """``(H, W)`` of a ``"WxH"`` resolution (e.g. ``"1024x1024"``: every image stretched to that
    size, aspect ratio not kept, as Seg4Diff feeds SD3), or ``None`` for any other value."""
    if not isinstance(resolution, str):
        return None
    w, x, h = resolution.lower().partition("x")
    if not (x and w.isdigit() and h.isdigit() and int(w) > 0 and int(h) > 0):
        return None
    return int(h), int(w)


def resolution(text: str) -> int | str | None:
    """``native`` (None), ``original``, a number of pixels, or ``WxH`` (stretched to that size)."""
    if text in ("native", "original"):
        return None if text == "native" else text
    stretched = stretch_size(text)
    if stretched is not None:
        return f"{stretched[1]}x{stretched[0]}"  # every image stretched to W x H px (aspect not kept)
    try:
        value = int(text)
    except ValueError:
        raise ValueError(
            f"expected a number of pixels, 'native', 'original' or WxH like 1024x1024, got {text!r}"
        ) from None
    if value <= 0:
        raise ValueError(f"resolution must be positive, got {value}")
    return value


def refine_order_error(names: Sequence[str]) -> str | None:
    """Why the refine steps ``names`` cannot run in that order, or ``None``: propagation works on
    the token grid, which PAMR leaves, so no ``propagate`` may follow a ``pamr``."""
    names = list(names)
    if "pamr" in names and "propagate" in names[names.index("pamr") :]:
        return (
            f"refine chain {','.join(names)!r}: 'propagate' must come before "
            "'pamr' (propagation works on the token grid, PAMR leaves it)"
        )
    return None


def refine_chain(text: str) -> str:
    """A refinement or a comma-separated chain of them (``propagate,pamr``), or ``none``."""
    if text.strip() == NO_REFINE:
        return NO_REFINE
    steps = [m.strip() for m in text.split(",")]
    unknown = [m for m in steps if m not in REFINE_METHODS]
    if unknown:
        raise ValueError(
            f"unknown refinement {unknown[0]!r}: expected one of {', '.join(REFINE_METHODS)}, or a "
            "comma-separated chain such as propagate,pamr"
        )
    error = refine_order_error(steps)
    if error is not None:
        raise ValueError(error)
    return ",".join(steps)


# ---- the declarations ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Option:
    """One option: ``name`` is the Python keyword and the CLI destination, ``target`` the config it
    sets, ``flag`` its command-line spelling (``None``: Python only), ``parse`` turns the flag's
    text into the value (raising ``ValueError`` with the reason), ``choices`` the allowed values.
    ``default`` is the value meaning "not given" (``None``: the model's own default)."""

    name: str
    target: str
    help: str
    flag: str | None = None
    choices: tuple[str, ...] | None = None
    parse: Callable[[str], Any] | None = None
    metavar: str | None = None
    default: Any = None

    def check(self, value: Any) -> None:
        """Refuse a value outside ``choices`` (``ValueError`` naming the option and the choices)."""
        if self.choices is not None and value is not None and value not in self.choices:
            raise ValueError(f"{self.name} must be one of {', '.join(self.choices)}, got {value!r}")


_MODELS = "the model's, see `lava models`"

_DECLARED = (
    Option(
        "timestep",
        READING,
        f"model timestep in [0, 1000) to read (default: {_MODELS})",
        "--timestep",
        parse=float,
    ),
    Option("sigma", READING, "noise level σ in [0, 1) instead of --timestep", "--sigma", parse=float),
    Option(
        "timesteps",
        READING,
        "an ensemble instead of --timestep: the class maps read at each timestep (one forward each) are "
        "averaged before labelling, e.g. 300,500,700",
        "--timesteps",
        parse=float_list,
        metavar="T1,T2,...",
    ),
    Option("seed", READING, "noise seed (default: 0)", "--seed", parse=int),
    Option(
        "seeds",
        READING,
        "an ensemble over noise seeds instead of --seed: the class maps of each seed (one forward each) "
        "are averaged before labelling (ConceptAttention averages 5)",
        "--seeds",
        parse=number_list(int, "0,1,2"),
        metavar="S1,S2,...",
    ),
    Option(
        "layers",
        READING,
        "transformer blocks to read and average, e.g. 9 or 8,9,10; negative numbers count from the last "
        f"block (-1 = the last) (default: {_MODELS})",
        "--layers",
        parse=int_list,
        metavar="B1,B2,...",
    ),
    Option(
        "resolution",
        READING,
        "long image side fed to the model in px, 'native' (default), 'original', or WxH such as 1024x1024 "
        "(every image stretched to that size, aspect not kept, as Seg4Diff does); sides are rounded to "
        "the model's token grid (multiples of 16 px for SD3: 1020 becomes 1024)",
        "--resolution",
        parse=resolution,
    ),
    Option(
        "direction",
        READING,
        "image_to_text: image patches attending to class tokens (default); text_to_image: the reverse",
        "--direction",
        choices=DIRECTIONS,
        default=IMAGE_TO_TEXT,
    ),
    Option(
        "softmax",
        READING,
        "joint: normalised over all keys as the model does (default); cross: over the other modality only",
        "--softmax",
        choices=SOFTMAX_DOMAINS,
        default=JOINT,
    ),
    Option(
        "heads",
        READING,
        "mean: heads averaged (default); none: every head kept",
        None,
        choices=HEAD_REDUCTIONS,
        default="mean",
    ),
    Option(
        "impl",
        READING,
        "attention-slice implementation (default: auto: triton on CUDA, torch elsewhere)",
        "--attention-impl",
        choices=IMPLEMENTATIONS,
        default="auto",
    ),
    Option(
        "source",
        READING,
        "attention: the image<->text attention probabilities (default); concept: the concept view, each "
        "class's tokens copied into a stream the image never sees, map = image attention outputs . "
        "concept attention outputs, softmaxed over the classes (ConceptAttention; uses the default "
        "--direction/--softmax)",
        "--source",
        choices=SOURCES,
        default="attention",
    ),
    Option(
        "prompt_batch",
        READING,
        "prompts per forward pass when the classes span several prompts (default: all; lower it to save "
        "memory)",
        "--prompt-batch",
        parse=int,
        metavar="N",
    ),
    Option(
        "template",
        PROMPT,
        "how the class list is worded: {} stands for the joined names (default: {})",
        None,
        default="{}",
    ),
    Option(
        "separator", PROMPT, "what joins the class names in a prompt (default: one space)", None, default=" "
    ),
    Option(
        "max_classes_per_prompt",
        PROMPT,
        "put at most N class names in one prompt; 0: as many as fit the text window (default: the "
        "model's, see `lava models`: 1 for lava-shapes, as many as fit elsewhere; longer class lists are "
        "always split into several prompts, run as one batch)",
        "--max-classes-per-prompt",
        parse=int,
        metavar="N",
    ),
    Option(
        "tokens",
        AGGREGATE,
        "which part of each class's tokens to average (default: all)",
        "--tokens",
        choices=TOKEN_PARTS,
        default="all",
    ),
    Option(
        "normalize",
        AGGREGATE,
        "score normalisation: minmax per class, global over all classes of an image, classes per pixel, "
        f"or none (default: {_MODELS})",
        "--normalize",
        choices=NORMALIZATIONS,
    ),
    Option(
        "presence",
        AGGREGATE,
        "how --min-presence judges a class: peak (its map's peak against the strongest class's) or null "
        "(1 where its tokens draw more attention than the prompt's filler tokens somewhere, else 0) "
        f"(default: {_MODELS})",
        "--presence",
        choices=PRESENCE_RULES,
    ),
    Option(
        "refine",
        REFINE,
        "refine the class maps before labelling, in the order given: 'propagate' (spread them along the "
        "captured blocks' own image-to-image attention, on the token grid), 'pamr' (pixel-adaptive mask "
        "refinement with the image colours, on a grid 4x the token grid, longer side <= 256 px), or the "
        "chain 'propagate,pamr'; 'none' turns the model's default off; see docs/method.md. Default: the "
        "model's (`lava models`; pamr for lava-shapes, none elsewhere)",
        "--refine",
        parse=refine_chain,
        metavar="METHOD[,METHOD]",
    ),
    Option(
        "background_threshold",
        MASK,
        "label pixels whose best normalised score is below this (in [0, 1]) as background (label 0); 0 "
        f"labels no pixel background (default: {_MODELS})",
        "--background-threshold",
        parse=unit_interval,
    ),
    Option(
        "min_presence",
        MASK,
        "a class whose presence (see --presence) in an image is below P (in [0, 1]) takes no pixels there; "
        f"0 lets every class compete (default: {_MODELS})",
        "--min-presence",
        parse=unit_interval,
        metavar="P",
    ),
)

OPTIONS: Mapping[str, Option] = MappingProxyType({o.name: o for o in _DECLARED})


def options_of(*targets: str) -> tuple[Option, ...]:
    """The declared options that set any of ``targets``, in declaration order."""
    return tuple(o for o in _DECLARED if o.target in targets)


def unknown_options(names) -> list[str]:
    """The names in ``names`` that are not declared options."""
    return [n for n in names if n not in OPTIONS]

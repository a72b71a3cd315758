"""The options the ``lava`` commands share: argument types, the flags of the declared options
(``lava.options``), the model, reading and dataset option groups, and the checks of option
combinations made before any model loads.

Nothing here imports torch, diffusers, transformers or matplotlib at module level: the parser is
built from these helpers, and ``lava --help`` must stay fast.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from .. import options
from ..errors import LavaError
from ..presets import PRESETS

DEFAULT_MODEL = "lava-shapes"
# --method values (lava.evaluation.runner.METHODS, spelled out here: the parser imports no torch)
# and the model each comparison method loads when --model is not given.
METHODS = ("lava", "maskclip", "stableseg")
METHOD_MODELS = {"maskclip": "clip-vit-b16", "stableseg": "sd1.5"}
# Models built in code with random weights, for tests: their masks mean nothing.
RANDOM_MODELS = (
    "tiny-sd3",
    "tiny-flux",
    "tiny-chroma",
    "tiny-flux2",
    "tiny-qwen-image",
    "tiny-z-image",
    "tiny-clip",
    "tiny-sd15",
)


def arg_type(parse):
    """An argparse type from a ``lava.options`` parser: its ``ValueError`` becomes the error shown."""

    def convert(text: str):
        try:
            return parse(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    convert.__name__ = getattr(parse, "__name__", "value")
    return convert


int_list = arg_type(options.int_list)
float_list = arg_type(options.float_list)
unit_interval = arg_type(options.unit_interval)
resolution = arg_type(options.resolution)


def views(text: str) -> list[tuple[str, str]]:
    directions, domains = options.DIRECTIONS, options.SOFTMAX_DOMAINS
    if text == "all":
        return [(d, s) for d in directions for s in domains]
    out = []
    for item in text.split(","):
        d, _, sm = item.strip().partition(":")
        if d not in directions or sm not in domains:
            raise argparse.ArgumentTypeError(
                f"expected views like image_to_text:joint (directions {directions}, "
                f"softmax {domains}), got {item!r}"
            )
        out.append((d, sm))
    return out


def add_option(group, name: str, **override) -> None:
    """The flag of declared option ``name`` (``lava.options.OPTIONS``); its destination is the
    option's name and it defaults to ``None`` (the model's own value, or the option's default)."""
    o = options.OPTIONS[name]
    kw: dict = {"dest": o.name, "default": None, "help": o.help}
    if o.choices is not None:
        kw["choices"] = o.choices
    if o.parse is not None:
        kw["type"] = arg_type(o.parse)
    if o.metavar is not None:
        kw["metavar"] = o.metavar
    kw.update(override)
    group.add_argument(o.flag, **kw)


def option_values(args: argparse.Namespace, exclude: Sequence[str] = ()) -> dict:
    """The declared options ``args`` holds (``None`` where not given), by name, less ``exclude``."""
    return {
        name: getattr(args, name) for name in options.OPTIONS if hasattr(args, name) and name not in exclude
    }


LAYERS_HELP = "negative numbers count from the last block (-1 = the last)"


def add_model_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument(
        "--method",
        choices=METHODS,
        default="lava",
        help="lava: MM-DiT joint attention (default); maskclip: MaskCLIP's CLIP ViT value features "
        "(default model clip-vit-b16 = openai/clip-vit-base-patch16; tiny-clip for tests); stableseg: "
        "Stable Diffusion UNet cross-attention, DAAM-style (default model sd1.5; sd2.1-base, tiny-sd15). "
        "All run through the same data loading, protocols, mask stage and metrics",
    )
    g.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=None,
        help="a published setting in one flag: seg4diff = Seg4Diff's SD3-medium evaluation (T5 dropped, 154 "
        "text tokens, fp16, images stretched to 1024x1024, block 9, timesteps[-8] of 28 with shift 3, "
        "image->text joint softmax, heads mean, raw scores, CLIP class tokens averaged, present classes, "
        "no background; see docs/evaluation.md). Options given as well win, and lava names them",
    )
    add_model_flags(g)
    g.add_argument("--offload-text-encoders", action="store_true", help="keep the text encoders on the CPU")
    g.add_argument(
        "--max-memory",
        default=None,
        metavar="SIZE",
        help="memory budget of the compute device (on a CPU run: the process's RAM), e.g. 8GiB: lava "
        "estimates the peak before loading, offloads text encoders, tiles the VAE or drops T5 as needed, "
        "or refuses with the cheapest setting that fits (see docs/benchmarks.md)",
    )
    g.add_argument(
        "--dry-run",
        action="store_true",
        help="load no weights: print the plan (each module's device and dtype, VAE tiling, each "
        "memory's 'estimated peak') and exit",
    )


def add_model_flags(g) -> None:
    """``--model``, ``--device``, ``--dtype`` and ``--drop-t5`` (every command that loads an MM-DiT)."""
    g.add_argument(
        "--model",
        default=None,
        help=f"backend name (see `lava models`), hub id or local folder (default: {DEFAULT_MODEL})",
    )
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    g.add_argument(
        "--dtype", default=None, help="float32, float16 or bfloat16 (default: bf16 on GPU, fp32 on CPU)"
    )
    g.add_argument(
        "--drop-t5", action="store_true", help="do not load or run the T5 text encoder (saves memory)"
    )


def add_verbose_option(g) -> None:
    g.add_argument(
        "--verbose",
        "-v",
        action="store_true",
        help="print the prompts used and the settings applied, and let the libraries lava uses "
        "(diffusers, transformers) show their own warnings and progress bars",
    )


def add_reading_options(p: argparse.ArgumentParser) -> None:
    """The reading options every command shares (``lava.options``; a command places the timestep,
    layers and background threshold flags itself)."""
    g = p.add_argument_group("how the attention is read")
    seeds = g.add_mutually_exclusive_group()
    add_option(seeds, "seed")
    add_option(seeds, "seeds")
    for name in (
        "resolution",
        "direction",
        "softmax",
        "source",
        "tokens",
        "normalize",
        "min_presence",
        "presence",
        "max_classes_per_prompt",
        "prompt_batch",
        "refine",
    ):
        add_option(g, name)
    add_verbose_option(g)
    add_option(g, "impl")


def add_dataset_options(p: argparse.ArgumentParser) -> None:
    from ..evaluation.datasets import DATASET_NAMES

    g = p.add_argument_group("dataset")
    g.add_argument("--dataset", required=True, choices=DATASET_NAMES, help="which benchmark layout to read")
    g.add_argument("--root", required=True, help="the dataset folder (see docs/evaluation.md for layouts)")
    g.add_argument(
        "--split",
        default=None,
        help="split to evaluate (default: val; for a folder dataset ROOT/val.txt if present, else every "
        "image; a split named explicitly must exist)",
    )
    g.add_argument("--limit", type=int, default=None, help="evaluate only the first N images")
    g.add_argument(
        "--protocol",
        choices=("all", "present"),
        default="all",
        help="all: name every dataset class in the prompt (open vocabulary, default); "
        "present: only the classes in each image's ground truth (as Seg4Diff reports)",
    )
    g.add_argument(
        "--background",
        choices=("auto", "class", "threshold", "none"),
        default="auto",
        help="class: name the background class in the prompt; threshold: low scores become background; "
        "none: never predict it; auto (default): for a dataset that scores background, the model's "
        "threshold (see `lava models`), or the class name when the model has none; else none",
    )
    add_option(
        g,
        "background_threshold",
        help="threshold in [0, 1] for --background threshold/auto; 0 is none "
        "(default: the model's, see `lava models`)",
    )
    g.add_argument(
        "--out",
        default="results",
        help="output folder; a rerun with the same settings resumes from it (default: %(default)s)",
    )


def check_source(args: argparse.Namespace) -> None:
    """Refuse, before any model loads, a reading that cannot be (``--source concept`` with a
    non-default ``--direction``/``--softmax``) and options the ``--method`` has no use for."""
    from ..config import Reading

    check_method(args)  # every command that checks --source checks --method with it
    given = {k: v for k, v in option_values(args).items() if v is not None}
    view = {k: given[k] for k in ("direction", "softmax", "source") if k in given}
    try:
        Reading(**view)
    except LavaError:
        if view.get("source") != "concept":
            raise
        raise LavaError(
            "--source concept has no direction or softmax domain to choose: drop --direction/--softmax "
            f"(got {view.get('direction', options.IMAGE_TO_TEXT)}/{view.get('softmax', options.JOINT)}) "
            "or use --source attention"
        ) from None


def check_method(args: argparse.Namespace) -> None:
    """Refuse, before any model loads, options that only lava's own method reads when ``--method``
    names a comparison method (they would be silently ignored)."""
    if args.method == "lava":
        return
    from ..methods.base import LAVA_ONLY

    model_only = {"drop_t5": False, "offload_text_encoders": False, "max_memory": None, "views": None}
    given = [
        options.OPTIONS[key].flag
        for key in LAVA_ONLY
        if getattr(args, key, None) not in (None, options.OPTIONS[key].default)
    ]
    given += [
        f"--{key.replace('_', '-')}"
        for key, value in model_only.items()
        if getattr(args, key, value) != value
    ]
    if given:
        raise LavaError(
            f"{', '.join(given)} only apply to --method lava (MM-DiT attention); --method {args.method} "
            "has no such choice: drop them"
        )

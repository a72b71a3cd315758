"""What the ``lava`` commands share: option groups, argument types, backend loading, output checks,
messages on stderr.

Nothing here imports torch, diffusers, transformers or matplotlib at module level: the parser is
built from these helpers, and ``lava --help`` must stay fast. Heavy imports live inside the
functions that run a command.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

from .. import options

DEFAULT_MODEL = "lava-shapes"
# --method values (lava.evaluation.runner.METHODS, spelled out here: the parser imports no torch)
# and the model each comparison method loads when --model is not given.
METHODS = ("lava", "maskclip", "stableseg")
METHOD_MODELS = {"maskclip": "clip-vit-b16", "stableseg": "sd1.5"}
# Models built in code with random weights, for tests: their masks mean nothing.
RANDOM_MODELS = ("tiny-sd3", "tiny-flux", "tiny-clip", "tiny-sd15")


def note(message: str) -> None:
    """One line of lava's own output on stderr (results go to stdout)."""
    print(f"lava: {message}", file=sys.stderr)


# ---- argument types ----------------------------------------------------------------------------


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


# ---- option groups -------------------------------------------------------------------------------


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
    from ..presets import PRESETS

    g.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=None,
        help="a published setting in one flag: seg4diff = Seg4Diff's SD3-medium evaluation (T5 dropped, 154 "
        "text tokens, fp16, images stretched to 1024x1024, block 9, timesteps[-8] of 28 with shift 3, "
        "image->text joint softmax, heads mean, raw scores, CLIP class tokens averaged, present classes, "
        "no background; see docs/evaluation.md). Options given as well win, and lava names them",
    )
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


def check_source(args: argparse.Namespace) -> None:
    """Refuse, before any model loads, a reading that cannot be (``--source concept`` with a
    non-default ``--direction``/``--softmax``) and options the ``--method`` has no use for."""
    from ..config import Reading
    from ..errors import LavaError

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


def explicit_options(argv: Sequence[str]) -> set[str]:
    """The destinations of the options typed in ``argv`` (not left at their defaults), found by
    parsing it again with every default replaced by a marker (so abbreviations count too)."""
    from . import build_parser

    parser = build_parser()
    unset = object()
    parsers = [parser]
    while parsers:
        current = parsers.pop()
        for action in current._actions:
            action.default = unset
            if isinstance(action, argparse._SubParsersAction):
                parsers += list(action.choices.values())
    return {key for key, value in vars(parser.parse_args(argv)).items() if value is not unset}


def apply_preset(args: argparse.Namespace) -> None:
    """Fill the options of ``args.preset`` (``lava.presets``) that were not given on the command line.

    Options given as well keep their value and are named in a note (the run then differs from the
    published setting). A sweep keeps its own --timesteps/--layers grid. Refuses a preset of
    another method than ``--method``'s."""
    from ..errors import LavaError
    from ..presets import PRESETS

    if not getattr(args, "preset", None):
        return
    preset = PRESETS[args.preset]
    given = explicit_options(getattr(args, "argv", None) or [])
    if args.method != preset.method:
        raise LavaError(
            f"--preset {preset.name} is a setting of --method {preset.method}, not --method {args.method}"
        )
    if "model" not in given:
        args.model = preset.model
    kept = []
    for key, value in preset.options.items():
        if args.command == "sweep" and key in preset.grid:
            continue  # a sweep varies these itself
        if callable(value):  # worked out when applied (e.g. Seg4Diff's timestep from its schedule)
            value = value()
        if key != "max_sequence_length" and not hasattr(args, key):
            continue  # an option this command does not have
        if key in given:
            if getattr(args, key) != value:
                kept.append(f"--{key.replace('_', '-')} {getattr(args, key)}")
            continue
        setattr(args, key, value)
    if kept:
        note(
            f"--preset {preset.name}: kept the options given ({', '.join(kept)}) over the preset's values; "
            f"this run does not reproduce {preset.paper} exactly"
        )


def check_method(args: argparse.Namespace) -> None:
    """Refuse, before any model loads, options that only lava's own method reads when ``--method``
    names a comparison method (they would be silently ignored)."""
    from ..errors import LavaError

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


# ---- library output ------------------------------------------------------------------------------

# Python warnings raised from inside these packages are theirs to report, not lava's.
_CHATTY = r"(diffusers|transformers|huggingface_hub|accelerate|tokenizers)(\.|$)"


def quiet_libraries(verbose: bool) -> None:
    """Show library chatter only with ``--verbose``.

    By default the command's stderr carries lava's own lines and progress only: no diffusers or
    transformers warnings (``accelerate`` hints, ``torchvision`` fallbacks, tokenizer length
    notices) and no "Loading weights" bars. Hub download bars stay: a first download of real
    weights takes minutes and the user should see it move. ``--verbose`` restores the libraries'
    own defaults (warnings and bars shown).
    """
    if not verbose:
        warnings.filterwarnings("ignore", module=_CHATTY)
    import diffusers.utils.logging as diffusers_logging
    import huggingface_hub.utils as hub_utils
    import transformers.utils.logging as transformers_logging

    for lib in (transformers_logging, diffusers_logging):
        if verbose:
            lib.set_verbosity(lib.WARNING)
            lib.enable_progress_bar()
        else:
            lib.set_verbosity(lib.ERROR)
            lib.disable_progress_bar()
    # Both libraries switch the hub's download bars along with their own; those stay on.
    if not os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS"):
        hub_utils.enable_progress_bars()


# ---- output locations ----------------------------------------------------------------------------


def check_output_folder(out: Path, files: Sequence[Path] = ()) -> None:
    """Refuse, before any model is loaded, an output folder the results cannot be written to.

    ``out`` may be missing (it is created on the first write) but then its nearest existing
    parent must be a writable folder; ``files`` are the result paths inside it, none of which
    may be a folder. Raises ``OutputError`` in plain words.
    """
    from ..errors import OutputError
    from ..io import describe_os_error

    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} is a file, not a folder: pass a folder (it is created if missing)")
    existing = out
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"cannot create the output folder {out}: {existing} is a file, not a folder")
    try:
        # A real write, not os.access: it also catches read-only mounts, ACLs and full disks.
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        what = "write to the output folder" if existing == out else f"create the output folder {out} in"
        raise OutputError(f"cannot {what} {existing}: {describe_os_error(err)}") from None
    for path in files:
        if path.is_dir():
            raise OutputError(f"cannot write {path}: a folder of that name is in the way")


# ---- backends ------------------------------------------------------------------------------------


def load_backend_for(
    args: argparse.Namespace, device: str | None = None, sizes=None, announce_plan: bool = True
):
    """The backend the options ask for; with ``--max-memory``, placed by the memory planner for
    images of the given original ``sizes`` (default: a square at the requested resolution).

    The plan is noted on stderr unless ``announce_plan`` is false (``lava segment`` puts it in its
    one-line summary instead); either way ``backend.info["memory_plan"]`` describes it."""
    from ..backends import load_backend

    method = getattr(args, "method", "lava")
    if method != "lava":
        from ..methods import load_segmenter

        model = args.model or METHOD_MODELS[method]
        if args.model is None:
            note(f"--method {method} with no --model: using {model}")
        elif model in RANDOM_MODELS:
            note(f"{model} has RANDOM weights, so its masks are meaningless (it exists for tests).")
        return load_segmenter(method, model, device=device or args.device, dtype=args.dtype)
    model = args.model or DEFAULT_MODEL
    wants = {m: method for method, m in METHOD_MODELS.items()} | {
        "tiny-clip": "maskclip",
        "tiny-sd15": "stableseg",
    }
    if model in wants:
        from ..errors import ModelError

        raise ModelError(f"{model} is a model for --method {wants[model]}, not for lava's MM-DiT attention")
    if args.model is None:
        note(
            f"no --model given, using {DEFAULT_MODEL}: a small model trained on synthetic shape scenes "
            "(coloured circles, squares, triangles); it knows no photos. For real images use "
            "--model sd3-medium (or a hub id / local folder)."
        )
    elif model in RANDOM_MODELS:
        note(f"{model} has RANDOM weights, so its masks are meaningless (it exists for tests).")
    # Set by a preset (Seg4Diff: 77, so 154 text tokens), else the model's own.
    text_window = (
        {"max_sequence_length": args.max_sequence_length}
        if getattr(args, "max_sequence_length", None)
        else {}
    )
    if not args.max_memory:
        backend = load_backend(
            model,
            device=device or args.device,
            dtype=args.dtype,
            drop_t5=args.drop_t5,
            offload_text_encoders=args.offload_text_encoders,
            **text_window,
        )
        note_loaded(backend, args.resolution)
        return backend
    from ..backends.base import resolve_device, resolve_dtype

    target = resolve_device(device or args.device)
    dtype = resolve_dtype(args.dtype, target)
    # Planned from the configs, before any weights load; the model then loads straight into place.
    planned = make_plan(args, target, dtype, sizes)
    within = f"for {planned.size[1]}x{planned.size[0]} px within {args.max_memory}"
    if announce_plan:
        note(f"memory plan {within}: {planned.plan.describe()}")
    if planned.backend is not None:  # a small built-in model, already built for planning
        from ..planner import apply_plan

        placed = apply_plan(planned.backend, planned.plan, device=target, dtype=dtype)
    else:
        placed = load_backend(
            model,
            device=target,
            dtype=dtype,
            drop_t5=args.drop_t5 or planned.plan.drop_t5,
            offload_text_encoders=planned.plan.offload_text_encoders,
            **text_window,
        )
        if planned.plan.vae_tiling and placed.vae is not None:
            placed.vae.enable_tiling()
        placed.info["memory_plan"] = planned.plan.describe()
    note_loaded(placed, args.resolution)
    placed.info["memory_plan_for"] = within
    return placed


@dataclasses.dataclass(frozen=True)
class Planned:
    """A memory plan made before loading, with what it was made for."""

    plan: object  # lava.planner.MemoryPlan
    size: tuple[int, int]
    backend: object | None  # a built-in model built for planning (cheap), else None


def make_plan(args: argparse.Namespace, target, dtype, sizes=None) -> Planned:
    """The memory plan for the options, from the model's configs (no weights loaded), for the largest
    of ``sizes`` after resizing (default: a square at the requested resolution). With
    ``--max-memory`` it is ``plan_memory``'s choice (or its refusal), else the estimate as asked."""
    from ..backends import REGISTRY, load_backend
    from ..backends.flux import HUB_IDS as FLUX_HUB_IDS
    from ..backends.sd3 import DEFAULTS, HUB_IDS, detect_variant
    from ..errors import LavaError
    from ..planner import estimate_memory, parse_bytes, plan_memory, spec_for, spec_from_pipeline
    from ..stages.noise import pixel_size

    model = args.model or DEFAULT_MODEL
    no_flux = LavaError(
        f"--max-memory and --dry-run plan SD3-family models only; {model} is a Flux model, which the "
        "memory planner does not model yet (load it without them)"
    )
    if model in FLUX_HUB_IDS:
        raise no_flux
    backend = None
    if model in REGISTRY and model not in HUB_IDS:  # built in code and small: build it
        backend = load_backend(model, device="cpu", dtype=dtype, drop_t5=args.drop_t5)
        if backend.family.name == "flux":
            raise no_flux
        spec = spec_from_pipeline(backend.pipe, backend.max_sequence_length)
        defaults, limit = backend.defaults, backend.max_resolution
    else:
        spec, transformer_config = spec_for(HUB_IDS.get(model, model), drop_t5=args.drop_t5)
        if "Flux" in str(transformer_config.get("_class_name", "")):
            raise no_flux
        defaults = DEFAULTS[detect_variant(transformer_config, model)]
        m = transformer_config.get("pos_embed_max_size")
        limit = None if m is None else int(m) * spec.grid_unit
    if args.resolution == "original" and sizes is None:
        raise ValueError(
            "--max-memory and --dry-run need a resolution in px (or 'native') to plan for, not 'original'"
        )
    # Without image sizes, plan for a square at the asked long side (the model's native one for
    # None or 'WxH', whose size does not depend on the image).
    side = args.resolution if isinstance(args.resolution, int) else defaults.resolution
    grid = dict(unit=spec.grid_unit, native=defaults.resolution, limit=limit, name=model)
    processed = [pixel_size(s, args.resolution, **grid) for s in sizes or [(side, side)]]
    worst = max(processed, key=lambda hw: hw[0] * hw[1])
    layers = args.layers if getattr(args, "layers", None) else defaults.layers
    kw = dict(
        dtype=dtype,
        device=target,
        captured_layers=len(layers),
        text_tokens=spec.clip_len + spec.t5_len,
        offload_text_encoders=args.offload_text_encoders,
    )
    if args.max_memory:
        plan = plan_memory(spec, worst, parse_bytes(args.max_memory), **kw)
    else:
        plan = estimate_memory(spec, worst, drop_t5=args.drop_t5, **kw)
    return Planned(plan=plan, size=worst, backend=backend)


def dry_run(args: argparse.Namespace, device: str | None = None, sizes=None) -> int:
    """``--dry-run``: print the plan on stdout (nothing heavy is loaded) and return the exit code."""
    import torch

    from ..backends.base import resolve_device, resolve_dtype

    # A plan for a device this machine lacks is still a plan (e.g. for a GPU, made on a laptop).
    asked = device or args.device
    target = torch.device(asked) if asked and asked.startswith("cuda") else resolve_device(asked)
    dtype = resolve_dtype(args.dtype, target)
    planned = make_plan(args, target, dtype, sizes)
    model = args.model or DEFAULT_MODEL
    budget = f", budget {args.max_memory}" if args.max_memory else ""
    how = "no weights loaded" if planned.backend is None else "a small built-in model, built to plan"
    print(f"dry run for {model} ({how}){budget}")
    for line in planned.plan.report():
        print(line)
    return 0


def note_loaded(backend, requested_resolution) -> None:
    """What the user should know once the model is loaded: a model without T5 (run without it, as
    with --drop-t5), a --resolution off the token grid."""
    if "no_t5" in backend.info:
        note(f"{backend.info['no_t5']}: running with the CLIP text encoders only, as with --drop-t5")
    note_resolution(backend, requested_resolution)


def note_resolution(backend, requested) -> None:
    """Say once when ``--resolution`` is not on the model's token grid, so the rounding is no surprise."""
    if isinstance(requested, int) and requested % backend.grid_unit:
        unit = backend.grid_unit
        side = max(unit, round(requested / unit) * unit)
        note(
            f"--resolution {requested} is not a multiple of {backend.name}'s token size ({unit} px); "
            f"image sides are rounded to multiples of {unit} (a {requested} px long side becomes {side} px)"
        )


# ---- evaluation commands (eval, sweep) -----------------------------------------------------------


def eval_setup(args: argparse.Namespace, cells_spec: dict):
    """Dataset, backend, settings and the config recorded with the results (shared by eval and sweep)."""
    from ..evaluation import distributed
    from ..evaluation.datasets import load_dataset
    from ..evaluation.runner import EvalSettings

    check_source(args)
    device = distributed.init(args.device)
    dataset = load_dataset(args.dataset, args.root, args.split)
    if args.limit is not None:
        if args.limit <= 0:
            raise ValueError(f"--limit must be a positive number of images, got {args.limit}")
        dataset = dataset[: args.limit]
    check_output_folder(Path(args.out))
    backend = load_backend_for(args, device)
    from ..config import recipe

    # The cells set the timesteps and blocks (a sweep's --timesteps is its grid, not an ensemble).
    base = recipe(backend, **option_values(args, exclude=("timestep", "timesteps", "sigma", "layers")))
    if args.background == "threshold" and base.mask.background_threshold is None:
        raise ValueError(
            f"--background threshold needs --background-threshold: {backend.name} has no default"
        )
    settings = EvalSettings(
        protocol=args.protocol, background=args.background, method=args.method, recipe=base
    )
    # Everything that changes a prediction; the journal refuses to mix results made otherwise.
    config = {
        "command": args.command,
        "preset": getattr(args, "preset", None),
        "dataset": args.dataset,
        # "val" when not given, as before --split could be left out: older journals still resume.
        "split": args.split or "val",
        "model": backend.name,
        "variant": backend.variant,
        "dtype": str(backend.dtype),
        "text_tokens": getattr(backend, "text_len", None),
        **cells_spec,
        **settings.record(),
        **prediction_settings(backend, settings, dataset.info),
    }
    return dataset, backend, settings, config


def prediction_settings(backend, settings, info) -> dict:
    """What else changes a prediction, resolved as it will run: the text encoders used (T5 or not,
    and their dtype: offloaded encoders stay float32), VAE tiling, the attention-slice
    implementation ``auto`` picks, the long side in pixels ``native`` means, and the class list.

    Recorded in the eval/sweep journal (see ``Journal``) so that a resume cannot mix them.
    """
    from ..kernels import resolve_impl
    from ..methods.base import is_segmenter

    if is_segmenter(backend):  # its own settings: windows, templates, layer count...
        return {**backend.prediction_settings(), "classes": list(info.prompt_names)}
    reading = settings.recipe.reading
    encoder = getattr(backend.pipe, "text_encoder", None)
    param = next(encoder.parameters(), None) if hasattr(encoder, "parameters") else None
    vae = backend.vae
    return {
        "text_encoders": backend.text_encoders,
        "text_dtype": str(param.dtype) if param is not None else None,
        "vae_tiling": bool(getattr(vae, "use_tiling", False)) if vae is not None else False,
        "attention_impl": resolve_impl(reading.impl, backend.device),
        "input_resolution": reading.resolution
        if reading.resolution is not None
        else backend.defaults.resolution,
        "classes": list(info.prompt_names),
    }


def prompt_printer(args: argparse.Namespace):
    """With ``--verbose``, a callback that prints each distinct set of prompts once (on rank 0)."""
    from ..evaluation import distributed

    if not args.verbose or not distributed.is_main():
        return None

    def show(prompt) -> None:
        note(f"{len(prompt.classes)} classes in {prompt.num_prompts} prompt(s):")
        for i, text in enumerate(prompt.texts):
            note(f"  prompt {i + 1}: {text!r}")

    return show


# ---- errors --------------------------------------------------------------------------------------


def error_message(err: BaseException) -> str:
    """The one line ``lava: error: ...`` shows for ``err``: lava's own message, or an OS error in
    plain words (no ``[Errno N]`` codes)."""
    if isinstance(err, OSError) and err.errno is not None:
        from ..io import describe_os_error

        reason = describe_os_error(err)
        return f"{reason}: {err.filename}" if err.filename else reason
    return str(err)

"""What the ``lava`` commands share: option groups, argument types, backend loading, output checks,
messages on stderr.

Nothing here imports torch, diffusers, transformers or matplotlib at module level: the parser is
built from these helpers, and ``lava --help`` must stay fast. Heavy imports live inside the
functions that run a command.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

DEFAULT_MODEL = "lava-shapes"


def note(message: str) -> None:
    """One line of lava's own output on stderr (results go to stdout)."""
    print(f"lava: {message}", file=sys.stderr)


# ---- argument types ------------------------------------------------------------------------------


def number_list(cast, example: str):
    """An argparse type for comma-separated numbers, e.g. ``9,10`` or ``200,500,800``."""

    def parse(text: str) -> list:
        try:
            return [cast(x) for x in text.split(",") if x.strip()]
        except ValueError as err:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated numbers like {example}, got {text!r}"
            ) from err

    return parse


int_list = number_list(int, "9,10")
float_list = number_list(float, "200,500,800")


def unit_interval(text: str) -> float:
    """An argparse type for a number in [0, 1] (thresholds on normalised scores)."""
    try:
        value = float(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got {text!r}") from err
    if math.isnan(value) or not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(
            f"expected a number between 0 and 1 (scores are normalised to [0, 1]), got {text!r}"
        )
    return value


def views(text: str) -> list[tuple[str, str]]:
    directions, domains = ("image_to_text", "text_to_image"), ("joint", "cross")
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


def resolution(text: str) -> int | str | None:
    if text in ("native", "original"):
        return None if text == "native" else text
    try:
        value = int(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(
            f"expected a number of pixels, 'native' or 'original', got {text!r}"
        ) from err
    if value <= 0:
        raise argparse.ArgumentTypeError(f"resolution must be positive, got {value}")
    return value


LAYERS_HELP = "negative numbers count from the last block (-1 = the last)"


# ---- option groups -------------------------------------------------------------------------------


def add_model_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
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


def refine_method(text: str) -> str:
    """``--refine`` values: a refinement ``lava.refine`` knows (checked here, before the model loads)."""
    from ..refine import REFINE_METHODS

    if text not in REFINE_METHODS:
        raise argparse.ArgumentTypeError(
            f"unknown refinement {text!r}: expected one of {', '.join(REFINE_METHODS)}"
        )
    return text


def add_reading_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("how the attention is read")
    g.add_argument("--seed", type=int, default=0, help="noise seed (default: %(default)s)")
    g.add_argument(
        "--resolution",
        type=resolution,
        default=None,
        help="long image side fed to the model in px, 'native' (default) or 'original'; sides are "
        "rounded to the model's token grid (multiples of 16 px for SD3: 1020 becomes 1024)",
    )
    g.add_argument(
        "--direction",
        choices=("image_to_text", "text_to_image"),
        default="image_to_text",
        help="image_to_text: image patches attending to class tokens (default); text_to_image: the reverse",
    )
    g.add_argument(
        "--softmax",
        choices=("joint", "cross"),
        default="joint",
        help="joint: normalised over all keys as the model does (default); "
        "cross: over the other modality only",
    )
    g.add_argument(
        "--tokens",
        choices=("all", "clip", "t5"),
        default="all",
        help="which part of each class's tokens to average (default: %(default)s)",
    )
    g.add_argument(
        "--normalize",
        choices=("minmax", "global", "classes", "none"),
        default=None,
        help="score normalisation: minmax per class, global over all classes of an image, classes per "
        "pixel, or none (default: the model's, see `lava models`)",
    )
    g.add_argument(
        "--min-presence",
        type=unit_interval,
        default=None,
        metavar="P",
        help="a class whose peak score is below P (in [0, 1]) times the strongest class's peak in an "
        "image takes no pixels there; 0 lets every class compete (default: the model's)",
    )
    g.add_argument(
        "--max-classes-per-prompt",
        type=int,
        default=None,
        metavar="N",
        help="put at most N class names in one prompt (default: as many as fit the text window; longer "
        "class lists are always split into several prompts, run as one batch)",
    )
    g.add_argument(
        "--prompt-batch",
        type=int,
        default=None,
        metavar="N",
        help="prompts per forward pass when the classes span several prompts (default: all; lower it to "
        "save memory)",
    )
    g.add_argument(
        "--refine",
        type=refine_method,
        default=None,
        metavar="METHOD",
        help="refine the class maps with the image colours before labelling: 'pamr' (pixel-adaptive "
        "mask refinement on a grid 4x the token grid, longer side <= 256 px; see docs/method.md). "
        "Default: none",
    )
    add_verbose_option(g)
    g.add_argument(
        "--attention-impl",
        choices=("auto", "naive", "torch", "triton"),
        default="auto",
        help="attention-slice implementation (default: %(default)s: triton on CUDA, torch elsewhere)",
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
    g.add_argument(
        "--background-threshold",
        type=unit_interval,
        default=None,
        help="threshold in [0, 1] for --background threshold/auto (default: the model's)",
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

    model = args.model or DEFAULT_MODEL
    if args.model is None:
        note(
            f"no --model given, using {DEFAULT_MODEL}: a small model trained on synthetic shape scenes "
            "(coloured circles, squares, triangles); it knows no photos. For real images use "
            "--model sd3-medium (or a hub id / local folder)."
        )
    elif model == "tiny-sd3":
        note("tiny-sd3 has RANDOM weights, so its masks are meaningless (it exists for tests).")
    if not args.max_memory:
        backend = load_backend(
            model,
            device=device or args.device,
            dtype=args.dtype,
            drop_t5=args.drop_t5,
            offload_text_encoders=args.offload_text_encoders,
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
    from ..backends.sd3 import DEFAULTS, HUB_IDS, detect_variant
    from ..images import fit_to_grid
    from ..planner import estimate_memory, parse_bytes, plan_memory, spec_for, spec_from_pipeline

    model = args.model or DEFAULT_MODEL
    backend = None
    if model in REGISTRY and model not in HUB_IDS:  # built in code and small: build it
        backend = load_backend(model, device="cpu", dtype=dtype, drop_t5=args.drop_t5)
        spec = spec_from_pipeline(backend.pipe, backend.max_sequence_length)
        defaults, limit = backend.defaults, backend.max_resolution
    else:
        spec, transformer_config = spec_for(HUB_IDS.get(model, model), drop_t5=args.drop_t5)
        defaults = DEFAULTS[detect_variant(transformer_config, model)]
        m = transformer_config.get("pos_embed_max_size")
        limit = None if m is None else int(m) * spec.grid_unit
    if args.resolution == "original" and sizes is None:
        raise ValueError(
            "--max-memory and --dry-run need a resolution in px (or 'native') to plan for, not 'original'"
        )
    side = defaults.resolution if args.resolution is None else args.resolution
    squares = sizes or [(side, side)]
    processed = [fit_to_grid(s, max(s) if side == "original" else int(side), spec.grid_unit) for s in squares]
    worst = max(processed, key=lambda hw: hw[0] * hw[1])
    if limit is not None and max(worst) > limit:
        raise ValueError(
            f"{worst[1]}x{worst[0]} px exceeds {model}'s position embedding ({limit} px per side); "
            f"use a resolution <= {limit}"
        )
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

    device = distributed.init(args.device)
    dataset = load_dataset(args.dataset, args.root, args.split)
    if args.limit is not None:
        if args.limit <= 0:
            raise ValueError(f"--limit must be a positive number of images, got {args.limit}")
        dataset = dataset[: args.limit]
    check_output_folder(Path(args.out))
    backend = load_backend_for(args, device)
    d = backend.defaults
    threshold = args.background_threshold if args.background_threshold is not None else d.background_threshold
    if args.background == "threshold" and threshold is None:
        raise ValueError(
            f"--background threshold needs --background-threshold: {backend.name} has no default"
        )
    settings = EvalSettings(
        protocol=args.protocol,
        background=args.background,
        background_threshold=threshold,
        direction=args.direction,
        softmax=args.softmax,
        tokens=args.tokens,
        normalize=args.normalize or d.normalize,
        min_presence=(args.min_presence or None) if args.min_presence is not None else d.min_presence,
        max_classes_per_prompt=args.max_classes_per_prompt,
        refine=args.refine,
        seed=args.seed,
        resolution=args.resolution,
        impl=args.attention_impl,
    )
    # Everything that changes a prediction; the journal refuses to mix results made otherwise.
    config = {
        "command": args.command,
        "dataset": args.dataset,
        # "val" when not given, as before --split could be left out: older journals still resume.
        "split": args.split or "val",
        "model": backend.name,
        "variant": backend.variant,
        "dtype": str(backend.dtype),
        "text_tokens": backend.text_len,
        **cells_spec,
        **{k: v for k, v in vars(settings).items()},
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

    encoder = getattr(backend.pipe, "text_encoder", None)
    param = next(encoder.parameters(), None) if hasattr(encoder, "parameters") else None
    vae = backend.vae
    return {
        "text_encoders": backend.text_encoders,
        "text_dtype": str(param.dtype) if param is not None else None,
        "vae_tiling": bool(getattr(vae, "use_tiling", False)) if vae is not None else False,
        "attention_impl": resolve_impl(settings.impl, backend.device),
        "input_resolution": settings.resolution
        if settings.resolution is not None
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

"""Loading the model a ``lava`` command asks for: a comparison method's segmenter, or an MM-DiT
backend, placed by the memory planner under ``--max-memory``; ``--dry-run`` prints the plan
without loading weights."""

from __future__ import annotations

import argparse
import dataclasses

from ..errors import ModelError
from .args import DEFAULT_MODEL, METHOD_MODELS, RANDOM_MODELS
from .output import note, note_loaded


def load_backend_for(
    args: argparse.Namespace, device: str | None = None, sizes=None, announce_plan: bool = True
):
    """The backend the options ask for; with ``--max-memory``, placed by the memory planner for
    images of the given original ``sizes`` (default: a square at the requested resolution).

    The plan is noted on stderr unless ``announce_plan`` is false (``lava segment`` puts it in its
    one-line summary instead); either way ``backend.info["memory_plan"]`` describes it. The
    libraries' own loading output shows with ``--verbose`` only."""
    from ..backends import load_backend

    method = getattr(args, "method", "lava")
    if method != "lava":
        return load_segmenter_for(args, method, device)
    model = lava_model(args)
    # Set by a preset (Seg4Diff: 77, so 154 text tokens), else the model's own.
    text_window = (
        {"max_sequence_length": args.max_sequence_length}
        if getattr(args, "max_sequence_length", None)
        else {}
    )
    verbose = bool(getattr(args, "verbose", False))
    if not args.max_memory:
        backend = load_backend(
            model,
            device=device or args.device,
            dtype=args.dtype,
            drop_t5=args.drop_t5,
            offload_text_encoders=args.offload_text_encoders,
            verbose=verbose,
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
            verbose=verbose,
            **text_window,
        )
        if planned.plan.vae_tiling and placed.vae is not None:
            placed.vae.enable_tiling()
        placed.info["memory_plan"] = planned.plan.describe()
    note_loaded(placed, args.resolution)
    placed.info["memory_plan_for"] = within
    return placed


def load_segmenter_for(args: argparse.Namespace, method: str, device: str | None = None):
    """The segmenter of comparison method ``method`` (``--method maskclip``/``stableseg``)."""
    from ..methods import load_segmenter

    model = args.model or METHOD_MODELS[method]
    if args.model is None:
        note(f"--method {method} with no --model: using {model}")
    elif model in RANDOM_MODELS:
        note(f"{model} has RANDOM weights, so its masks are meaningless (it exists for tests).")
    return load_segmenter(method, model, device=device or args.device, dtype=args.dtype)


def lava_model(args: argparse.Namespace) -> str:
    """The MM-DiT model ``--model`` names (default ``DEFAULT_MODEL``), refusing a comparison
    method's model and saying when the model is the default or has random weights."""
    model = args.model or DEFAULT_MODEL
    wants = {m: method for method, m in METHOD_MODELS.items()} | {
        "tiny-clip": "maskclip",
        "tiny-sd15": "stableseg",
    }
    if model in wants:
        raise ModelError(f"{model} is a model for --method {wants[model]}, not for lava's MM-DiT attention")
    if args.model is None:
        note(
            f"no --model given, using {DEFAULT_MODEL}: a small model trained on synthetic shape scenes "
            "(coloured circles, squares, triangles); it knows no photos. For real images use "
            "--model sd3-medium (or a hub id / local folder)."
        )
    elif model in RANDOM_MODELS:
        note(f"{model} has RANDOM weights, so its masks are meaningless (it exists for tests).")
    return model


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
    from ..backends import REGISTRY, chroma, flux, flux2, flux2_sizes, load_backend, qwen, zimage
    from ..backends.pretrained import refuse_drop_t5
    from ..backends.sd3 import DEFAULTS, HUB_IDS, detect_variant
    from ..model_spec import zimage_spec
    from ..planner import estimate_memory, parse_bytes, plan_memory, spec_for, spec_from_pipeline
    from ..stages.noise import pixel_size

    model = args.model or DEFAULT_MODEL
    backend = None
    asked_window = getattr(args, "max_sequence_length", None)
    hub_ids = {**HUB_IDS, **qwen.HUB_IDS}
    if model in flux.HUB_IDS:  # FLUX.1 at its real size, counted from the released configs (no download)
        refuse_drop_t5(model, args.drop_t5)  # as loading it would
        window = asked_window or flux.MAX_SEQUENCE_LENGTH[model]
        spec = spec_from_pipeline(flux.full_size_modules(model), window)
        defaults, limit = flux.DEFAULTS[model], None
    elif model in chroma.HUB_IDS:  # Chroma1 at its real size, counted from its configs (no download)
        spec = spec_from_pipeline(chroma.full_size_modules(), asked_window or chroma.MAX_SEQUENCE_LENGTH)
        defaults, limit = chroma.DEFAULTS[model], None
    elif model in flux2.HUB_IDS:  # FLUX.2: sized from the released configs, nothing downloaded
        window = asked_window or flux2.MAX_SEQUENCE_LENGTH
        spec, defaults, limit = flux2_sizes.planner_spec(model, window), flux2.DEFAULTS[model], None
    elif model in zimage.HUB_IDS:  # the published configs' sizes, nothing downloaded
        spec = zimage_spec(asked_window)
        defaults, limit = zimage.DEFAULTS[model], None
    elif model in REGISTRY and model not in hub_ids:  # built in code and small: build it
        backend = load_backend(
            model, device="cpu", dtype=dtype, drop_t5=args.drop_t5, verbose=getattr(args, "verbose", False)
        )
        spec = spec_from_pipeline(backend.pipe, backend.max_sequence_length)
        defaults, limit = backend.defaults, backend.max_resolution
    else:
        spec, transformer_config = spec_for(hub_ids.get(model, model), drop_t5=args.drop_t5)
        name = str(transformer_config.get("_class_name", ""))
        if name == "Flux2Transformer2DModel":
            spec = flux2_sizes.planner_geometry(spec, asked_window or flux2.MAX_SEQUENCE_LENGTH)
            defaults = flux2.DEFAULTS[flux2.detect_variant(transformer_config, model)]
            limit = None
        elif name == "FluxTransformer2DModel":  # FLUX.1's layout: 2x2 packing, T5 alone in the sequence
            refuse_drop_t5(model, args.drop_t5)
            variant = flux.detect_variant(transformer_config, model)
            spec = flux.planning_geometry(spec, asked_window or flux.MAX_SEQUENCE_LENGTH[variant])
            defaults, limit = flux.DEFAULTS[variant], None
        elif name.startswith("Chroma"):
            spec = chroma.planning_geometry(spec)
            defaults = chroma.DEFAULTS[chroma.detect_variant(transformer_config, model)]
            limit = None
        elif name in qwen.QWEN.transformer_classes:
            defaults = qwen.DEFAULTS[qwen.detect_variant(transformer_config, model)]
            m = transformer_config.get("pos_embed_max_size")
            limit = None if m is None else int(m) * spec.grid_unit
        elif "ZImage" in name:
            defaults = zimage.defaults_for(transformer_config)
            m = transformer_config.get("pos_embed_max_size")
            limit = None if m is None else int(m) * spec.grid_unit
        else:
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

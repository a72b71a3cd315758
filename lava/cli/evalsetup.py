"""What ``lava eval`` and ``lava sweep`` share: the dataset, backend and settings of a run, the
configuration recorded with its results, and the ``--verbose`` prompt printer."""

from __future__ import annotations

import argparse
from pathlib import Path

from .args import check_source, option_values
from .loading import load_backend_for
from .output import check_output_folder, note


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

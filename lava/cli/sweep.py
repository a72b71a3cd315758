"""``lava sweep``: a grid of timesteps × blocks over a dataset (the poster's comparison)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import LavaError
from .args import (
    LAYERS_HELP,
    add_dataset_options,
    add_model_options,
    add_reading_options,
    float_list,
    int_list,
    views,
)
from .evalsetup import eval_setup, prompt_printer
from .loading import dry_run
from .output import note

EPILOG = """\
example:
  lava sweep --dataset voc --root ~/data/VOCdevkit --model sd3-medium --timesteps 100,300,500,700,900 \\
      --layers 3,6,9,12,15,18 --limit 200 --out results/voc-sweep
"""


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "sweep",
        help="evaluate a grid of timesteps x blocks (the poster's comparison)",
        description="Evaluate every (timestep, block) pair on a dataset with one noise+forward per "
        "timestep per image (all blocks are captured in the same pass). Writes sweep.csv, sweep.md, "
        "sweep.png and sweep.json.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--timesteps",
        type=float_list,
        required=True,
        help="the grid's timestep axis, each evaluated alone, e.g. 100,300,500,700,900 (in segment and "
        "eval, --timesteps averages the timesteps instead; --seeds averages seeds here too)",
    )
    p.add_argument(
        "--layers",
        type=int_list,
        required=True,
        help=f"blocks, each evaluated alone, e.g. 0,3,6,9,12; {LAYERS_HELP}",
    )
    p.add_argument(
        "--with-mean", action="store_true", help="also evaluate the mean over all the given blocks"
    )
    p.add_argument(
        "--views",
        type=views,
        default=None,
        help="attention views to compare, e.g. image_to_text:joint,text_to_image:cross, or 'all' for the "
        "four (default: --direction:--softmax); all come from the same forward pass",
    )
    add_dataset_options(p)
    add_model_options(p)
    add_reading_options(p)
    return p


def run(args: argparse.Namespace) -> int:
    from ..evaluation import distributed
    from ..evaluation.report import write_sweep
    from ..evaluation.runner import Cell
    from ..evaluation.runner import run as run_cells

    if args.source == "concept" and args.views:
        raise LavaError(
            "--views compares attention views; the concept source has none (drop --views, or sweep "
            "--source attention)"
        )
    if args.dry_run:  # plans for a square at the resolution; the dataset is not read
        return dry_run(args)
    dataset, backend, settings, config = eval_setup(
        args,
        {
            "timesteps": args.timesteps,
            "layers": args.layers,
            "with_mean": args.with_mean,
            "views": args.views,
        },
    )
    for t in args.timesteps:
        backend.check_timestep(t)
    layers = backend.check_layers(args.layers)
    groups = [(layer,) for layer in layers] + ([tuple(layers)] if args.with_mean and len(layers) > 1 else [])
    chosen = args.views or [settings.recipe.reading.view]
    cells = [Cell(float(t), g, d, sm) for d, sm in chosen for t in args.timesteps for g in groups]
    out = Path(args.out)
    result = run_cells(
        backend,
        dataset,
        cells,
        settings,
        out,
        config=config,
        prompt_batch=args.prompt_batch,
        on_prompt=prompt_printer(args),
        on_note=note if distributed.is_main() else None,
    )
    if distributed.is_main():
        summary = write_sweep(out, dataset.info, cells, result.matrices, settings, result.num_images, config)
        best = summary["best"]
        print((out / "sweep.md").read_text())
        print(f"best: timestep {best['timestep']:g}, blocks {best['layers']}, mIoU {best['miou']}")
        print(f"  table: {out / 'sweep.md'}  figure: {out / 'sweep.png'}")
    distributed.shutdown()
    return 0

"""``lava eval``: one setting over a dataset split, reported as mIoU, per-class IoU and pixel accuracy."""

from __future__ import annotations

import argparse
from pathlib import Path

from .args import add_dataset_options, add_model_options, add_option, add_reading_options
from .evalsetup import eval_setup, prompt_printer
from .loading import dry_run
from .output import note

EPILOG = """\
examples:
  lava eval --dataset voc --root ~/data/VOCdevkit --model sd3-medium --protocol present --out results/voc
  torchrun --nproc-per-node=4 -m lava.cli eval --dataset ade20k --root ~/data/ADEChallengeData2016 \\
      --model sd3-medium --out results/ade

writes report.json (miou, per_class_iou, pixel_accuracy, protocol, config, versions), per_class.csv,
a journal (journal.rank*.jsonl) from which a stopped run resumes, and optionally vis/ and predictions/.
A journal that holds no finished image yet is replaced by a run with other settings; one with
results is not (the error names the settings that differ).
"""


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "eval",
        help="evaluate on a segmentation benchmark (mIoU)",
        description="Segment every image of a dataset split and report mIoU, per-class IoU and pixel "
        "accuracy from one confusion matrix over the whole split. Resumable; shards over processes "
        "under torchrun.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    when = p.add_mutually_exclusive_group()
    add_option(when, "timestep")
    add_option(when, "timesteps")
    add_option(p, "layers")
    p.add_argument(
        "--visualize", type=int, default=0, metavar="K", help="write overlays of the first K images"
    )
    p.add_argument(
        "--save-predictions",
        action="store_true",
        help="write every predicted label map as predictions/<id>.png (dataset ids and its ignore id, "
        "255 for the standard datasets; a 16-bit PNG for datasets of more than 255 classes)",
    )
    add_dataset_options(p)
    add_model_options(p)
    add_reading_options(p)
    return p


def run(args: argparse.Namespace) -> int:
    from .. import io
    from ..evaluation import distributed
    from ..evaluation.report import protocol_line, write_eval_report
    from ..evaluation.runner import Cell
    from ..evaluation.runner import run as run_cells
    from ..viz import label_image

    if args.dry_run:  # plans for a square at the resolution; the dataset is not read
        return dry_run(args)
    dataset, backend, settings, config = eval_setup(args, {})
    timestep = args.timestep if args.timestep is not None else backend.defaults.timestep
    # An ensemble is one cell over several timesteps (recorded as a list; one timestep as before).
    when = tuple(float(t) for t in args.timesteps) if args.timesteps else float(timestep)
    layers = backend.check_layers(args.layers if args.layers is not None else backend.defaults.layers)
    for t in args.timesteps or [timestep]:
        backend.check_timestep(t)
    config.update(timestep=list(when) if isinstance(when, tuple) else when, layers=list(layers))
    out = Path(args.out)
    shown = {"n": 0}
    # Dataset ids and the ignore id: palette PNGs while they fit in 0..255, else 16-bit (every file alike)
    id_count = max(dataset.info.num_classes, dataset.info.ignore_index + 1)

    def on_prediction(image_id, pred, seg, _cell):
        if args.save_predictions:
            io.save_png(label_image(pred, num_labels=id_count), out / "predictions" / f"{image_id}.png")
        if seg is not None and shown["n"] < args.visualize:  # None: nothing was segmented
            shown["n"] += 1
            io.save_png(seg.overlay(0), out / "vis" / f"{image_id}_overlay.png")

    result = run_cells(
        backend,
        dataset,
        [Cell(when, layers, *settings.recipe.reading.view)],
        settings,
        out,
        config=config,
        on_prediction=on_prediction,
        prompt_batch=args.prompt_batch,
        on_prompt=prompt_printer(args),
        on_note=note if distributed.is_main() else None,
    )
    if distributed.is_main():
        matrix = result.matrices[result.cells[0].key]
        report = write_eval_report(out, dataset.info, matrix, settings, result.num_images, config)
        print(
            f"{dataset.info.name}: mIoU {report['miou']:.4f}, pixel accuracy {report['pixel_accuracy']:.4f} "
            f"over {result.num_images} images ({result.resumed} resumed)"
        )
        print(f"  {protocol_line(dataset.info, settings)}")
        print(f"  report: {out / 'report.json'}")
    distributed.shutdown()
    return 0

"""The ``lava`` command: segment images from the command line, list models.

Every error is one line on stderr (``lava: error: ...``) and a non-zero exit code; result
files are written atomically, so a failed run leaves no partial file.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

DEFAULT_MODEL = "lava-shapes"

SEGMENT_EPILOG = """\
examples:
  lava segment photo.jpg --classes "cat,dog,sofa" --model sd3-medium --out results/
  lava segment a.png b.png --classes "person,bicycle" --layers 8,9,10 --timestep 515 --save-scores

for each IMAGE, --out receives:
  <name>_labels.png   label map (palette PNG; pixel value i = i-th class, see <name>_classes.txt)
  <name>_overlay.png  label colours over the image
  <name>_classes.txt  the class of each label value, one per line
  <name>_scores.npz   per-class scores [C, H, W] (with --save-scores)
  <name>_heatmaps.png one heatmap per class (with --heatmaps)

With no --model, lava uses lava-shapes: a small SD3-architecture model trained by lava on
synthetic scenes of coloured circles, squares and triangles; it runs offline but knows no photos.
For real photos pass --model sd3-medium (or a hub id / local folder).
"""


EVAL_EPILOG = """\
examples:
  lava eval --dataset voc --root ~/data/VOCdevkit --model sd3-medium --protocol present --out results/voc
  torchrun --nproc-per-node=4 -m lava.cli eval --dataset ade20k --root ~/data/ADEChallengeData2016 \\
      --model sd3-medium --out results/ade

writes report.json (miou, per_class_iou, pixel_accuracy, protocol, config, versions), per_class.csv,
a journal (journal.rank*.jsonl) from which a stopped run resumes, and optionally vis/ and predictions/.
"""

SWEEP_EPILOG = """\
example:
  lava sweep --dataset voc --root ~/data/VOCdevkit --model sd3-medium --timesteps 100,300,500,700,900 \\
      --layers 3,6,9,12,15,18 --limit 200 --out results/voc-sweep
"""


def _number_list(cast, example: str):
    """An argparse type for comma-separated numbers, e.g. ``9,10`` or ``200,500,800``."""

    def parse(text: str) -> list:
        try:
            return [cast(x) for x in text.split(",") if x.strip()]
        except ValueError as err:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated numbers like {example}, got {text!r}"
            ) from err

    return parse


def _views(text: str) -> list[tuple[str, str]]:
    directions, domains = ("image_to_text", "text_to_image"), ("joint", "cross")
    if text == "all":
        return [(d, s) for d in directions for s in domains]
    views = []
    for item in text.split(","):
        d, _, sm = item.strip().partition(":")
        if d not in directions or sm not in domains:
            raise argparse.ArgumentTypeError(
                f"expected views like image_to_text:joint (directions {directions}, "
                f"softmax {domains}), got {item!r}"
            )
        views.append((d, sm))
    return views


_int_list = _number_list(int, "9,10")
_float_list = _number_list(float, "200,500,800")


def _resolution(text: str) -> int | str:
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


def _add_model_options(p: argparse.ArgumentParser) -> None:
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
        help="device memory budget, e.g. 8GiB: lava estimates the peak and offloads text encoders, tiles "
        "the VAE or drops T5 as needed, or refuses with the estimate (see docs/benchmarks.md)",
    )


def _add_reading_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("how the attention is read")
    g.add_argument("--seed", type=int, default=0, help="noise seed (default: %(default)s)")
    g.add_argument(
        "--resolution",
        type=_resolution,
        default=None,
        help="long image side fed to the model in px, 'native' (default) or 'original'",
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
        type=float,
        default=None,
        metavar="P",
        help="a class whose peak score is below P times the strongest class's peak in an image takes no "
        "pixels there; 0 lets every class compete (default: the model's)",
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
        "--verbose", "-v", action="store_true", help="print the prompts used and the settings applied"
    )
    g.add_argument(
        "--attention-impl",
        choices=("auto", "naive", "torch", "triton"),
        default="auto",
        help="attention-slice implementation (default: %(default)s: triton on CUDA, torch elsewhere)",
    )


def _add_dataset_options(p: argparse.ArgumentParser) -> None:
    from .evaluation.datasets import DATASET_NAMES

    g = p.add_argument_group("dataset")
    g.add_argument("--dataset", required=True, choices=DATASET_NAMES, help="which benchmark layout to read")
    g.add_argument("--root", required=True, help="the dataset folder (see docs/evaluation.md for layouts)")
    g.add_argument("--split", default="val", help="split to evaluate (default: %(default)s)")
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
        type=float,
        default=None,
        help="threshold for --background threshold/auto (default: the model's)",
    )
    g.add_argument(
        "--out", default="results", help="output folder; a rerun resumes from it (default: %(default)s)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lava",
        description="Training-free open-vocabulary semantic segmentation with Stable Diffusion 3 attention.",
        epilog="Run `lava COMMAND --help` for the options of each command.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    seg = sub.add_parser(
        "segment",
        help="segment images into named classes",
        description="Segment each IMAGE into the given classes by reading the text-image attention of one "
        "SD3 transformer pass on the noised image.",
        epilog=SEGMENT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    seg.add_argument(
        "images", nargs="+", metavar="IMAGE", help="image files (PNG, JPEG, ...; any colour mode)"
    )
    seg.add_argument(
        "--classes", required=True, help='comma-separated class names, e.g. "cat,dog,potted plant"'
    )
    seg.add_argument("--out", default="lava_out", help="output folder (default: %(default)s)")
    when = seg.add_mutually_exclusive_group()
    when.add_argument(
        "--timestep", type=float, help="model timestep in [0, 1000) to read (default: the model's)"
    )
    when.add_argument("--sigma", type=float, help="noise level σ in [0, 1) instead of --timestep")
    seg.add_argument(
        "--layers", type=_int_list, help="transformer blocks to read, e.g. 9 or 8,9,10 (default: the model's)"
    )
    seg.add_argument(
        "--background-threshold",
        type=float,
        default=None,
        help="label pixels whose best normalised score is below this as background (label 0); "
        "0 labels no pixel background (default: the model's, see `lava models`)",
    )
    seg.add_argument("--save-scores", action="store_true", help="also write per-class scores as .npz")
    seg.add_argument("--heatmaps", action="store_true", help="also write a per-class heatmap figure (PNG)")
    _add_model_options(seg)
    _add_reading_options(seg)

    ev = sub.add_parser(
        "eval",
        help="evaluate on a segmentation benchmark (mIoU)",
        description="Segment every image of a dataset split and report mIoU, per-class IoU and pixel "
        "accuracy from one confusion matrix over the whole split. Resumable; shards over processes "
        "under torchrun.",
        epilog=EVAL_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ev.add_argument(
        "--timestep", type=float, default=None, help="model timestep to read (default: the model's)"
    )
    ev.add_argument(
        "--layers", type=_int_list, default=None, help="blocks averaged into one map (default: the model's)"
    )
    ev.add_argument(
        "--visualize", type=int, default=0, metavar="K", help="write overlays of the first K images"
    )
    ev.add_argument(
        "--save-predictions",
        action="store_true",
        help="write every predicted label map as predictions/<id>.png (dataset ids, 255 = ignore)",
    )
    _add_dataset_options(ev)
    _add_model_options(ev)
    _add_reading_options(ev)

    sw = sub.add_parser(
        "sweep",
        help="evaluate a grid of timesteps x blocks (the poster's comparison)",
        description="Evaluate every (timestep, block) pair on a dataset with one noise+forward per "
        "timestep per image (all blocks are captured in the same pass). Writes sweep.csv, sweep.md, "
        "sweep.png and sweep.json.",
        epilog=SWEEP_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sw.add_argument("--timesteps", type=_float_list, required=True, help="e.g. 100,300,500,700,900")
    sw.add_argument(
        "--layers", type=_int_list, required=True, help="blocks, each evaluated alone, e.g. 0,3,6,9,12"
    )
    sw.add_argument(
        "--with-mean", action="store_true", help="also evaluate the mean over all the given blocks"
    )
    sw.add_argument(
        "--views",
        type=_views,
        default=None,
        help="attention views to compare, e.g. image_to_text:joint,text_to_image:cross, or 'all' for the "
        "four (default: --direction:--softmax); all come from the same forward pass",
    )
    _add_dataset_options(sw)
    _add_model_options(sw)
    _add_reading_options(sw)

    sub.add_parser(
        "models",
        help="list the available backends and their defaults",
        description="List the registered backends, what each loads, and its default settings.",
    )
    return parser


def _output_names(images: Sequence[str]) -> list[str]:
    stems = [Path(p).stem for p in images]
    seen: dict[str, str] = {}
    for path, stem in zip(images, stems):
        if stem in seen:
            raise ValueError(
                f"{seen[stem]} and {path} would write the same output files ({stem}_*.png); "
                "rename one or run them separately"
            )
        seen[stem] = path
    return stems


def cmd_models() -> int:
    from .backends import list_backends

    for name, what, d in list_backends():
        print(f"{name:20s} {what}")
        print(f"{'':20s}   timestep {d.timestep:g}, layers {list(d.layers)}, resolution {d.resolution}")
        print(f"{'':20s}   source: {d.source}")
        print(f"{'':20s}   masks: {d.describe_mask()}")
        print(f"{'':20s}   source: {d.mask_source}")
    return 0


def cmd_segment(args: argparse.Namespace) -> int:
    import numpy as np

    from . import io
    from .images import load_images
    from .pipeline import resolve_configs, segment
    from .prompts import parse_classes
    from .types import AggregateConfig

    classes = parse_classes(args.classes)
    stems = _output_names(args.images)
    images = load_images(args.images)  # every input is read before anything is written
    backend = _load_backend_for(args, sizes=[(im.height, im.width) for im in images])
    agg, mask = resolve_configs(
        backend,
        AggregateConfig(tokens=args.tokens),
        normalize=args.normalize,
        background_threshold=args.background_threshold,
        min_presence=args.min_presence,
    )
    if args.verbose:
        _describe_reading(backend, classes, args, agg, mask)
    seg = segment(
        images,
        classes,
        backend=backend,
        timestep=args.timestep,
        sigma=args.sigma,
        layers=args.layers,
        seed=args.seed,
        resolution=args.resolution,
        direction=args.direction,
        softmax=args.softmax,
        impl=args.attention_impl,
        max_classes_per_prompt=args.max_classes_per_prompt,
        prompt_batch=args.prompt_batch,
        aggregate_config=agg,
        mask_config=mask,
        progress=len(images) > 1,
    )
    out = Path(args.out)
    for i, stem in enumerate(stems):
        io.save_png(seg.label_image(i), out / f"{stem}_labels.png")
        io.save_png(seg.overlay(i), out / f"{stem}_overlay.png")
        io.atomic_write(out / f"{stem}_classes.txt", lambda p: p.write_text("\n".join(seg.classes) + "\n"))
        if args.save_scores:
            io.save_npz(
                out / f"{stem}_scores.npz",
                scores=seg.scores[i].numpy(),
                classes=np.array(seg.classes[-len(classes) :]),
            )
        if args.heatmaps:
            import matplotlib.pyplot as plt

            from .aggregate import normalize_scores
            from .types import Heatmaps

            heat = Heatmaps(
                scores=normalize_scores(seg.scores[i][None], "minmax"),
                classes=classes,
                image_sizes=(tuple(seg.scores[i].shape[-2:]),),
                normalize="minmax",
            )
            fig = heat.plot(0, image=images[i])
            io.save_figure(fig, out / f"{stem}_heatmaps.png")
            plt.close(fig)
        print(f"{args.images[i]} -> {out / (stem + '_labels.png')}")
    return 0


def _describe_reading(backend, classes, args, agg, mask) -> None:
    """``--verbose``: the prompts the classes were split into and the settings in force, on stderr."""
    from .prompts import build_prompt, split_classes

    groups = split_classes(backend, classes, max_classes_per_prompt=args.max_classes_per_prompt)
    per_forward = len(groups) if args.prompt_batch is None else min(args.prompt_batch, len(groups))
    print(
        f"lava: {len(classes)} classes in {len(groups)} prompt(s), {per_forward} per forward pass",
        file=sys.stderr,
    )
    for i, group in enumerate(groups):
        print(f"lava:   prompt {i + 1}: {build_prompt(group)[0]!r}", file=sys.stderr)
    d = backend.defaults
    bg = "none" if mask.background_threshold is None else f"threshold {mask.background_threshold:g}"
    if mask.min_presence is not None:
        bg += f", min presence {mask.min_presence:g}"
    print(
        f"lava: {backend.name}: "
        + (f"sigma {args.sigma:g}, " if getattr(args, "sigma", None) is not None else "")
        + f"timestep {args.timestep if args.timestep is not None else d.timestep:g}, "
        f"layers {list(args.layers or d.layers)}, {args.direction} with softmax over {args.softmax} keys, "
        f"normalize {agg.normalize}, background {bg} (model defaults: {d.source}; {d.mask_source})",
        file=sys.stderr,
    )


def _load_backend_for(args: argparse.Namespace, device: str | None = None, sizes=None):
    """The backend the options ask for; with ``--max-memory``, placed by the memory planner for
    images of the given original ``sizes`` (default: a square at the requested resolution)."""
    from .backends import load_backend

    model = args.model or DEFAULT_MODEL
    if args.model is None:
        print(
            f"lava: no --model given, using {DEFAULT_MODEL}: a small model trained on synthetic shape scenes "
            "(coloured circles, squares, triangles); it knows no photos. For real images use "
            "--model sd3-medium (or a hub id / local folder).",
            file=sys.stderr,
        )
    elif model == "tiny-sd3":
        print(
            "lava: tiny-sd3 has RANDOM weights, so its masks are meaningless (it exists for tests).",
            file=sys.stderr,
        )
    if not args.max_memory:
        return load_backend(
            model,
            device=device or args.device,
            dtype=args.dtype,
            drop_t5=args.drop_t5,
            offload_text_encoders=args.offload_text_encoders,
        )
    from .backends.base import resolve_device, resolve_dtype
    from .noise import input_size
    from .planner import apply_plan, parse_bytes, plan_memory

    budget = parse_bytes(args.max_memory)
    target = resolve_device(device or args.device)
    dtype = resolve_dtype(args.dtype, target)
    # Load on the CPU first so that planning can still move or drop parts before they reach the device.
    backend = load_backend(model, device="cpu", dtype=dtype, drop_t5=args.drop_t5)
    if sizes is None:
        if args.resolution == "original":
            raise ValueError(
                "--max-memory needs a resolution in px (or 'native') to plan for, not 'original'"
            )
        side = args.resolution or backend.defaults.resolution
        sizes = [(side, side)]
    processed = [input_size(backend, s, args.resolution) for s in sizes]
    worst = max(processed, key=lambda hw: hw[0] * hw[1])
    layers = args.layers if getattr(args, "layers", None) else backend.defaults.layers
    plan = plan_memory(
        backend.pipe,
        worst,
        budget,
        dtype=dtype,
        captured_layers=len(layers),
        text_tokens=backend.text_len,
        offload_text_encoders=args.offload_text_encoders,
    )
    print(
        f"lava: memory plan for {worst[1]}x{worst[0]} px within {args.max_memory}: {plan.describe()}",
        file=sys.stderr,
    )
    return apply_plan(backend, plan, device=target, dtype=dtype)


def _eval_setup(args: argparse.Namespace, cells_spec: dict):
    """Dataset, backend, settings and the config recorded with the results (shared by eval and sweep)."""
    from .evaluation import distributed
    from .evaluation.datasets import load_dataset
    from .evaluation.runner import EvalSettings

    device = distributed.init(args.device)
    dataset = load_dataset(args.dataset, args.root, args.split)
    if args.limit is not None:
        if args.limit <= 0:
            raise ValueError(f"--limit must be a positive number of images, got {args.limit}")
        dataset = dataset[: args.limit]
    backend = _load_backend_for(args, device)
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
        seed=args.seed,
        resolution=args.resolution,
        impl=args.attention_impl,
    )
    # Everything that changes a prediction; the journal refuses to mix results made otherwise.
    config = {
        "command": args.command,
        "dataset": args.dataset,
        "split": args.split,
        "model": backend.name,
        "variant": backend.variant,
        "dtype": str(backend.dtype),
        "text_tokens": backend.text_len,
        **cells_spec,
        **{k: v for k, v in vars(settings).items()},
    }
    return dataset, backend, settings, config


def _prompt_printer(args: argparse.Namespace):
    """With ``--verbose``, a callback that prints each distinct set of prompts once (on rank 0)."""
    from .evaluation import distributed

    if not args.verbose or not distributed.is_main():
        return None

    def show(prompt) -> None:
        print(f"lava: {len(prompt.classes)} classes in {prompt.num_prompts} prompt(s):", file=sys.stderr)
        for i, text in enumerate(prompt.texts):
            print(f"lava:   prompt {i + 1}: {text!r}", file=sys.stderr)

    return show


def cmd_eval(args: argparse.Namespace) -> int:
    from . import io
    from .evaluation import distributed
    from .evaluation.report import protocol_line, write_eval_report
    from .evaluation.runner import Cell, run
    from .viz import label_image

    dataset, backend, settings, config = _eval_setup(args, {})
    timestep = args.timestep if args.timestep is not None else backend.defaults.timestep
    layers = backend.check_layers(args.layers if args.layers is not None else backend.defaults.layers)
    backend.check_timestep(timestep)
    config.update(timestep=timestep, layers=list(layers))
    out = Path(args.out)
    shown = {"n": 0}

    def on_prediction(image_id, pred, seg, _cell):
        if args.save_predictions:
            io.save_png(label_image(pred), out / "predictions" / f"{image_id}.png")
        if shown["n"] < args.visualize:
            shown["n"] += 1
            io.save_png(seg.overlay(0), out / "vis" / f"{image_id}_overlay.png")

    result = run(
        backend,
        dataset,
        [Cell(float(timestep), layers, settings.direction, settings.softmax)],
        settings,
        out,
        config=config,
        on_prediction=on_prediction,
        prompt_batch=args.prompt_batch,
        on_prompt=_prompt_printer(args),
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


def cmd_sweep(args: argparse.Namespace) -> int:
    from .evaluation import distributed
    from .evaluation.report import write_sweep
    from .evaluation.runner import Cell, run

    dataset, backend, settings, config = _eval_setup(
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
    views = args.views or [(args.direction, args.softmax)]
    cells = [Cell(float(t), g, d, sm) for d, sm in views for t in args.timesteps for g in groups]
    out = Path(args.out)
    result = run(
        backend,
        dataset,
        cells,
        settings,
        out,
        config=config,
        prompt_batch=args.prompt_batch,
        on_prompt=_prompt_printer(args),
    )
    if distributed.is_main():
        summary = write_sweep(out, dataset.info, cells, result.matrices, settings, result.num_images, config)
        best = summary["best"]
        print((out / "sweep.md").read_text())
        print(f"best: timestep {best['timestep']:g}, blocks {best['layers']}, mIoU {best['miou']}")
        print(f"  table: {out / 'sweep.md'}  figure: {out / 'sweep.png'}")
    distributed.shutdown()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from .errors import LavaError

    try:
        commands = {
            "models": lambda: cmd_models(),
            "segment": lambda: cmd_segment(args),
            "eval": lambda: cmd_eval(args),
            "sweep": lambda: cmd_sweep(args),
        }
        return commands[args.command]()
    except (LavaError, ValueError, OSError) as err:
        print(f"lava: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("lava: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""``lava segment``: label images with named classes and write one set of files per image."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from ..results import write_set
from .args import add_model_options, add_option, add_reading_options, check_source, option_values
from .loading import dry_run, load_backend_for
from .output import check_output_folder, note

EPILOG = """\
examples:
  lava segment photo.jpg --classes "cat,dog,sofa" --model sd3-medium --out results/
  lava segment a.png b.png --classes "person,bicycle" --layers 8,9,10 --timestep 515 --save-scores

for each IMAGE, --out receives:
  <name>_labels.png   label map (pixel value i = i-th class, see <name>_classes.txt): a palette PNG,
                      or with more than 256 labels a 16-bit grayscale PNG
  <name>_overlay.png  label colours over the image, with a legend (class -> colour) in a corner of
                      background, else beside the image (a wider file)
  <name>_classes.txt  the class of each label value, one per line
  <name>_scores.npz   per-class scores [C, H, W] (with --save-scores)
  <name>_heatmaps.png one heatmap per class (with --heatmaps)
Each image's files are written as soon as it is done, all together: an interrupted run leaves
whole sets for the images finished and nothing of the others.

With --format coco, --out receives one file for the whole run instead:
  coco.json           COCO instance annotations: one category per class (ids 1..C in --classes
                      order), one annotation per class present in an image with its pixels as
                      compressed RLE (pycocotools reads it), area and bbox; images by file name.
                      Written when the last image is done (an interrupted run writes none).

background: with --background-threshold, weak pixels are labelled "background" (label 0). A class
named "background" in --classes is refused together with --background-threshold; it replaces a
threshold that is only the model's default.

With no --model, lava uses lava-shapes: a small SD3-architecture model trained by lava on
synthetic scenes of coloured circles, squares and triangles; it runs offline but knows no photos.
For real photos pass --model sd3-medium (or a hub id / local folder).
"""

FORMATS = ("png", "coco")
COCO_FILE = "coco.json"


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "segment",
        help="segment images into named classes",
        description="Segment each IMAGE into the given classes by reading the text-image attention of one "
        "SD3 transformer pass on the noised image.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (PNG, JPEG, ...; any colour mode)")
    p.add_argument(
        "--classes", required=True, help='comma-separated class names, e.g. "cat,dog,potted plant"'
    )
    p.add_argument("--out", default="lava_out", help="output folder (default: %(default)s)")
    when = p.add_mutually_exclusive_group()
    for name in ("timestep", "sigma", "timesteps"):
        add_option(when, name)
    add_option(p, "layers")
    add_option(p, "background_threshold")
    p.add_argument("--save-scores", action="store_true", help="also write per-class scores as .npz")
    p.add_argument("--heatmaps", action="store_true", help="also write a per-class heatmap figure (PNG)")
    p.add_argument(
        "--format",
        choices=FORMATS,
        default="png",
        help="png: a set of files per image (default); coco: one COCO json with RLE masks for the run",
    )
    add_model_options(p)
    add_reading_options(p)
    return p


def output_names(images: Sequence[str]) -> list[str]:
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


def output_files(out: Path, stem: str, args: argparse.Namespace) -> dict[str, Path]:
    """The files one image's set consists of, by kind."""
    files = {kind: out / f"{stem}_{kind}{ext}" for kind, ext in (("labels", ".png"), ("overlay", ".png"))}
    files["classes"] = out / f"{stem}_classes.txt"
    if args.save_scores:
        files["scores"] = out / f"{stem}_scores.npz"
    if args.heatmaps:
        files["heatmaps"] = out / f"{stem}_heatmaps.png"
    return files


def run(args: argparse.Namespace) -> int:
    from ..config import recipe
    from ..images import image_size
    from ..pipeline import segment_iter
    from ..stages.mask import check_background_class
    from ..stages.prompts import parse_classes
    from ..viz import check_label_count

    classes = parse_classes(args.classes)
    check_background_class(classes, args.background_threshold)
    # Refused before the model loads: one label id per class, plus 0 for background unless it is off.
    check_label_count(len(classes) + (args.background_threshold != 0), "labels (the classes and background)")
    check_source(args)
    coco = args.format == "coco"
    if coco and (args.save_scores or args.heatmaps):
        raise ValueError("--save-scores and --heatmaps write per-image files: use them with --format png")
    stems = output_names(args.images)
    # Every input is checked (opened, header read) before the model loads; pixels are read one
    # image at a time later, so memory does not grow with the number of images.
    sizes = [image_size(path) for path in args.images]
    if args.dry_run:
        return dry_run(args, sizes=sizes)
    out = Path(args.out)
    sets = [] if coco else [output_files(out, stem, args) for stem in stems]
    check_output_folder(out, [out / COCO_FILE] if coco else [p for files in sets for p in files.values()])
    backend = load_backend_for(args, sizes=sizes, announce_plan=False)
    plan = recipe(backend, classes=classes, **option_values(args))
    note(run_summary(backend, plan, sizes) if args.method == "lava" else method_summary(backend))
    if args.verbose and args.method == "lava":
        describe_reading(backend, classes, plan)
    results = segment_iter(args.images, classes, backend=backend, recipe=plan, progress=len(args.images) > 1)
    if coco:
        return write_coco(out / COCO_FILE, results, args.images)
    for i, seg in results:
        write_set(sets[i], seg, classes)
        del seg  # hold nothing of this image while the next one runs
        print(f"{args.images[i]} -> {sets[i]['labels']}", flush=True)
    return 0


def write_coco(path: Path, results, images: Sequence[str]) -> int:
    """Collect each image's label map as COCO annotations (image ids 1…N in the order given, file
    names as given without their folders) and write one json when the last is done."""
    import json

    from ..coco import CocoBuilder
    from ..io import atomic_write

    builder = None
    for i, seg in results:
        if builder is None:
            builder = CocoBuilder(seg.classes, background=seg.has_background)
        builder.add(seg.labels[0], Path(images[i]).name, image_id=i + 1)
        del seg
    data = json.dumps(builder.dataset(description="lava segment"))
    atomic_write(path, lambda tmp: tmp.write_text(data))
    print(f"{len(images)} image(s) -> {path}", flush=True)
    return 0


def _when(backend, reading) -> str:
    """The timestep(s) and seed(s) of a reading, as the summary lines say them."""
    if reading.sigma is not None:
        when = f"timestep {backend.timestep_for_sigma(reading.sigma):g} (sigma {reading.sigma:g})"
    elif len(reading.timesteps) > 1:
        when = f"timesteps {', '.join(f'{t:g}' for t in reading.timesteps)} averaged"
    else:
        when = f"timestep {reading.timesteps[0]:g}"
    if len(reading.seeds) > 1:
        when += f", seeds {', '.join(map(str, reading.seeds))} averaged"
    return when


def run_summary(backend, plan, sizes) -> str:
    """The one line ``lava segment`` prints before it starts: model, variant, timestep, blocks,
    resolution, dtype, device, text encoders and the memory plan when ``--max-memory`` made one.

    The resolution is checked here (timestep and blocks were, by ``lava.config.recipe``), so a
    run that would fail on it says so instead of announcing itself.
    """
    from ..stages.noise import input_size

    d, reading = backend.defaults, plan.reading
    for size in sizes:
        input_size(backend, size, reading.resolution)  # refuses a side beyond the position embedding
    if reading.resolution is None:
        res = f"resolution {d.resolution} px (native)"
    elif reading.resolution == "original":
        res = "resolution original (each image's own size)"
    else:
        res = f"resolution {reading.resolution} px"
    dtype = str(backend.dtype).removeprefix("torch.")
    text = f"text encoders {backend.text_encoders}"
    if backend.text_device != backend.device:
        text += f" on {backend.text_device}"
    line = (
        f"running {backend.name} (variant {backend.variant}): {_when(backend, reading)}, "
        f"blocks {list(reading.layers)}, {res}, {dtype} on {backend.device}, {text}"
    )
    if reading.source == "concept":
        line += ", concept view"
    if plan.refine_label is not None:
        line += f", refine {plan.refine_label}"
    if "memory_plan" in backend.info:
        within = backend.info.get("memory_plan_for")
        line += f"; memory plan{' ' + within if within else ''}: {backend.info['memory_plan']}"
    return line


def method_summary(segmenter) -> str:
    """``lava segment``'s opening line for a comparison method (``--method``): what it reads."""
    dtype = str(segmenter.dtype).removeprefix("torch.")
    return f"running {segmenter.describe()}; {dtype} on {segmenter.device}"


def describe_reading(backend, classes, plan) -> None:
    """``--verbose``: the prompts the classes were split into and the settings in force, on stderr."""
    from ..stages.prompts import build_prompt, split_classes

    reading, agg, mask = plan.reading, plan.aggregate, plan.mask
    groups = split_classes(backend, classes, max_classes_per_prompt=plan.prompt.max_classes_per_prompt)
    per_forward = len(groups) if reading.prompt_batch is None else min(reading.prompt_batch, len(groups))
    note(f"{len(classes)} classes in {len(groups)} prompt(s), {per_forward} per forward pass")
    for i, group in enumerate(groups):
        note(f"  prompt {i + 1}: {build_prompt(group)[0]!r}")
    d = backend.defaults
    bg = "none" if mask.background_threshold is None else f"threshold {mask.background_threshold:g}"
    if mask.min_presence is not None:
        bg += f", min presence {mask.min_presence:g}"
        if agg.presence != "peak":
            bg += f" ({agg.presence} presence)"
    view = (
        "concept view (softmax over classes)"
        if reading.source == "concept"
        else f"{reading.direction} with softmax over {reading.softmax} keys"
    )
    note(
        f"{backend.name}: {_when(backend, reading)}, layers {list(reading.layers)}, {view}, "
        f"normalize {agg.normalize}, background {bg} (model defaults: {d.source}; {d.mask_source})"
    )
    sys.stderr.flush()

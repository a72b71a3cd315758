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

DEFAULT_MODEL = "tiny-sd3"

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

With no --model, lava uses tiny-sd3: a toy model with random weights that runs offline but
gives meaningless masks. For real photos pass --model sd3-medium (or a hub id / local folder).
"""


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated block numbers like 9,10, got {text!r}"
        ) from err


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lava",
        description="Training-free open-vocabulary semantic segmentation with Stable Diffusion 3 attention.",
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
    seg.add_argument(
        "--model",
        default=None,
        help=f"backend name (see `lava models`), hub id or local folder (default: {DEFAULT_MODEL})",
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
    seg.add_argument("--seed", type=int, default=0, help="noise seed (default: %(default)s)")
    seg.add_argument(
        "--resolution",
        type=_resolution,
        default=None,
        help="long image side fed to the model in px, 'native' (default) or 'original'",
    )
    seg.add_argument(
        "--direction",
        choices=("image_to_text", "text_to_image"),
        default="image_to_text",
        help="which attention to read (default: %(default)s)",
    )
    seg.add_argument(
        "--softmax",
        choices=("joint", "cross"),
        default="joint",
        help="joint: normalised over all keys as the model does; cross: over the other modality only",
    )
    seg.add_argument(
        "--tokens",
        choices=("all", "clip", "t5"),
        default="all",
        help="which part of each class's tokens to average (default: %(default)s)",
    )
    seg.add_argument(
        "--normalize",
        choices=("minmax", "classes", "none"),
        default="minmax",
        help="per-class score normalisation (default: %(default)s)",
    )
    seg.add_argument(
        "--background-threshold",
        type=float,
        default=None,
        help="label pixels whose best normalised score is below this as background (label 0)",
    )
    seg.add_argument(
        "--attention-impl",
        choices=("auto", "naive", "torch", "triton"),
        default="auto",
        help="attention-slice implementation (default: %(default)s)",
    )
    seg.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    seg.add_argument(
        "--dtype", default=None, help="float32, float16 or bfloat16 (default: bf16 on GPU, fp32 on CPU)"
    )
    seg.add_argument(
        "--drop-t5", action="store_true", help="do not load or run the T5 text encoder (saves memory)"
    )
    seg.add_argument("--offload-text-encoders", action="store_true", help="keep the text encoders on the CPU")
    seg.add_argument("--save-scores", action="store_true", help="also write per-class scores as .npz")
    seg.add_argument("--heatmaps", action="store_true", help="also write a per-class heatmap figure (PNG)")

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
    return 0


def cmd_segment(args: argparse.Namespace) -> int:
    import numpy as np

    from . import io
    from .backends import load_backend
    from .images import load_images
    from .pipeline import segment
    from .prompts import parse_classes
    from .types import AggregateConfig, MaskConfig

    classes = parse_classes(args.classes)
    stems = _output_names(args.images)
    images = load_images(args.images)  # every input is read before anything is written
    model = args.model or DEFAULT_MODEL
    if args.model is None:
        print(
            f"lava: no --model given, using {DEFAULT_MODEL}: a toy model with RANDOM weights, so the masks "
            "are meaningless. Use --model sd3-medium (or a hub id / local folder) for real images.",
            file=sys.stderr,
        )
    backend = load_backend(
        model,
        device=args.device,
        dtype=args.dtype,
        drop_t5=args.drop_t5,
        offload_text_encoders=args.offload_text_encoders,
    )
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
        aggregate_config=AggregateConfig(tokens=args.tokens, normalize=args.normalize),
        mask_config=MaskConfig(background_threshold=args.background_threshold),
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from .errors import LavaError

    try:
        if args.command == "models":
            return cmd_models()
        return cmd_segment(args)
    except (LavaError, ValueError, OSError) as err:
        print(f"lava: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("lava: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

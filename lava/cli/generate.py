"""``lava generate``: generate images from prompts and write them, with the masks of named words read
by ``lava.trace``, as a segmentation dataset (``lava.generate`` does the work)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .args import DEFAULT_MODEL, add_model_flags, add_option, add_verbose_option
from .output import check_output_folder, note

EPILOG = """\
examples:
  lava generate "a red circle and a blue square" --words "red circle" "blue square" --count 50 --out gen/
  lava generate "a cat on a sofa" "a dog on a sofa" --words cat dog sofa --count 100 \\
      --model sd3-medium --steps 28 --size 1024 --out cats/
  torchrun --nproc-per-node=4 -m lava.cli generate "a cat on a sofa" --words cat,sofa --count 1000 \\
      --model sd3-medium --out cats/

--out receives the layout `lava eval --dataset folder --root DIR` reads:
  images/<id>.png     the generated images (<id>: 000000, 000001, ...)
  labels/<id>.png     label maps: pixel value i = line i of classes.txt (palette PNG)
  overlays/<id>.png   label colours over the image, with a legend
  classes.txt         "background" first when the model's mask has a background threshold (see
                      `lava models`; --background-threshold 0 turns it off), then the words
  coco.json           COCO instances: one category per word (ids 1..C in --words order), one RLE
                      annotation per word present in an image; each image with its prompt and seed
  journal.rank*.jsonl the items done (a stopped run resumes from it)

items and seeds: --count images of each prompt; image k of prompt p (of P prompts) is item
k*P + p and is generated from the seed --seed + item (a CPU torch.Generator). So the same command
writes the same bytes on the same machine and software, a run stopped and started again gives the
same files as one that was never stopped, and a rerun with a larger --count adds items and keeps
the ones made. Each image is segmented into the words of its own prompt; every word must occur in
some prompt (whole words, any case) and every prompt must hold a word.

Each item's three files appear together (written to temporary files, then renamed); classes.txt
and coco.json are written when the last item is done. A rerun into a folder made with other
settings is refused (the error names them), and so is a folder with images/ or labels/ files but
no journal. Under torchrun each process makes every n-th item
left, and process 0 writes classes.txt and coco.json when all are done (one shared --out folder).

The masks are lava.trace's: the image->text attention of the traced blocks averaged over all
denoising steps of the conditional (prompt) half, through lava's aggregate/refine/mask stages with
the model's defaults (see docs/trace.md). With no --model, lava uses lava-shapes (a small SD3 model
of coloured circles, squares and triangles; 64 px, runs on a CPU in about a second per image).
"""


def size(text: str) -> tuple[int, int]:
    """``--size``: a side in pixels (a square) or ``WxH``; returns ``(height, width)``."""
    from ..options import stretch_size

    hw = stretch_size(text)
    if hw is not None:
        return hw
    try:
        side = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a side in pixels or WxH like 96x64, got {text!r}"
        ) from None
    if side <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive, got {side}")
    return side, side


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "generate",
        help="generate images with masks of named words (a segmentation dataset)",
        description="Generate --count images of each PROMPT with a diffusers pipeline, trace where each "
        "of --words goes while it generates (lava.trace), and write the images, label maps, overlays and "
        "a COCO file as a dataset that `lava eval --dataset folder` reads. Resumable; shards over "
        "processes under torchrun.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("prompts", nargs="+", metavar="PROMPT", help="one or more prompts (quote each)")
    p.add_argument(
        "--words",
        nargs="+",
        required=True,
        metavar="WORD",
        help='the classes: words of the prompts, e.g. --words cat sofa, or "red circle" "blue square" '
        "(several words as one class), or one comma-separated list",
    )
    p.add_argument("--count", type=int, default=1, metavar="N", help="images per prompt (default: 1)")
    p.add_argument("--out", required=True, metavar="DIR", help="the dataset folder (created if missing)")
    g = p.add_argument_group("generation")
    g.add_argument(
        "--steps",
        type=int,
        default=None,
        help="denoising steps (default: the pipeline's, 28 for SD3 and Flux)",
    )
    g.add_argument(
        "--guidance",
        type=float,
        default=None,
        metavar="SCALE",
        help="guidance_scale of the pipeline call (default: the pipeline's, 7.0 for SD3)",
    )
    g.add_argument(
        "--seed",
        type=int,
        default=0,
        help="item i is generated from seed + i (default: 0): the same command gives the same bytes",
    )
    g.add_argument(
        "--size",
        type=size,
        default=None,
        help="image size: a side in px (square) or WxH, multiples of the model's token size "
        "(default: the model's native resolution, 64 for lava-shapes, 1024 for sd3-medium)",
    )
    m = p.add_argument_group("masks (the model's defaults unless given; see `lava models`)")
    add_option(m, "layers", help="blocks to trace and average, e.g. 9 or 8,9,10 (default: the model's)")
    for name in ("background_threshold", "min_presence", "refine", "normalize", "tokens", "presence"):
        add_option(m, name)
    g = p.add_argument_group("model")
    add_model_flags(g)
    g.add_argument(
        "--dry-run",
        action="store_true",
        help="check the prompts and words, print the items (prompt, seed, files) and exit: no model "
        "is loaded and nothing is written",
    )
    add_verbose_option(g)
    # What the shared model loader reads and this command does not offer.
    p.set_defaults(method="lava", max_memory=None, resolution=None, offload_text_encoders=False)
    return p


def mask_options(args: argparse.Namespace) -> dict:
    from ..generation import TRACE_OPTIONS

    return {name: getattr(args, name) for name in TRACE_OPTIONS if getattr(args, name) is not None}


def run(args: argparse.Namespace) -> int:
    from ..generation import COCO_FILE, generate, plan_items

    args.words = ",".join(args.words)  # --words a "b c" d,e: each argument may list several
    items = plan_items(args.prompts, args.words, args.count, args.seed)  # checked before anything loads
    out = Path(args.out)
    if args.dry_run:
        return dry_run(args, items, out)
    check_output_folder(out, [out / COCO_FILE])
    from ..evaluation import distributed
    from .loading import load_backend_for

    device = distributed.init(args.device)
    backend = load_backend_for(args, device)
    result = generate(
        args.prompts,
        args.words,
        out,
        count=args.count,
        backend=backend,
        steps=args.steps,
        guidance=args.guidance,
        seed=args.seed,
        size=args.size,
        on_note=note if distributed.is_main() else None,
        **mask_options(args),
    )
    if distributed.is_main():
        print(
            f"{len(result.items)} image(s) in {out} ({result.generated} made now, {result.resumed} resumed); "
            f"classes: {', '.join(result.classes)}"
        )
        print(f"  COCO: {result.coco}")
        print(f"  evaluate: lava eval --dataset folder --root {out}")
    distributed.shutdown()
    return 0


def dry_run(args: argparse.Namespace, items, out: Path) -> int:
    """``--dry-run``: the items and files a run would make; loads nothing, writes nothing."""
    model = args.model or DEFAULT_MODEL
    print(
        f"dry run: {len(items)} image(s) ({len(args.prompts)} prompt(s) x {args.count}) with {model} into "
        f"{out}; nothing loaded or written"
    )
    n = len(args.prompts)
    for i, prompt in enumerate(args.prompts):  # items[i] is the first image of prompt i
        print(f"  prompt {i + 1}: {prompt!r} -> {', '.join(items[i].words)}")
    shown = items[:8]
    for item in shown:
        print(f"  {item.id}: prompt {item.index % n + 1}, seed {item.seed}")
    if len(items) > len(shown):
        print(f"  ... {len(items) - len(shown)} more, up to {items[-1].id} (seed {items[-1].seed})")
    print(f"  files: {out}/{{images,labels,overlays}}/<id>.png, {out}/classes.txt, {out}/coco.json")
    return 0

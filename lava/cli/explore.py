"""``lava explore``: a local web app to look at the attention maps (Gradio, an optional extra)."""

from __future__ import annotations

import argparse

from ..errors import LavaError
from .args import add_model_options, add_verbose_option
from .loading import dry_run, load_backend_for
from .output import note

EPILOG = """\
examples:
  lava explore                                  # lava-shapes, offline on a CPU: http://127.0.0.1:7860
  lava explore --model sd3-medium --port 8080

The model loads once; every browser tab shares it and requests queue for it (one forward at a
time). Changing the background settings, or blocks already read, re-uses the captured maps.
Needs the explore extra: pip install -e ".[explore]". See docs/explore.md.
"""


def upload_size(text: str) -> int:
    """``--max-upload`` in megabytes: a positive number."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of megabytes like 10, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of megabytes, got {text!r}")
    return value


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "explore",
        help="explore the attention maps in the browser (a local web app)",
        description="Start a local web app: pick an image and class names, move the timestep, choose "
        "blocks and views, and see the label map, one heatmap per class and a timestep x block grid.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default: %(default)s, this machine only; 0.0.0.0 opens the app to "
        "the network, with no login)",
    )
    p.add_argument("--port", type=int, default=7860, help="port to listen on (default: %(default)s)")
    p.add_argument(
        "--max-upload",
        type=upload_size,
        default=10,
        metavar="MB",
        help="refuse uploads larger than this many megabytes (MiB; default: %(default)s)",
    )
    add_model_options(p)
    add_verbose_option(p)
    return p


def run(args: argparse.Namespace) -> int:
    from ..explore.app import require_gradio, serve
    from ..explore.session import Explorer

    if getattr(args, "method", "lava") != "lava":
        raise LavaError(
            f"lava explore shows how lava reads an MM-DiT's attention; --method {args.method} has no "
            "blocks or timesteps to explore (use lava segment / lava eval --method for it)"
        )
    backend_args = argparse.Namespace(**{**vars(args), "resolution": None, "layers": None})
    if args.dry_run:  # the plan for the model's own resolution; no app starts
        return dry_run(backend_args)
    require_gradio()  # before the model loads: say at once what is missing
    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be between 1 and 65535, got {args.port}")
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        note(f"listening on {args.host}: anyone who can reach it can use this app (there is no login)")

    def explorer(folder):
        return Explorer(load_backend_for(backend_args), root=folder)

    note(f"starting on http://{args.host}:{args.port} (Ctrl+C stops it)")
    serve(
        explorer, host=args.host, port=args.port, max_upload=round(args.max_upload * 1024 * 1024), ready=note
    )
    return 0

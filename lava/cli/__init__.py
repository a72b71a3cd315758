"""The ``lava`` command: segment images, evaluate on datasets, sweep settings, list models.

One module per command (``segment``, ``eval``, ``sweep``, ``models``), each with ``add_parser``
and ``run``; what they share is in ``common``. Building the parser imports nothing heavy, so
``lava --help`` and ``lava --version`` answer at once; a command imports torch and the models
only when it runs.

Every error is one line on stderr (``lava: error: ...``) and a non-zero exit code; result
files are written atomically, so a failed run leaves no partial file.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from .. import __version__

# In the order `lava --help` lists them.
COMMANDS = ("segment", "eval", "sweep", "models", "explore")


def _command(name: str):
    return importlib.import_module(f".{name}", __name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lava",
        description="Training-free open-vocabulary semantic segmentation with Stable Diffusion 3 attention.",
        epilog="Run `lava COMMAND --help` for the options of each command.",
    )
    parser.add_argument("--version", action="version", version=f"lava {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        _command(name).add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # The words as typed: a --preset fills only the options not given on the command line.
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.command is None:
        parser.print_help()
        return 2
    from ..errors import LavaError
    from .common import apply_preset, error_message, quiet_libraries

    verbose_loading = None
    try:
        verbose = getattr(args, "verbose", False)
        quiet_libraries(verbose=verbose)
        if verbose:  # lava.load_backend is quiet unless told otherwise: --verbose tells it
            from ..backends.loading import VERBOSE_LOADING

            verbose_loading = VERBOSE_LOADING.set(True)
        apply_preset(args)  # first: a preset fills the options every later check looks at
        return _command(args.command).run(args)
    except (LavaError, ValueError, OSError) as err:
        print(f"lava: error: {error_message(err)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("lava: interrupted", file=sys.stderr)
        return 130
    finally:
        if verbose_loading is not None:
            VERBOSE_LOADING.reset(verbose_loading)


__all__ = ["COMMANDS", "build_parser", "main"]

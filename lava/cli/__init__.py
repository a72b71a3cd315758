"""The ``lava`` command: segment images, evaluate on datasets, sweep settings, list models.

One module per command (``segment``, ``eval``, ``sweep``, ``models``, ``explore``), each with
``add_parser`` and ``run``; ``parser`` puts them together. What they share is split by concern:
``args`` (argument types, option groups, checks of option combinations), ``preset``
(``--preset``), ``loading`` (the model, ``--max-memory``, ``--dry-run``), ``output`` (messages,
output folders) and ``evalsetup`` (what eval and sweep share). Building the parser imports
nothing heavy, so ``lava --help`` and ``lava --version`` answer at once; a command imports torch
and the models only when it runs.

Every error is one line on stderr (``lava: error: ...``) and a non-zero exit code; result
files are written atomically, so a failed run leaves no partial file.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from ..errors import LavaError, error_message
from .parser import COMMANDS, build_parser, command_module
from .preset import apply_preset


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # The words as typed: a --preset fills only the options not given on the command line.
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.command is None:
        parser.print_help()
        return 2
    from ..backends.loading import library_output

    try:
        # diffusers' and transformers' warnings and bars only with --verbose, for this command.
        with library_output(verbose=getattr(args, "verbose", False)):
            apply_preset(args)  # first: a preset fills the options every later check looks at
            return command_module(args.command).run(args)
    except (LavaError, ValueError, OSError) as err:
        print(f"lava: error: {error_message(err)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("lava: interrupted", file=sys.stderr)
        return 130


__all__ = ["COMMANDS", "build_parser", "main"]

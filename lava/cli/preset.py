"""``--preset``: a published setting filled into the options not typed on the command line."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from ..errors import LavaError
from ..presets import PRESETS
from .output import note
from .parser import build_parser


def explicit_options(argv: Sequence[str]) -> set[str]:
    """The destinations of the options typed in ``argv`` (not left at their defaults), found by
    parsing it again with every default replaced by a marker (so abbreviations count too)."""
    parser = build_parser()
    unset = object()
    parsers = [parser]
    while parsers:
        current = parsers.pop()
        for action in current._actions:
            action.default = unset
            if isinstance(action, argparse._SubParsersAction):
                parsers += list(action.choices.values())
    return {key for key, value in vars(parser.parse_args(argv)).items() if value is not unset}


def apply_preset(args: argparse.Namespace) -> None:
    """Fill the options of ``args.preset`` (``lava.presets``) that were not given on the command line.

    Options given as well keep their value and are named in a note (the run then differs from the
    published setting). A sweep keeps its own --timesteps/--layers grid. Refuses a preset of
    another method than ``--method``'s."""
    if not getattr(args, "preset", None):
        return
    preset = PRESETS[args.preset]
    given = explicit_options(getattr(args, "argv", None) or [])
    if args.method != preset.method:
        raise LavaError(
            f"--preset {preset.name} is a setting of --method {preset.method}, not --method {args.method}"
        )
    if "model" not in given:
        args.model = preset.model
    kept = []
    for key, value in preset.options.items():
        if args.command == "sweep" and key in preset.grid:
            continue  # a sweep varies these itself
        if callable(value):  # worked out when applied (e.g. Seg4Diff's timestep from its schedule)
            value = value()
        if key != "max_sequence_length" and not hasattr(args, key):
            continue  # an option this command does not have
        if key in given:
            if getattr(args, key) != value:
                kept.append(f"--{key.replace('_', '-')} {getattr(args, key)}")
            continue
        setattr(args, key, value)
    if kept:
        note(
            f"--preset {preset.name}: kept the options given ({', '.join(kept)}) over the preset's values; "
            f"this run does not reproduce {preset.paper} exactly"
        )

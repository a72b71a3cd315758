"""The ``lava`` argument parser: one subcommand per module of ``lava.cli``, each with ``add_parser``
and ``run``. Building it imports nothing heavy, so ``lava --help`` answers at once."""

from __future__ import annotations

import argparse
import importlib

from .. import __version__

# In the order `lava --help` lists them.
COMMANDS = ("segment", "generate", "eval", "sweep", "models", "explore")


def command_module(name: str):
    return importlib.import_module(f".{name}", __package__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lava",
        description="Training-free open-vocabulary semantic segmentation with Stable Diffusion 3 attention.",
        epilog="Run `lava COMMAND --help` for the options of each command.",
    )
    parser.add_argument("--version", action="version", version=f"lava {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        command_module(name).add_parser(sub)
    return parser

"""``lava models``: the registered backends, what each loads, and its defaults with their sources."""

from __future__ import annotations

import argparse

from .common import add_verbose_option


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "models",
        help="list the available backends and their defaults",
        description="List the registered backends, what each loads, and its default settings.",
    )
    add_verbose_option(p)
    return p


def run(args: argparse.Namespace) -> int:
    from ..backends import list_backends

    for name, what, d in list_backends():
        print(f"{name:20s} {what}")
        print(f"{'':20s}   timestep {d.timestep:g}, layers {list(d.layers)}, resolution {d.resolution}")
        print(f"{'':20s}   source: {d.source}")
        print(f"{'':20s}   masks: {d.describe_mask()}")
        print(f"{'':20s}   source: {d.mask_source}")
    return 0

"""``lava models``: the registered backends, what each loads, and its defaults with their sources."""

from __future__ import annotations

import argparse

from .args import add_verbose_option


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
        read = f"timestep {d.timestep:g}, layers {list(d.layers)}, resolution {d.resolution}"
        if d.max_classes_per_prompt is not None:
            read += f", at most {d.max_classes_per_prompt} class(es) per prompt"
        print(f"{'':20s}   {read}")
        print(f"{'':20s}   source: {d.source}")
        print(f"{'':20s}   masks: {d.describe_mask()}")
        print(f"{'':20s}   source: {d.mask_source}")
    from ..methods import list_segmenters
    from ..presets import PRESETS

    print("\ncomparison methods (--method NAME --model MODEL):")
    for method, name, what, d in list_segmenters():
        print(f"{name:20s} --method {method}: {what}")
        if method == "stableseg":
            layers = f"cross-attention layers {list(d.layers)}"
            print(f"{'':20s}   timestep {d.timestep:g}, {layers}, resolution {d.resolution}")
        else:
            print(f"{'':20s}   short side {d.resolution} px")
        print(f"{'':20s}   source: {d.source}")
    print("\npresets (--preset NAME):")
    for name, preset in PRESETS.items():
        print(f"{name:20s} {preset.paper}: --method {preset.method} --model {preset.model}")
    return 0

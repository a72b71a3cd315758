"""Time and peak memory of each map source / refinement / ensemble, relative to the plain slice.

    python benchmarks/map_sources.py --json docs/results/map-sources-cost.json \
        --markdown docs/results/map-sources-cost.md

Every method is a named setting of ``scripts.measure`` (the same settings whose mIoU that
script reports), run through ``lava.segment`` on ``lava-shapes`` with all 12 class names, on the
first ``--scenes`` held-out scenes of the hard split. All methods run in this one process, the
plain slice (``defaults-no-refine``: attention probabilities, no refinement) first, and each is
reported as the ratio of its median to the plain slice's, which is what survives a noisy shared
machine. Peak memory is the largest total
of live tensor bytes during one call (``memprobe.peak_bytes``: the allocator's counter on CUDA,
the profiler's memory events replayed on CPU).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from memprobe import peak_bytes
from PIL import Image

METHODS = (
    "defaults-no-refine",
    "defaults",
    "concept-no-refine",
    "concept",
    "propagate",
    "propagate-pamr",
    "seeds-5",
    "timesteps-3",
)
BASE = "defaults-no-refine"  # the plain slice: attention probabilities, no refinement


def main(argv: list[str] | None = None) -> None:
    import lava
    from lava.reference.scenes import class_names, heldout_seeds, make_scene
    from scripts.measure import SETTINGS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenes", type=int, default=20, help="hard held-out scenes to time")
    p.add_argument("--methods", default=",".join(METHODS), help="measure.py setting names, comma-separated")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=None)
    p.add_argument("--markdown", default=None)
    a = p.parse_args(argv)

    names = a.methods.split(",")
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        p.error(f"unknown methods {unknown}: expected some of {list(SETTINGS)}")
    names = [BASE, *[n for n in names if n != BASE]]
    backend = lava.load_backend("lava-shapes", device=a.device)
    classes = list(class_names()[1:])
    images = [Image.fromarray(make_scene(s).render(64)) for s in heldout_seeds(a.scenes, "hard")]
    seconds: dict[str, list[float]] = {n: [] for n in names}
    peaks: dict[str, list[int]] = {n: [] for n in names}
    for name in names:
        kwargs = SETTINGS[name].segment_kwargs()

        def call(image, kwargs=kwargs):
            return lava.segment(image, classes, backend=backend, **kwargs)

        call(images[0])  # warm-up: first-call costs (kernels, caches) are not the method's
        for image in images:
            start = time.perf_counter()
            call(image)
            seconds[name].append(time.perf_counter() - start)
        for image in images[:3]:
            peaks[name].append(peak_bytes(lambda image=image: call(image), a.device)[0])

    base_t = statistics.median(seconds[BASE])
    base_m = statistics.median(peaks[BASE])
    rows = []
    for name in names:
        t, m = statistics.median(seconds[name]), statistics.median(peaks[name])
        rows.append(
            {
                "method": name,
                "doc": SETTINGS[name].doc,
                "median_ms": round(1000 * t, 2),
                "time_vs_plain": round(t / base_t, 2),
                "peak_kib": round(m / 1024, 1),
                "memory_vs_plain": round(m / base_m, 2),
                "scenes": a.scenes,
                "device": a.device,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1) + "\n")
    if a.markdown:
        lines = [
            "| method | median time per image | × plain | peak tensor memory | × plain |",
            "|---|---|---|---|---|",
        ]
        for r in rows:
            lines.append(
                f"| {r['method']} | {r['median_ms']:.1f} ms | {r['time_vs_plain']:.2f} | "
                f"{r['peak_kib']:.0f} KiB | {r['memory_vs_plain']:.2f} |"
            )
        Path(a.markdown).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

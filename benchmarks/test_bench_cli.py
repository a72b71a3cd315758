"""The ``lava`` command as a user runs it: start-up time and peak memory over many images.

Both run the command in a fresh subprocess, because what they measure (import time, the
process's peak resident memory) is a property of a whole process.

- ``test_startup``: wall time of ``lava --version``, ``lava --help`` and ``lava segment --help``.
  Building the parser must import nothing heavy (torch, diffusers, transformers, matplotlib).
- ``test_segment_memory_flat``: peak RSS of ``lava segment`` on 1, 2 and 4 large generated images
  (``LAVA_BENCH_SIDE`` px, default 3000×2250) with ``tiny-sd3``. Each image's outputs are written
  and dropped before the next is read, so the peak must not grow with the number of images.

    python -m pytest benchmarks/test_bench_cli.py --benchmark-only
    python benchmarks/test_bench_cli.py            # the same numbers as a table
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SIDE = int(os.environ.get("LAVA_BENCH_SIDE", "3000"))
COUNTS = (1, 2, 4)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}


def _run(args: list[str]) -> tuple[float, int, subprocess.CompletedProcess]:
    """``(wall seconds, peak RSS bytes, result)`` of ``python -m lava.cli ARGS`` in a new process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "lava.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=ENV,
        text=True,
    )
    # Read the pipes before waiting so a chatty child cannot block on a full pipe.
    out, err = proc.stdout.read(), proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - t0
    # ru_maxrss is in KiB on Linux.
    return seconds, usage.ru_maxrss * 1024, subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def big_image(path: Path, side: int = SIDE) -> Path:
    """A smooth ``side × 3/4 side`` RGB image (compresses well, so writing it is quick)."""
    h, w = side * 3 // 4, side
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack([(x * 255 // w), (y * 255 // h), ((x + y) * 255 // (w + h))], axis=-1).astype(np.uint8)
    arr[h // 4 : 3 * h // 4, w // 3 : 2 * w // 3] = (220, 40, 40)
    Image.fromarray(arr).save(path, compress_level=1)
    return path


def segment_peaks(folder: Path, counts=COUNTS) -> dict[int, tuple[int, float]]:
    """``{number of images: (peak RSS bytes, seconds)}`` of ``lava segment`` on that many images."""
    source = big_image(folder / "src.png")
    peaks = {}
    for n in counts:
        paths = []
        for i in range(n):
            paths.append(folder / f"img{n}_{i}.png")
            shutil.copyfile(source, paths[-1])
        out = folder / f"out{n}"
        args = ["segment", *map(str, paths), "--classes", "cat,dog,car", "--model", "tiny-sd3"]
        seconds, peak, res = _run([*args, "--out", str(out)])
        assert res.returncode == 0, res.stderr
        assert len(list(out.glob("*_labels.png"))) == n
        peaks[n] = (peak, seconds)
    return peaks


@pytest.mark.parametrize("args", [["--version"], ["--help"], ["segment", "--help"]], ids=" ".join)
def test_startup(benchmark, args):
    def once():
        _, _, res = _run(args)
        assert res.returncode == 0, res.stderr

    benchmark.pedantic(once, rounds=5, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(command="lava " + " ".join(args))


def test_segment_memory_flat(benchmark, tmp_path):
    result = {}
    benchmark.pedantic(lambda: result.update(segment_peaks(tmp_path)), rounds=1, iterations=1)
    benchmark.extra_info.update(
        side=SIDE, peak_rss_mib={n: round(p / 2**20, 1) for n, (p, _) in result.items()}
    )
    one_image = SIDE * SIDE * 3 // 4 * (3 + 3 * 4)  # the RGB image plus its [3, H, W] fp32 scores
    growth = result[max(COUNTS)][0] - result[min(COUNTS)][0]
    # Allocator noise is well below one image's worth; a run that keeps every image grows by several.
    assert growth < one_image, f"peak grew by {growth / 2**20:.0f} MiB from 1 to {max(COUNTS)} images"


if __name__ == "__main__":
    import tempfile

    for args in (["--version"], ["--help"], ["segment", "--help"]):
        times = sorted(_run(args)[0] for _ in range(5))
        print(f"lava {' '.join(args):16s} median {times[2]:.2f} s")
    with tempfile.TemporaryDirectory() as tmp:
        print(f"lava segment, tiny-sd3, {SIDE}x{SIDE * 3 // 4} px images")
        for n, (peak, seconds) in segment_peaks(Path(tmp)).items():
            print(f"  {n} image(s): peak RSS {peak / 2**20:7.1f} MiB, {seconds:5.1f} s")

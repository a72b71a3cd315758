"""Benchmark settings: the device and the sizes follow what this machine can run.

Run on CPU (small sizes):  python -m pytest benchmarks --benchmark-only
Run on CUDA (real sizes):  LAVA_BENCH_DEVICE=cuda python -m pytest benchmarks --benchmark-only
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

if not torch.cuda.is_available():
    # Triton kernels only run through the interpreter on CPU; it must be on before triton loads.
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = os.environ.get("LAVA_BENCH_DEVICE", "cuda" if torch.cuda.is_available() else "cpu")
ON_CUDA = DEVICE.startswith("cuda")

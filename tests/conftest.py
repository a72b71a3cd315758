"""Shared fixtures: tiny offline backends and generated images."""

from __future__ import annotations

import os

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# Busy-waiting OpenMP threads make torch ~10x slower when another process shares the 2 cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

# Triton reads TRITON_INTERPRET when its kernels are decorated, and diffusers may import triton
# as soon as lava is imported: switch the CPU interpreter on before anything else loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np
import pytest
from PIL import Image

import lava


@pytest.fixture(scope="session")
def tiny():
    """SD3-medium-like toy backend (plain joint blocks, no qk-norm)."""
    return lava.load_backend("tiny-sd3")


@pytest.fixture(scope="session")
def tiny35():
    """SD3.5-like toy backend: dual attention in blocks 0-1 and qk RMS-norm."""
    return lava.load_backend("tiny-sd3", variant="sd3.5")


@pytest.fixture(scope="session")
def shapes():
    """The shipped ``lava-shapes`` reference model (trained weights; one load for the session)."""
    return lava.load_backend("lava-shapes")


@pytest.fixture(scope="session")
def tiny_flux():
    """FLUX.1-dev-like toy backend: 2 double-stream + 2 single-stream blocks, RoPE, guidance."""
    return lava.load_backend("tiny-flux")


def scene(h: int = 40, w: int = 56, seed: int = 0) -> Image.Image:
    """A random RGB image with a bright rectangle, deterministic from ``seed``."""
    rng = np.random.default_rng(seed)
    arr = (rng.random((h, w, 3)) * 80).astype(np.uint8)
    arr[h // 4 : 3 * h // 4, w // 3 : 2 * w // 3] = (220, 40, 40)
    return Image.fromarray(arr, mode="RGB")


@pytest.fixture
def image():
    return scene()


def hand_slices(maps: dict, columns, grid, image_sizes, **kw):
    """``AttentionSlices`` of maps built by hand: image→text, joint softmax, heads averaged."""
    from lava.types import AttentionSlices

    return AttentionSlices(
        maps=maps,
        columns=tuple(columns),
        grid=grid,
        direction="image_to_text",
        softmax="joint",
        heads="mean",
        timestep=kw.pop("timestep", 500.0),
        sigma=kw.pop("sigma", 0.5),
        image_sizes=image_sizes,
        **kw,
    )

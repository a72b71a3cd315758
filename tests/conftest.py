"""Shared fixtures: tiny offline backends and generated images."""

from __future__ import annotations

import os
from contextlib import contextmanager

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


def model_output(backend, noisy, prompt):
    """The transformer's own output on ``noisy`` and ``prompt`` (no capture installed)."""
    from lava.stages.capture import transformer_inputs

    return backend.transformer(**transformer_inputs(backend, noisy, prompt), return_dict=False)[0]


@contextmanager
def blocks_run(blocks, final, final_name: str = "norm_out"):
    """The list of what runs while inside, in order: the index of each of ``blocks`` and
    ``final_name`` for the module ``final`` (the transformer's output layer); hooks removed after."""
    ran: list = []
    handles = [b.register_forward_hook(lambda m, a, o, i=i: ran.append(i)) for i, b in enumerate(blocks)]
    handles.append(final.register_forward_hook(lambda m, a, o: ran.append(final_name)))
    try:
        yield ran
    finally:
        for handle in handles:
            handle.remove()


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


# ---- comparing two computations of one result ----------------------------------------------------
#
# The same computation run twice is compared bit for bit (torch.equal). Two *different*
# computations of the same scores (a capture of every text key against one of the class keys only,
# the Triton kernel against torch's, one forward shared by several settings against one each) run
# their matrix products with other shapes, and BLAS may block and sum them in another order (it
# does on AMD EPYC CPUs where it does not on Intel's): their floats differ by rounding noise.
# Perturbing the captured probabilities by a relative 5e-7 (a few float32 ulps) moves tiny-sd3's and
# lava-shapes' final scores (min-max normalised, after PAMR or propagation) by at most 6e-6, so
# 1e-4 is ~20x that noise and far below any real difference (a changed setting moves them by >1e-2).
SCORE_ATOL = 1e-4
SCORE_RTOL = 1e-4


def near_ties(seg, i: int = 0, background_threshold: float | None = None) -> torch.Tensor:
    """``[H, W]`` bool: pixels of ``seg``'s image ``i`` whose label could flip if every score moved
    by up to the tolerance above.

    A pixel's label is its class's score beaten by no other (kept) class, and, with a background
    threshold, that score compared with the threshold (label 0 when every kept class is below it).
    If each score moves by at most ``tol``, the decision can only change where the chosen class is
    within ``2 tol`` of another class, or some class within ``tol`` of the threshold. Checking the
    chosen class against *every* other class (not only the runner-up) also covers classes that
    ``min_presence`` removed, whose presence itself is assumed not to sit within noise of the floor.
    """
    scores = seg.scores[i].double()
    tol = SCORE_ATOL + SCORE_RTOL * float(scores.abs().max())
    labels = seg.labels[i].long()
    offset = 0
    near = torch.zeros(labels.shape, dtype=torch.bool)
    if len(seg.classes) == scores.shape[0] + 1:  # label 0 is the thresholded background
        assert background_threshold is not None, "pass the background threshold this result used"
        offset = 1
        near |= ((scores - background_threshold).abs() <= tol).any(0)
    chosen = (labels - offset).clamp_min(0)
    gaps = (scores - scores.gather(0, chosen[None])).abs()
    gaps.scatter_(0, chosen[None], float("inf"))
    near |= (gaps.min(0).values <= 2 * tol) & (labels >= offset)
    return near


def assert_labels_agree_off_ties(got_labels, want_seg, i: int = 0, background_threshold=None) -> None:
    """``got_labels`` (another computation's label map, same label ids) equal ``want_seg``'s labels
    wherever ``want_seg``'s decision is not within float noise of a tie (``near_ties``)."""
    got = torch.as_tensor(np.asarray(got_labels)).long()
    want = want_seg.labels[i].long()
    assert got.shape == want.shape
    off = (got != want) & ~near_ties(want_seg, i, background_threshold)
    assert not off.any(), f"{int(off.sum())} pixels have other labels where no two scores are tied"


def assert_same_segmentation(got, want, *, background_threshold=None) -> None:
    """``got`` and ``want`` are two different computations of one segmentation (see above): the
    same classes, scores within the tolerance, labels equal off ties."""
    assert got.classes == want.classes and len(got) == len(want)
    for i in range(len(want)):
        torch.testing.assert_close(got.scores[i], want.scores[i], atol=SCORE_ATOL, rtol=SCORE_RTOL)
        assert_labels_agree_off_ties(got.labels[i], want, i, background_threshold)

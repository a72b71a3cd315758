"""The fused Triton attention slice against the explicit-softmax reference.

Without a GPU the kernels run in Triton's interpreter, which must be switched on before
``triton`` is imported (it is read when the kernels are decorated). Shapes stay small because
the interpreter executes every program in Python.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

pytest.importorskip("triton")

from lava.kernels import triton_slice
from lava.kernels.reference import naive_attention, naive_slice
from lava.kernels.spec import SliceSpec
from lava.kernels.triton_slice import is_available, triton_attention_slice

pytestmark = pytest.mark.skipif(not is_available(), reason="triton cannot run here (no CUDA, no interpreter)")

DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"

# (atol, rtol) per dtype for O, lse and the slice. The reference upcasts the same low-precision
# inputs, so only O's final rounding (and on GPU the fp16/bf16 P@V) separates them.
TOL = {
    torch.float32: {"o": (1e-5, 1e-5), "lse": (1e-5, 1e-5), "slice": (1e-5, 1e-4)},
    torch.float16: {"o": (2e-3, 1e-2), "lse": (1e-4, 1e-4), "slice": (5e-5, 1e-3)},
    torch.bfloat16: {"o": (1e-2, 2e-2), "lse": (1e-4, 1e-4), "slice": (5e-5, 1e-3)},
}

# (n_img, text_len, where the text sits): ragged against every block size used.
LAYOUTS = {
    "sd3": (37, 11, "end"),
    "flux": (64, 20, "start"),
    "middle": (30, 9, "middle"),
}


def _text_start(n_img: int, where: str) -> int:
    return {"end": n_img, "start": 0, "middle": n_img // 2}[where]


def _qkv(b, h, n, d, dtype, seed=0, sharpness=2.0):
    """Random q, k, v. ``sharpness`` scales q so that softmax rows are peaked and the online
    rescaling across key blocks actually matters."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, n, d, generator=gen) * sharpness
    k = torch.randn(b, h, n, d, generator=gen)
    v = torch.randn(b, h, n, d, generator=gen)
    return tuple(t.to(device=DEVICE, dtype=dtype) for t in (q, k, v))


def _check(q, k, v, spec, *, need_output=True):
    out, lse, sliced = triton_attention_slice(q, k, v, spec, need_output=need_output)
    ref_o, ref_lse = naive_attention(q, k, v)
    ref_slice = naive_slice(q, k, spec)
    tol = TOL[q.dtype]

    assert lse.dtype == torch.float32 and lse.shape == q.shape[:3]
    torch.testing.assert_close(lse, ref_lse, atol=tol["lse"][0], rtol=tol["lse"][1])
    if need_output:
        assert out.dtype == q.dtype and out.shape == q.shape
        torch.testing.assert_close(out.float(), ref_o, atol=tol["o"][0], rtol=tol["o"][1])
    else:
        assert out is None
    assert sliced.dtype == torch.float32
    assert sliced.shape == ref_slice.shape
    torch.testing.assert_close(sliced, ref_slice, atol=tol["slice"][0], rtol=tol["slice"][1])
    return out, lse, sliced


@pytest.mark.parametrize("heads", ["mean", "none"])
@pytest.mark.parametrize("softmax", ["joint", "cross"])
@pytest.mark.parametrize("direction", ["image_to_text", "text_to_image"])
@pytest.mark.parametrize("columns", ["all", "subset"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_slice_fp32_matches_reference(layout, columns, direction, softmax, heads):
    n_img, text_len, where = LAYOUTS[layout]
    cols = None if columns == "all" else [text_len - 1, 0, 3, 3]  # unordered, with a repeat
    spec = SliceSpec.make(
        text_start=_text_start(n_img, where),
        text_len=text_len,
        columns=cols,
        direction=direction,
        softmax=softmax,
        heads=heads,
    )
    q, k, v = _qkv(2, 2, n_img + text_len, 16, torch.float32)
    _check(q, k, v, spec)


@pytest.mark.parametrize("heads", ["mean", "none"])
@pytest.mark.parametrize("softmax", ["joint", "cross"])
@pytest.mark.parametrize("direction", ["image_to_text", "text_to_image"])
def test_slice_fp16_matches_reference(direction, softmax, heads):
    n_img, text_len, where = LAYOUTS["sd3"]
    spec = SliceSpec.make(
        text_start=_text_start(n_img, where),
        text_len=text_len,
        columns=[1, 5, 7],
        direction=direction,
        softmax=softmax,
        heads=heads,
    )
    q, k, v = _qkv(1, 3, n_img + text_len, 32, torch.float16, seed=1)
    _check(q, k, v, spec)


@pytest.mark.parametrize("direction", ["image_to_text", "text_to_image"])
def test_slice_bf16_matches_reference(direction):
    spec = SliceSpec.make(text_start=0, text_len=20, columns=None, direction=direction, softmax="joint")
    q, k, v = _qkv(1, 2, 84, 32, torch.bfloat16, seed=2)
    _check(q, k, v, spec)


@pytest.mark.parametrize("d", [64, 24])
def test_other_head_dims(d):
    """D=64, and a D that is not a power of two (padded to BLOCK_D=32 and masked)."""
    spec = SliceSpec.make(
        text_start=37, text_len=11, columns=[0, 10], direction="image_to_text", softmax="cross"
    )
    q, k, v = _qkv(1, 2, 48, d, torch.float32, seed=3)
    _check(q, k, v, spec)
    spec_t = SliceSpec.make(text_start=0, text_len=11, columns=None, direction="text_to_image", heads="none")
    _check(q, k, v, spec_t)


@pytest.mark.parametrize("direction", ["image_to_text", "text_to_image"])
def test_need_output_false_skips_o_only(direction):
    spec = SliceSpec.make(text_start=64, text_len=20, columns=[2, 19], direction=direction, softmax="cross")
    q, k, v = _qkv(1, 2, 84, 16, torch.float32, seed=4)
    out_full, lse_full, slice_full = triton_attention_slice(q, k, v, spec)
    _, lse, sliced = _check(q, k, v, spec, need_output=False)
    assert out_full is not None
    torch.testing.assert_close(lse, lse_full, atol=0, rtol=0)
    torch.testing.assert_close(sliced, slice_full, atol=0, rtol=0)


def test_non_contiguous_inputs():
    """Diffusers keeps q, k, v as [B, N, H, D] views; strides must be honoured, not assumed."""
    gen = torch.Generator().manual_seed(5)
    b, n, h, d = 2, 57, 2, 16
    q, k, v = (torch.randn(b, n, h, d, generator=gen).to(DEVICE).transpose(1, 2) for _ in range(3))
    assert not q.is_contiguous()
    for direction in ("image_to_text", "text_to_image"):
        spec = SliceSpec.make(text_start=0, text_len=9, columns=[0, 4, 8], direction=direction, heads="none")
        _check(q, k, v, spec)


@pytest.mark.parametrize("direction", ["image_to_text", "text_to_image"])
def test_small_blocks_many_key_blocks(monkeypatch, direction):
    """16-wide tiles: many key blocks (online rescaling), a ragged tail, text straddling blocks."""
    monkeypatch.setattr(
        triton_slice,
        "_pick_blocks",
        lambda d: {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "num_warps": 4, "num_stages": 1},
    )
    spec = SliceSpec.make(text_start=41, text_len=27, columns=None, direction=direction, softmax="cross")
    q, k, v = _qkv(1, 1, 101, 16, torch.float32, seed=6, sharpness=4.0)
    _check(q, k, v, spec)


@pytest.mark.parametrize("direction", ["image_to_text", "text_to_image"])
def test_cross_softmax_rows_sum_to_one(direction):
    """With all columns and cross softmax, each query's probabilities cover its whole domain."""
    n_img, text_len = 37, 11
    spec = SliceSpec.make(
        text_start=n_img, text_len=text_len, direction=direction, softmax="cross", heads="none"
    )
    q, k, v = _qkv(1, 2, n_img + text_len, 16, torch.float32, seed=7)
    _, _, sliced = triton_attention_slice(q, k, v, spec)
    dim = -1 if direction == "image_to_text" else -2
    sums = sliced.sum(dim=dim)
    torch.testing.assert_close(sums, torch.ones_like(sums), atol=1e-5, rtol=0)


def test_deterministic():
    spec = SliceSpec.make(text_start=0, text_len=20, columns=None, direction="image_to_text", heads="mean")
    q, k, v = _qkv(2, 3, 84, 16, torch.float32, seed=8)
    first = triton_attention_slice(q, k, v, spec)
    second = triton_attention_slice(q, k, v, spec)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def test_rejects_bad_inputs():
    spec = SliceSpec.make(text_start=37, text_len=11)
    q, k, v = _qkv(1, 1, 48, 16, torch.float32)
    with pytest.raises(TypeError):
        triton_attention_slice(q, k.half(), v, spec)
    with pytest.raises(ValueError):
        triton_attention_slice(q, k, v[..., :8], spec)
    with pytest.raises(ValueError):
        triton_attention_slice(q[:, :, :40], k[:, :, :40], v[:, :, :40], spec)  # text does not fit

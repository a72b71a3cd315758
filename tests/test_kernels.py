"""The attention-slice op: every implementation equals the explicit-softmax reference."""

from __future__ import annotations

import itertools

import pytest
import torch

from lava.kernels import SliceSpec, attention_slice, attention_with_slice, available_impls, resolve_impl
from lava.kernels.reference import naive_attention

CASES = list(itertools.product(("image_to_text", "text_to_image"), ("joint", "cross"), ("mean", "none")))


def explicit(q, k, text_start, text_len, cols, direction, softmax, heads):
    """Independent reference: build the full probability matrix row by row, in float64."""
    b, h, n, d = q.shape
    s = (q.double() @ k.double().transpose(-1, -2)) / d**0.5
    txt = list(range(text_start, text_start + text_len))
    img = [i for i in range(n) if i not in txt]
    out = torch.zeros(b, h, len(img), len(cols), dtype=torch.float64)
    for ci, c in enumerate(cols):
        t = txt[c]
        if direction == "image_to_text":
            for ii, i in enumerate(img):
                keys = list(range(n)) if softmax == "joint" else txt
                out[:, :, ii, ci] = torch.exp(s[:, :, i, t]) / torch.exp(s[:, :, i, keys]).sum(-1)
        else:
            keys = list(range(n)) if softmax == "joint" else img
            denom = torch.exp(s[:, :, t, keys]).sum(-1)
            for ii, i in enumerate(img):
                out[:, :, ii, ci] = torch.exp(s[:, :, t, i]) / denom
    return out.mean(1, keepdim=True) if heads == "mean" else out


@pytest.mark.parametrize("impl", ["naive", "torch"])
@pytest.mark.parametrize(("direction", "softmax", "heads"), CASES)
@pytest.mark.parametrize(("n_img", "text_len", "text_first"), [(30, 9, False), (17, 6, True)])
def test_matches_explicit_softmax(impl, direction, softmax, heads, n_img, text_len, text_first):
    torch.manual_seed(n_img)
    q = torch.randn(2, 3, n_img + text_len, 16)
    k = torch.randn(2, 3, n_img + text_len, 16)
    start = 0 if text_first else n_img
    cols = [0, 2, text_len - 1]
    got = attention_slice(
        q,
        k,
        text_start=start,
        text_len=text_len,
        columns=cols,
        direction=direction,
        softmax=softmax,
        heads=heads,
        impl=impl,
    )
    want = explicit(q, k, start, text_len, cols, direction, softmax, heads)
    assert got.dtype == torch.float32
    assert got.shape == want.shape
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-5)


def test_all_columns_sum_to_one_for_cross_image_to_text():
    torch.manual_seed(0)
    q, k = torch.randn(1, 2, 20, 8), torch.randn(1, 2, 20, 8)
    sl = attention_slice(q, k, text_start=12, text_len=8, softmax="cross", impl="torch")
    torch.testing.assert_close(sl.sum(-1), torch.ones(1, 1, 12))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(dtype):
    torch.manual_seed(1)
    q, k = torch.randn(1, 2, 40, 16).to(dtype), torch.randn(1, 2, 40, 16).to(dtype)
    a = attention_slice(q, k, text_start=30, text_len=10, impl="naive")
    b = attention_slice(q, k, text_start=30, text_len=10, impl="torch")
    assert b.dtype == torch.float32
    torch.testing.assert_close(a, b, atol=2e-3, rtol=2e-2)


def test_torch_output_equals_sdpa_bitwise_on_cpu():
    torch.manual_seed(2)
    q, k, v = (torch.randn(2, 3, 33, 16) for _ in range(3))
    spec = SliceSpec(text_start=25, text_len=8)
    out, _ = attention_with_slice(q, k, v, spec, impl="torch")
    assert torch.equal(out, torch.nn.functional.scaled_dot_product_attention(q, k, v))
    ref, _ = naive_attention(q, k, v)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def _largest_allocation(fn) -> int:
    """Largest single CPU allocation (bytes) made by any op while ``fn`` runs."""
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
    ) as prof:
        fn()
    return max((e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0), default=0)


@pytest.mark.parametrize("direction", ["image_to_text", "text_to_image"])
@pytest.mark.parametrize("softmax", ["joint", "cross"])
def test_torch_path_allocates_nothing_of_size_n_squared(direction, softmax):
    b, h, n, d, t = 1, 2, 600, 16, 40
    q, k, v = (torch.randn(b, h, n, d) for _ in range(3))
    spec = SliceSpec(text_start=n - t, text_len=t, columns=(1, 2, 3), direction=direction, softmax=softmax)
    nn_bytes = b * h * n * n * 4
    naive = _largest_allocation(lambda: attention_with_slice(q, k, v, spec, impl="naive"))
    fused = _largest_allocation(lambda: attention_with_slice(q, k, v, spec, impl="torch"))
    assert naive >= nn_bytes  # the reference really builds the N×N matrix: the probe can see it
    assert fused < nn_bytes / 4, f"torch path allocated {fused} bytes, N×N is {nn_bytes}"


def test_bad_arguments_are_named():
    q = torch.randn(1, 1, 10, 8)
    with pytest.raises(ValueError, match="direction"):
        attention_slice(q, q, text_start=5, text_len=5, direction="sideways")
    with pytest.raises(ValueError, match="does not fit"):
        attention_slice(q, q, text_start=8, text_len=5)
    with pytest.raises(ValueError, match="outside the text range"):
        attention_slice(q, q, text_start=5, text_len=5, columns=[7])
    with pytest.raises(ValueError, match=r"\[B, H, N, D\]"):
        attention_slice(q[0], q[0], text_start=5, text_len=5)
    with pytest.raises(ValueError, match="attention impl"):
        attention_slice(q, q, text_start=5, text_len=5, impl="cuda-magic")


def test_auto_resolves_to_torch_on_cpu():
    assert resolve_impl("auto", "cpu") == "torch"
    assert {"naive", "torch"} <= set(available_impls("cpu"))

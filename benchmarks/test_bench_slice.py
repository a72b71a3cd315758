"""One joint-attention layer with capture: naive vs torch vs triton, plain SDPA as the baseline.

Every implementation runs on the same q, k, v in one session; each benchmark records in
``extra_info`` the peak extra memory (bytes) and the attention TFLOP/s (4·B·H·N²·D / time).
The slice is image→text, joint softmax, heads averaged, K = 20 class columns out of 333 text
tokens (77 CLIP + 256 T5).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, ON_CUDA
from memprobe import peak_bytes

from lava.kernels import SliceSpec, attention_with_slice, available_impls

TEXT = 333
K = 20
HEAD_DIM = 64
# CPU: the sizes of issue #2 (1024 and 4096 image tokens at 24 heads). CUDA: up to 2048 px.
N_IMGS = (1024, 4096, 16384) if ON_CUDA else (1024, 4096)
HEADS = (24, 38) if ON_CUDA else (24,)
DTYPE = torch.bfloat16 if ON_CUDA else torch.float32


def _inputs(n_img: int, heads: int):
    gen = torch.Generator(device="cpu").manual_seed(0)
    shape = (1, heads, n_img + TEXT, HEAD_DIM)
    return [torch.randn(shape, generator=gen).to(DEVICE, DTYPE) for _ in range(3)]


def _naive_fits(n_img: int, heads: int) -> bool:
    n = n_img + TEXT
    need = 3 * heads * n * n * 4  # scores, probabilities, and the softmax's output, in fp32
    if ON_CUDA:
        return need < 0.8 * torch.cuda.mem_get_info()[0]
    return need < 12 * 2**30


IMPLS = ["sdpa", "naive", "torch"] + (["triton"] if "triton" in available_impls(DEVICE) and ON_CUDA else [])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("n_img", N_IMGS)
def test_capture_one_layer(benchmark, impl, heads, n_img):
    if impl == "naive" and not _naive_fits(n_img, heads):
        pytest.skip("naive would need more memory than this device has (see docs/benchmarks.md)")
    q, k, v = _inputs(n_img, heads)
    spec = SliceSpec(text_start=n_img, text_len=TEXT, columns=tuple(range(K)))
    if impl == "sdpa":

        def fn():
            return F.scaled_dot_product_attention(q, k, v)
    else:

        def fn():
            return attention_with_slice(q, k, v, spec, impl=impl)

    peak, _ = peak_bytes(fn, DEVICE)
    n = n_img + TEXT
    benchmark.extra_info.update(
        impl=impl,
        device=DEVICE,
        n_img=n_img,
        heads=heads,
        head_dim=HEAD_DIM,
        text=TEXT,
        columns=K,
        dtype=str(DTYPE),
        peak_extra_bytes=peak,
        nxn_bytes_fp32=heads * n * n * 4,
    )
    benchmark.pedantic(fn, rounds=3, iterations=1, warmup_rounds=1)
    flops = 4 * heads * n * n * HEAD_DIM
    benchmark.extra_info["tflops"] = flops / benchmark.stats.stats.median / 1e12

"""Capture is exact and leaves the model untouched."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_same_segmentation, blocks_run, model_output

import lava
from lava.stages.capture import capturing, run_until_captured, transformer_inputs
from lava.types import CapturePlan

CLASSES = ["cat", "potted plant", "hydrant"]


@pytest.fixture(params=["tiny", "tiny35"])
def backend(request):
    return request.getfixturevalue(request.param)


@pytest.fixture
def inputs(backend, image):
    noisy = lava.noise(backend, image, timestep=400, seed=3)
    prompt = lava.encode_prompt(backend, CLASSES)
    return noisy, prompt


@pytest.mark.parametrize("impl", ["torch", "naive"])
def test_outputs_unchanged_by_capture(backend, inputs, impl):
    noisy, prompt = inputs
    plain = model_output(backend, noisy, prompt)
    plan = CapturePlan(
        layers=tuple(range(backend.num_blocks)), columns=prompt.columns(), impl=impl, early_exit=False
    )
    with capturing(backend.transformer, plan) as store:
        captured = run_until_captured(backend.transformer, **transformer_inputs(backend, noisy, prompt))
    assert set(store) == set(range(backend.num_blocks))
    if impl == "torch":
        assert torch.equal(captured, plain)  # same fused kernel as diffusers' processor: bitwise
    else:
        torch.testing.assert_close(captured, plain, atol=1e-5, rtol=1e-5)


def _joint_qk(attn, hidden, context):
    """q, k of one joint attention, computed here from the module's weights (not lava's processor)."""
    h = attn.heads

    def split(x):
        b, n, c = x.shape
        return x.view(b, n, h, c // h).transpose(1, 2)

    q, k = split(attn.to_q(hidden)), split(attn.to_k(hidden))
    cq, ck = split(attn.add_q_proj(context)), split(attn.add_k_proj(context))
    if attn.norm_q is not None:
        q, k = attn.norm_q(q), attn.norm_k(k)
    if attn.norm_added_q is not None:
        cq, ck = attn.norm_added_q(cq), attn.norm_added_k(ck)
    return torch.cat([q, cq], 2), torch.cat([k, ck], 2)


@pytest.mark.parametrize("direction", ["image_to_text", "text_to_image"])
@pytest.mark.parametrize("softmax", ["joint", "cross"])
@pytest.mark.parametrize("heads", ["mean", "none"])
def test_slices_equal_explicit_softmax(backend, inputs, direction, softmax, heads):
    noisy, prompt = inputs
    layers = (0, backend.num_blocks - 1)  # includes the context_pre_only last block
    seen = {}

    def grab(index):
        def hook(module, args, kwargs):
            seen[index] = (kwargs["hidden_states"], kwargs["encoder_hidden_states"])

        return hook

    handles = [backend.blocks[i].attn.register_forward_pre_hook(grab(i), with_kwargs=True) for i in layers]
    try:
        slices = lava.capture(
            backend,
            noisy,
            prompt,
            layers=layers,
            direction=direction,
            softmax=softmax,
            heads=heads,
            impl="torch",
        )
    finally:
        for hd in handles:
            hd.remove()

    cols = prompt.columns()
    for i in layers:
        hidden, context = seen[i]
        q, k = _joint_qk(backend.blocks[i].attn, hidden, context)
        n_img, t = hidden.shape[1], context.shape[1]
        probs_all = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)  # [B, H, N, N]
        scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
        txt = [n_img + c for c in cols]
        if direction == "image_to_text":
            if softmax == "joint":
                want = probs_all[:, :, :n_img][..., txt]
            else:
                want = torch.softmax(scores[:, :, :n_img, n_img:], -1)[..., list(cols)]
        else:
            if softmax == "joint":
                want = probs_all[:, :, txt, :n_img]
            else:
                want = torch.softmax(scores[:, :, txt, :n_img], -1)
            want = want.transpose(-1, -2)
        if heads == "mean":
            want = want.mean(1, keepdim=True)
        got = slices.maps[i]
        assert got.shape == (
            noisy.batch_size,
            1 if heads == "mean" else backend.blocks[i].attn.heads,
            n_img,
            len(cols),
        )
        assert t == prompt.text_len
        torch.testing.assert_close(got, want.float(), atol=1e-5, rtol=1e-4)


def test_early_exit_runs_no_later_block(tiny, image):
    noisy = lava.noise(tiny, image)
    prompt = lava.encode_prompt(tiny, CLASSES)
    with blocks_run(tiny.blocks, tiny.transformer.norm_out) as ran:
        slices = lava.capture(tiny, noisy, prompt, layers=[1])
        assert ran == [0, 1]
        ran.clear()
        lava.capture(tiny, noisy, prompt, layers=[1], early_exit=False)
        assert ran == [0, 1, 2, 3, "norm_out"]
    assert list(slices.maps) == [1]


def test_processors_restored_after_success_and_error(tiny, image):
    before = {i: b.attn.processor for i, b in enumerate(tiny.blocks)}
    plan = CapturePlan(layers=(0, 2))
    with capturing(tiny.transformer, plan):
        assert type(tiny.blocks[0].attn.processor).__name__ == "CaptureProcessor"
        assert tiny.blocks[1].attn.processor is before[1]
    assert {i: b.attn.processor for i, b in enumerate(tiny.blocks)} == before

    with pytest.raises(RuntimeError, match="boom"), capturing(tiny.transformer, plan):
        raise RuntimeError("boom")
    assert {i: b.attn.processor for i, b in enumerate(tiny.blocks)} == before

    noisy = lava.noise(tiny, image)
    prompt = lava.encode_prompt(tiny, CLASSES)
    bad = transformer_inputs(tiny, noisy, prompt)
    bad["encoder_hidden_states"] = bad["encoder_hidden_states"][..., :5]  # wrong width: fails inside forward
    with pytest.raises(RuntimeError), capturing(tiny.transformer, plan):
        run_until_captured(tiny.transformer, **bad)
    assert {i: b.attn.processor for i, b in enumerate(tiny.blocks)} == before
    assert all(not b._forward_hooks for b in tiny.blocks)


def test_dual_attention_attn2_is_not_captured(tiny35, image):
    assert tiny35.blocks[0].attn2 is not None
    before = tiny35.blocks[0].attn2.processor
    plan = CapturePlan(layers=(0,))
    with capturing(tiny35.transformer, plan):
        assert tiny35.blocks[0].attn2.processor is before


def test_only_class_columns_are_computed(tiny, image):
    noisy = lava.noise(tiny, image)
    prompt = lava.encode_prompt(tiny, CLASSES)
    slices = lava.capture(tiny, noisy, prompt, layers=[0])
    assert slices.columns == prompt.columns()
    assert slices.maps[0].shape[-1] == len(prompt.columns()) < prompt.text_len
    assert slices.maps[0].shape[-2] == noisy.grid[0] * noisy.grid[1]


def test_triton_capture_gives_same_segmentation_as_torch(tiny, image):
    from lava.kernels import available_impls

    if "triton" not in available_impls("cpu"):
        pytest.skip("triton is not installed here")
    noisy = lava.noise(tiny, image)
    prompt = lava.encode_prompt(tiny, CLASSES)
    a = lava.capture(tiny, noisy, prompt, layers=[0, 3], impl="torch")
    b = lava.capture(tiny, noisy, prompt, layers=[0, 3], impl="triton")
    for layer in (0, 3):
        torch.testing.assert_close(b.maps[layer], a.maps[layer], atol=1e-5, rtol=1e-4)
    seg_a = lava.to_mask(lava.aggregate(a, prompt))
    seg_b = lava.to_mask(lava.aggregate(b, prompt))
    # two kernels, two summation orders: equal scores within tolerance, labels off ties (conftest)
    assert_same_segmentation(seg_b, seg_a)


def test_triton_capture_leaves_outputs_unchanged(tiny, image):
    from lava.kernels import available_impls

    if "triton" not in available_impls("cpu"):
        pytest.skip("triton is not installed here")
    noisy = lava.noise(tiny, image)
    prompt = lava.encode_prompt(tiny, CLASSES)
    plain = model_output(tiny, noisy, prompt)
    plan = CapturePlan(layers=(1, 2), columns=prompt.columns(), impl="triton", early_exit=False)
    with capturing(tiny.transformer, plan):
        captured = run_until_captured(tiny.transformer, **transformer_inputs(tiny, noisy, prompt))
    torch.testing.assert_close(captured, plain, atol=1e-5, rtol=1e-5)


def test_several_views_from_one_forward_equal_separate_captures(tiny, image):
    from lava.stages.capture import capture_views

    noisy = lava.noise(tiny, image)
    prompt = lava.encode_prompt(tiny, CLASSES)
    views = [("image_to_text", "joint"), ("text_to_image", "cross"), ("image_to_text", "cross")]
    calls = []
    hook = tiny.transformer.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        together = capture_views(tiny, noisy, prompt, views=views, layers=[0, 2])
    finally:
        hook.remove()
    assert len(calls) == 1
    for direction, softmax in views:
        alone = lava.capture(tiny, noisy, prompt, layers=[0, 2], direction=direction, softmax=softmax)
        got = together[(direction, softmax)]
        assert (got.direction, got.softmax) == (direction, softmax)
        for layer in (0, 2):
            torch.testing.assert_close(got.maps[layer], alone.maps[layer])

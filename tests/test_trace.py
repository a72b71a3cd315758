"""``lava.trace``: maps while a stock diffusers pipeline generates, exact and without side effects.

The reference for every traced map is computed here from the q and k the model itself attended
with: ``torch.nn.functional.scaled_dot_product_attention`` is wrapped (a plain hook, nothing of
lava) during an untraced run of the same call, its q/k recorded per transformer call and block,
and the softmax written out in float64.
"""

from __future__ import annotations

import pytest
import torch

import lava
from lava.stages.prompts import word_ranges

PROMPTS = ["a photo of a cat on a red sofa", "a dog in the grass near a tree"]
SIZE = dict(height=32, width=48)


@pytest.fixture(params=["tiny", "tiny_flux"])
def backend(request):
    return request.getfixturevalue(request.param)


def generate(pipe, prompt=PROMPTS[0], steps: int = 2, **kw):
    kw = {**SIZE, "max_sequence_length": 32, **kw}
    out = pipe(
        prompt,
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
        **kw,
    )
    return out.images


def record_qk(backend, monkeypatch, call, every_block: bool = True):
    """``(images, calls)``: ``call()``'s output, and the ``(q, k)`` ``[B, H, N, D]`` that every
    attention inside each transformer call used, ``calls[c][block]``, in execution order."""
    calls: list[list[tuple[torch.Tensor, torch.Tensor]]] = []
    inside = [False]
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording(*args, **kwargs):
        if inside[0]:  # diffusers' Flux passes query=, key=, value= by keyword
            q, k = (args[i] if len(args) > i else kwargs[name] for i, name in enumerate(("query", "key")))
            calls[-1].append((q.detach().clone(), k.detach().clone()))
        return sdpa(*args, **kwargs)

    def enter(module, args, kwargs):
        calls.append([])
        inside[0] = True

    def leave(module, args, output):
        inside[0] = False

    transformer = backend.transformer
    hooks = [
        transformer.register_forward_pre_hook(enter, with_kwargs=True),
        transformer.register_forward_hook(leave),
    ]
    try:
        with monkeypatch.context() as m:
            m.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
            images = call()
    finally:
        for h in hooks:
            h.remove()
    assert not every_block or all(len(c) == backend.num_blocks for c in calls)
    return images, calls


def reference_maps(backend, calls, text_len, cond_calls, cond_rows, blocks, columns):
    """``{block: [B, N_img, K]}``: the mean over ``cond_calls`` of the image rows' softmax over all
    joint keys (float64, heads averaged) at text ``columns``, for the batch rows ``cond_rows``."""
    out = {}
    for block in blocks:
        per_step = []
        for c in cond_calls:
            q, k = (x.double() for x in calls[c][block])
            n = q.shape[2]
            probs = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(-1)  # [B, H, N, N]
            if backend.family.name == "flux":  # [text; image]
                img, txt = slice(text_len, n), slice(0, text_len)
            else:  # SD3: [image; text]
                img, txt = slice(0, n - text_len), slice(n - text_len, n)
            p = probs[:, :, img, txt].mean(1)[cond_rows]  # [M, N_img, T]
            per_step.append(p[..., list(columns)])
        out[block] = torch.stack(per_step).mean(0)
    return out


def assert_matches_reference(tr, backend, calls, cond_calls, cond_rows):
    ref = reference_maps(backend, calls, tr.text_len, cond_calls, cond_rows, tr.layers, tr.columns)
    maps = tr.maps()
    for block in tr.layers:
        got = maps[block]
        assert got.shape == (len(cond_rows), 1, tr.grid[0] * tr.grid[1], len(tr.columns))
        torch.testing.assert_close(got[:, 0].double(), ref[block], atol=1e-5, rtol=0)


# ---- exactness and unchanged images -------------------------------------------------------------


CASES = {
    # name: (pipeline keywords, transformer calls per step, which of them / which rows are conditional)
    "one": (dict(prompt=PROMPTS[0], guidance_scale=1.0), 1, 0, lambda b: [0]),
    "cfg_batch": (dict(prompt=PROMPTS, guidance_scale=5.0), 1, 0, lambda b: [2, 3]),
    "per_prompt": (
        dict(prompt=PROMPTS, num_images_per_prompt=2, guidance_scale=1.0),
        1,
        0,
        lambda b: [0, 1, 2, 3],
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_sd3_images_unchanged_and_maps_equal_explicit_softmax(tiny, monkeypatch, case):
    kw, per_step, first, rows = CASES[case]
    plain, calls = record_qk(tiny, monkeypatch, lambda: generate(tiny.pipe, **kw))
    with lava.trace(tiny, layers=[0, 2, 3]) as tr:
        traced = generate(tiny.pipe, **kw)
    assert torch.equal(plain, traced)
    assert tr.steps == [0, 1] and len(calls) == 2 * per_step
    cond_rows = rows(tiny)
    if case == "cfg_batch":  # under CFG the batch is [unconditional; conditional]: the second half
        assert calls[0][0][0].shape[0] == 4
    assert_matches_reference(tr, tiny, calls, range(first, len(calls), per_step), cond_rows)
    assert tr.num_images == len(cond_rows)


@pytest.mark.parametrize("true_cfg", [False, True])
def test_flux_images_unchanged_and_maps_equal_explicit_softmax(tiny_flux, monkeypatch, true_cfg):
    kw = dict(prompt=PROMPTS, guidance_scale=3.5)
    if true_cfg:  # a second transformer call per step, with the negative prompts (same shape): not traced
        kw |= dict(negative_prompt=["blurry", "dark"], true_cfg_scale=2.0)
    plain, calls = record_qk(tiny_flux, monkeypatch, lambda: generate(tiny_flux.pipe, **kw))
    with lava.trace(tiny_flux, layers=[1, 2, 3]) as tr:  # double-stream 1, single-stream 2 and 3
        traced = generate(tiny_flux.pipe, **kw)
    assert torch.equal(plain, traced)
    per_step = 2 if true_cfg else 1
    assert len(calls) == 2 * per_step and tr.steps == [0, 1]
    assert_matches_reference(tr, tiny_flux, calls, range(0, len(calls), per_step), [0, 1])


def test_chosen_steps_only(tiny, monkeypatch):
    kw = dict(guidance_scale=1.0)
    _, calls = record_qk(tiny, monkeypatch, lambda: generate(tiny.pipe, steps=3, **kw))
    with lava.trace(tiny, layers=[1], steps=[0, 2]) as tr:
        generate(tiny.pipe, steps=3, **kw)
    assert tr.steps == [0, 2] and len(tr.timesteps) == 2 and tr.timesteps[0] > tr.timesteps[1]
    assert_matches_reference(tr, tiny, calls, [0, 2], [0])


def test_skip_layer_guidance_pass_is_not_traced(tiny, monkeypatch):
    # SD3.5's skip-layer guidance: a second call per step on the conditional rows with blocks left out
    kw = dict(guidance_scale=4.0, skip_guidance_layers=[2], skip_layer_guidance_start=0.0)
    kw |= dict(skip_layer_guidance_stop=1.0)
    _, calls = record_qk(tiny, monkeypatch, lambda: generate(tiny.pipe, steps=3, **kw), every_block=False)
    main = [i for i, c in enumerate(calls) if len(c) == tiny.num_blocks]
    assert len(calls) == 5 and main == [0, 1, 3]  # steps 1 and 2 have a skip-layer call after the main one
    with lava.trace(tiny, layers=[1, 3]) as tr:
        generate(tiny.pipe, steps=3, **kw)
    assert tr.steps == [0, 1, 2]
    assert_matches_reference(tr, tiny, calls, main, [1])


def test_img2img_pipeline(tiny):
    from diffusers import StableDiffusion3Img2ImgPipeline

    pipe = StableDiffusion3Img2ImgPipeline(**tiny.pipe.components)
    init = torch.rand(1, 3, 32, 48)
    kw = dict(image=init, strength=0.5, guidance_scale=1.0)
    plain = generate(pipe, steps=4, **kw)
    with lava.trace(pipe, words=["cat"]) as tr:
        traced = generate(pipe, steps=4, **kw)
    assert torch.equal(plain, traced)
    assert tr.steps == [0, 1]  # strength 0.5 of 4 steps: the two last run, counted from 0
    assert tr.heatmaps().scores.shape == (1, 1, 8, 12)


# ---- what the maps are read as --------------------------------------------------------------------


def test_heatmaps_are_the_word_tokens_mean_through_aggregate(tiny):
    with lava.trace(tiny, layers=[1, 2]) as tr:
        generate(tiny.pipe, prompt=PROMPTS, guidance_scale=1.0)
    heat = tr.heatmaps(["cat", "photo"], indices=[0], normalize="none")
    prompt = tr.encoding(["cat", "photo"], 0)
    assert prompt.clip_spans["cat"] and prompt.t5_spans["cat"]  # both parts of SD3's text sequence
    maps = tr.maps()
    for c, word in enumerate(["cat", "photo"]):
        cols = [tr.columns.index(k) for k in prompt.positions(word)]
        want = torch.stack([maps[b][0, 0][:, cols].mean(-1) for b in (1, 2)]).mean(0)
        torch.testing.assert_close(heat.scores[0, c].flatten(), want)
    # the same composition as the stages called by hand on the traced slices
    by_hand = lava.aggregate(tr.slices(0), tr.encoding(["cat", "sofa"], 0))
    torch.testing.assert_close(tr.heatmaps(["cat", "sofa"], indices=[0]).scores, by_hand.scores)
    seg = tr.segment(["cat", "sofa"], indices=[0])
    assert torch.equal(seg.labels[0], lava.to_mask(by_hand).labels[0])
    assert seg.labels[0].shape == (32, 48) and seg.classes == ("cat", "sofa")


def test_batch_reads_each_image_with_its_own_prompt(tiny):
    with lava.trace(tiny) as tr:
        generate(tiny.pipe, prompt=PROMPTS, num_images_per_prompt=2, guidance_scale=4.0)
    assert tr.prompts == (PROMPTS[0], PROMPTS[0], PROMPTS[1], PROMPTS[1])
    heat = tr.heatmaps(["a"])  # in both prompts, at other token positions
    assert heat.scores.shape == (4, 1, 8, 12)
    alone = tr.heatmaps(["a"], indices=[2, 3])
    torch.testing.assert_close(heat.scores[2:], alone.scores)
    with pytest.raises(
        lava.ClassNameError, match=r"'cat' is not a word of the prompt 'a dog.*indices=\[0, 1\]"
    ):
        tr.heatmaps(["cat"])
    assert tr.heatmaps(["cat"], indices=[1]).scores.shape == (1, 1, 8, 12)


def test_words_given_up_front_keep_only_their_tokens(tiny):
    kw = dict(guidance_scale=1.0)
    with lava.trace(tiny, layers=[2]) as every:
        generate(tiny.pipe, **kw)
    with lava.trace(tiny, layers=[2], words=["cat", "red sofa"]) as some:
        generate(tiny.pipe, **kw)
    assert len(some.columns) < len(every.columns) == every.text_len
    idx = [every.columns.index(k) for k in some.columns]
    torch.testing.assert_close(some.maps()[2], every.maps()[2][..., idx])
    assert some.nbytes < every.nbytes
    torch.testing.assert_close(some.heatmaps().scores, every.heatmaps(["cat", "red sofa"]).scores)
    with pytest.raises(lava.LavaError, match="kept only the tokens"):
        some.heatmaps(["photo"])


def test_word_past_clip_window_has_t5_tokens(tiny):
    filler = " ".join(["green tree"] * 45)  # 90 CLIP tokens before the word
    prompt = f"{filler} and a cat"
    with lava.trace(tiny, layers=[1]) as tr:
        generate(tiny.pipe, prompt=prompt, guidance_scale=1.0, max_sequence_length=128)
    enc = tr.encoding(["cat", "green"])
    assert enc.clip_spans["cat"] == () and enc.t5_spans["cat"]
    assert all(p >= enc.clip_len for p in enc.t5_spans["cat"])
    assert enc.clip_spans["green"] and max(enc.clip_spans["green"]) < enc.clip_len - 1
    assert tr.heatmaps(["cat"]).scores.shape == (1, 1, 8, 12)
    with pytest.raises(lava.LavaError, match="no 'clip' tokens"):
        tr.heatmaps(["cat"], tokens="clip")


def test_word_ranges_are_whole_words():
    assert word_ranges("a cat, a Cat and a category", "cat") == [(2, 5), (9, 12)]
    assert word_ranges("a red  sofa", "red sofa") == [(2, 11)]


# ---- errors, memory, clean-up ---------------------------------------------------------------------


def test_unknown_word_names_the_prompt_words(backend):
    with lava.trace(backend) as tr:
        generate(backend.pipe, guidance_scale=1.0)
    with pytest.raises(
        lava.LavaError, match=r"'zebra' is not a word of the prompt .*: a, photo, of, cat, on, red, sofa"
    ):
        tr.heatmaps(["cat", "zebra"])
    # named up front, it fails as soon as the pipeline has encoded the prompt, before denoising
    with (
        pytest.raises(lava.ClassNameError, match="'zebra' is not a word"),
        lava.trace(backend, words=["zebra"]),
    ):
        generate(backend.pipe, guidance_scale=1.0)
    assert "encode_prompt" not in vars(backend.pipe)


def test_memory_does_not_grow_with_steps(backend):
    held = {}
    for steps in (2, 6):
        with lava.trace(backend) as tr:
            generate(backend.pipe, steps=steps, guidance_scale=1.0)
        assert len(tr.steps) == steps
        held[steps] = tr.nbytes
    # one [B, 1, N_img, T] float32 sum per traced block, whatever the step count
    blocks = len(lava.trace(backend).layers)
    assert held[2] == held[6] == blocks * 1 * 96 * tr.text_len * 4


def test_peak_tensor_memory_flat_in_steps(tiny):
    """The call's peak of live tensor bytes (every storage an op creates, counted until freed:
    ``meta_memory.LiveBytes`` on real tensors) grows from 2 to 6 traced steps exactly as the plain
    call's does (the scheduler's own per-step arrays, a few bytes a step); a control that keeps
    each step's maps, as attention-map-diffusers does, grows by those maps under the same
    accounting. (Before the capture store broke its self-reference, each step's slices lived until
    the garbage collector ran, and this test saw them.)"""
    from meta_memory import LiveBytes

    def peak(steps: int, mode: str) -> int:
        kept = []
        with LiveBytes() as acct:
            if mode == "plain":
                generate(tiny.pipe, steps=steps, guidance_scale=1.0)
                return acct.peak
            with lava.trace(tiny) as tr:
                hook = None
                if mode == "keep":  # the control: a copy of the sums after every transformer call
                    hook = tiny.transformer.register_forward_hook(
                        lambda *_: kept.append({b: m.clone() for b, m in tr._sums.items()})
                    )
                generate(tiny.pipe, steps=steps, guidance_scale=1.0)
                if hook is not None:
                    hook.remove()
        return acct.peak

    plain = peak(6, "plain") - peak(2, "plain")
    assert 0 <= plain <= 64
    assert peak(6, "trace") - peak(2, "trace") == plain
    assert peak(6, "keep") - peak(2, "keep") >= 4 * 96 * (77 + 32) * 4  # 4 more [96, 109] float32 maps


def _untouched(backend, before):
    procs, encode = before
    assert [b.attn.processor for b in backend.blocks] == procs
    assert all(not b._forward_hooks and not b._forward_pre_hooks for b in backend.blocks)
    t = backend.transformer
    assert not t._forward_hooks and not t._forward_pre_hooks
    assert "encode_prompt" not in vars(backend.pipe) and backend.pipe.encode_prompt == encode


def test_everything_restored_on_error(backend):
    before = ([b.attn.processor for b in backend.blocks], backend.pipe.encode_prompt)
    # an error after the call, inside the block
    with pytest.raises(RuntimeError, match="after"), lava.trace(backend) as tr:
        generate(backend.pipe, guidance_scale=1.0)
        raise RuntimeError("after")
    _untouched(backend, before)
    assert tr.heatmaps(["cat"]).scores.shape[0] == 1  # what was traced stays readable

    # an error inside a traced transformer call, while lava's processors are in
    block = backend.blocks[-1]

    def boom(module, args, output):
        assert type(backend.blocks[0].attn.processor).__name__ == "CaptureProcessor"
        raise RuntimeError("inside")

    hook = block.register_forward_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="inside"), lava.trace(backend, layers=[0]):
            generate(backend.pipe, guidance_scale=1.0)
    finally:
        hook.remove()
    _untouched(backend, before)
    generate(backend.pipe, guidance_scale=1.0)  # and the pipeline still runs


def test_one_call_per_trace_and_no_nesting(tiny):
    with pytest.raises(lava.LavaError, match="one pipeline call"), lava.trace(tiny):
        generate(tiny.pipe, guidance_scale=1.0)
        generate(tiny.pipe, guidance_scale=1.0)
    with pytest.raises(lava.LavaError, match="cannot be nested"), lava.trace(tiny), lava.trace(tiny):
        pass
    assert "encode_prompt" not in vars(tiny.pipe)


def test_raw_pipeline_is_neither_moved_nor_cast(tiny):
    pipe = tiny.pipe
    before = {n: (m.device, m.dtype) for n, m in pipe.components.items() if hasattr(m, "dtype")}
    with lava.trace(pipe) as tr:  # a plain diffusers pipeline: lava.from_pipeline(pipe, move=False)
        generate(pipe, guidance_scale=1.0)
    after = {n: (m.device, m.dtype) for n, m in pipe.components.items() if hasattr(m, "dtype")}
    assert before == after
    assert tr.layers == tr.backend.defaults.layers


def test_options_a_trace_cannot_take(tiny):
    with lava.trace(tiny, layers=[1]) as tr:
        generate(tiny.pipe, guidance_scale=1.0)
    with pytest.raises(lava.LavaError, match="timestep cannot be chosen after a trace"):
        tr.segment(["cat"], timestep=500)
    with pytest.raises(lava.LavaError, match=r"blocks \[2\] were not traced"):
        tr.heatmaps(["cat"], layers=[2])
    with pytest.raises(lava.LavaError, match="propagate"):
        tr.segment(["cat"], refine="propagate")
    with pytest.raises(lava.LavaError, match=r"pass images=out\.images"):
        tr.segment(["cat"], refine="pamr")
    with pytest.raises(lava.LavaError, match="no denoising step was traced"):
        with lava.trace(tiny, steps=[5]) as none:
            generate(tiny.pipe, guidance_scale=1.0)
        none.maps()

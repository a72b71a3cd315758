"""Z-Image through its family adapter: exact captures after RoPE in the unified [image; caption]
sequence (image pad tokens and batch padding kept out), the model untouched, early exit, chat-template
spans, list inputs, several prompt rows, lava.trace over a stock ZImagePipeline, the CLI, loading
and memory planning."""

from __future__ import annotations

import pytest
import torch
from conftest import blocks_run

import lava
from lava.backends.families import family_of
from lava.backends.zimage import SEQ_MULTI_OF, ZIMAGE
from lava.errors import LavaError, ModelError
from lava.stages.capture import capturing, run_until_captured, transformer_inputs
from lava.types import CapturePlan

CLASSES = ["cat", "potted plant", "hydrant"]


@pytest.fixture(scope="module")
def tiny_zimage():
    return lava.load_backend("tiny-z-image")


@pytest.fixture
def inputs(tiny_zimage, image):
    # scene() is 40x56 px: at 32 px a 24x32 input, a 6x8 grid = 48 image tokens + 16 image pad tokens
    return lava.noise(tiny_zimage, image, timestep=400, seed=3), lava.encode_prompt(tiny_zimage, CLASSES)


def _ceil32(n: int) -> int:
    return n + (-n % SEQ_MULTI_OF)


def _run(backend, noisy, prompt, rows=(0,)):
    return backend.transformer(**transformer_inputs(backend, noisy, prompt, rows), return_dict=False)[0]


def test_blocks_are_the_main_layers(tiny_zimage):
    tr = tiny_zimage.transformer
    assert family_of(tr) is ZIMAGE
    assert tiny_zimage.num_blocks == len(tr.layers) == 4
    assert tiny_zimage.block_kinds == ["unified"] * 4
    assert all(a is b for a, b in zip(tiny_zimage.blocks, tr.layers, strict=True))
    refiners = {id(b) for b in [*tr.noise_refiner, *tr.context_refiner]}
    assert not refiners & {id(b) for b in tiny_zimage.blocks}  # the refiners are never numbered
    assert tiny_zimage.joint_blocks == (0, 1, 2, 3)
    assert tiny_zimage.clip_len == 0 and tiny_zimage.text_encoders.startswith("Qwen3")
    assert "Qwen3 only" in tiny_zimage.describe()


def _grid_has_pads(noisy) -> bool:
    n = noisy.grid[0] * noisy.grid[1]
    return _ceil32(n) != n


@pytest.mark.parametrize("impl", ["torch", "naive", "triton"])
@pytest.mark.parametrize("size", [None, "32x32"])
def test_outputs_unchanged_by_capture(tiny_zimage, image, impl, size):
    from lava.kernels import available_impls

    if impl not in available_impls("cpu"):
        pytest.skip(f"{impl} is not available here")
    noisy = lava.noise(tiny_zimage, image, timestep=400, seed=3, resolution=size)
    assert _grid_has_pads(noisy) == (size is None)  # 48 tokens + 16 pads, or 64 tokens and none
    # two prompt rows of different lengths: the model pads the shorter entry and masks it
    prompt = lava.encode_prompt(tiny_zimage, ["cat", "dog"] + [f"zq{i}x" for i in range(30)])
    rows = tuple(range(prompt.num_prompts))
    assert len(rows) >= 2 and len(set(prompt.text_mask.sum(1).tolist())) > 1
    plain = _run(tiny_zimage, noisy, prompt, rows)
    plan = CapturePlan(
        layers=(0, 1, 2, 3),
        columns=prompt.columns(),
        impl=impl,
        early_exit=False,
        prompt_rows=rows,
        text_len=prompt.text_len,
    )
    with capturing(tiny_zimage.transformer, plan) as store:
        captured = run_until_captured(
            tiny_zimage.transformer, **transformer_inputs(tiny_zimage, noisy, prompt, rows)
        )
    assert set(store) == {0, 1, 2, 3}
    assert len(captured) == len(plain) == len(rows)
    for got, want in zip(captured, plain, strict=True):
        if impl == "torch":
            # The same ops as ZSingleStreamAttnProcessor, and the same CPU flash kernel with the same
            # mask: bitwise the model's own output.
            assert torch.equal(got, want)
        else:
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def _record_model_attention(monkeypatch):
    """Record q, k (``[B, H, N, D]``) and the mask of every attention the unmodified model runs, as
    its own processor hands them to the attention kernel."""
    from diffusers.models.transformers import transformer_z_image as tz

    seen = []
    original = tz.dispatch_attention_fn

    def recording(query, key, value, attn_mask=None, **kw):
        seen.append((query.transpose(1, 2).double(), key.transpose(1, 2).double(), attn_mask))
        return original(query, key, value, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(tz, "dispatch_attention_fn", recording)
    return seen


@pytest.mark.parametrize("size", [None, "32x32"])
def test_slice_equals_softmax_of_the_models_own_q_k(tiny_zimage, image, monkeypatch, size):
    """The captured image→text map (joint softmax, per head) against float64 softmax of the q and k
    the unmodified model attends with (after its norms and RoPE), with its mask: image rows are
    the grid's tokens (not the image pads), text column p is the p-th caption token."""
    noisy = lava.noise(tiny_zimage, image, timestep=400, seed=3, resolution=size)
    prompt = lava.encode_prompt(tiny_zimage, ["cat", "dog"] + [f"zq{i}x" for i in range(30)])
    rows = tuple(range(prompt.num_prompts))
    seen = _record_model_attention(monkeypatch)
    _run(tiny_zimage, noisy, prompt, rows)
    tr = tiny_zimage.transformer
    refiners = len(tr.noise_refiner) + len(tr.context_refiner)
    main = seen[refiners:]  # the refiners run first (image alone, then caption alone)
    assert len(main) == 4
    monkeypatch.undo()

    layers = (0, 1, 2, 3)
    slices = lava.capture(tiny_zimage, noisy, prompt, layers=layers, heads="none", prompt_batch=None)
    n_img = noisy.grid[0] * noisy.grid[1]
    start = _ceil32(n_img)  # the caption starts after the image's pad tokens
    t = prompt.text_len
    for i in layers:
        q, k, mask = main[i]
        scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
        if mask is not None:
            scores = scores.masked_fill(~mask.bool(), float("-inf"))
        probs = torch.softmax(scores, -1)[:, :, :n_img]  # [R, H, N_img, N]
        want = torch.stack(
            [probs[key // t, :, :, start + key % t] for key in slices.columns], dim=-1
        )  # each key read from its own prompt row
        got = slices.maps[i][0]
        assert got.shape == want.shape == (2, n_img, len(slices.columns))
        assert {key // t for key in slices.columns} == set(rows)
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=0)


def test_rope_and_pads_matter_for_the_slice(tiny_zimage, inputs, monkeypatch):
    """The reference above is not trivially met: without RoPE, or reading the caption from the
    image pads' start, the map differs."""
    noisy, prompt = inputs
    seen = _record_model_attention(monkeypatch)
    _run(tiny_zimage, noisy, prompt)
    monkeypatch.undo()
    got = lava.capture(tiny_zimage, noisy, prompt, layers=[0], heads="none").maps[0][0].double()
    q, k, _ = seen[2]  # block 0 (after one noise and one context refiner)
    n_img = noisy.grid[0] * noisy.grid[1]
    cols = [_ceil32(n_img) + p for p in prompt.columns()]
    probs = torch.softmax(q @ k.transpose(-1, -2) / 4.0, -1)[0, :, :n_img]
    torch.testing.assert_close(got, probs[:, :, cols], atol=1e-5, rtol=0)
    shifted = probs[:, :, [n_img + p for p in prompt.columns()]]  # ignoring the 16 image pads
    assert (got - shifted).abs().max() > 1e-4

    attn = tiny_zimage.blocks[0].attention
    hidden = {}
    hd = attn.register_forward_pre_hook(lambda m, a, kw: hidden.update(h=a[0]), with_kwargs=True)
    try:
        _run(tiny_zimage, noisy, prompt)
    finally:
        hd.remove()
    x = hidden["h"].double()
    a = attn.to(torch.float64)
    try:
        qn = a.norm_q(a.to_q(x).unflatten(-1, (2, -1))).transpose(1, 2)
        kn = a.norm_k(a.to_k(x).unflatten(-1, (2, -1))).transpose(1, 2)
    finally:
        attn.to(torch.float32)
    torch.testing.assert_close(qn.norm(dim=-1), q.norm(dim=-1), atol=1e-5, rtol=1e-5)  # RoPE keeps norms
    no_rope = torch.softmax(qn @ kn.transpose(-1, -2) / 4.0, -1)[0, :, :n_img][:, :, cols]
    assert (got - no_rope).abs().max() > 1e-4


def test_early_exit_stops_after_deepest_captured_block(tiny_zimage, inputs):
    noisy, prompt = inputs
    tr = tiny_zimage.transformer
    final = tr.all_final_layer["2-1"]
    with blocks_run(tr.layers, final, "final") as ran:
        lava.capture(tiny_zimage, noisy, prompt, layers=[1])
        assert ran == [0, 1]
        ran.clear()
        slices = lava.capture(tiny_zimage, noisy, prompt, layers=[0, 2])
        assert ran == [0, 1, 2]
        ran.clear()
        lava.capture(tiny_zimage, noisy, prompt, layers=[2], early_exit=False)
        assert ran == [0, 1, 2, 3, "final"]
    assert list(slices.maps) == [0, 2]
    assert all(type(b.attention.processor).__name__ == "ZSingleStreamAttnProcessor" for b in tr.layers)


def test_spans_are_exact_under_the_chat_template(tiny_zimage):
    prompt = lava.encode_prompt(tiny_zimage, CLASSES)
    tok = tiny_zimage.pipe.tokenizer
    templated = tok.apply_chat_template(
        [{"role": "user", "content": prompt.text}],
        tokenize=False,
        add_generation_prompt=True,
        enable_thinking=True,
    )
    assert templated.startswith("<|im_start|>user\n") and templated.endswith("<|im_start|>assistant\n")
    ids = tok(templated)["input_ids"]
    for name in CLASSES:
        span = prompt.t5_spans[name]
        assert span == tuple(range(span[0], span[-1] + 1))
        assert tok.decode([ids[p] for p in span]).strip() == name
    assert len(prompt.t5_spans["hydrant"]) > 1  # a rare word: several tokens
    assert prompt.clip_spans == dict.fromkeys(CLASSES, ())
    # the embeddings are the pipeline's own: its encode_prompt, the masked tokens dropped
    own, _ = tiny_zimage.pipe.encode_prompt(
        prompt=[prompt.text], device="cpu", do_classifier_free_guidance=False, max_sequence_length=128
    )
    n = own[0].shape[0]
    assert n == len(ids) and int(prompt.text_mask[0].sum()) == n and not prompt.text_mask[0, n:].any()
    assert torch.equal(prompt.embeds[0, :n], own[0]) and not prompt.embeds[0, n:].any()
    assert prompt.pooled.shape == (1, 0)


def test_window_keeps_the_template_whole(tiny_zimage):
    """A vocabulary longer than the window is split so every templated prompt fits the window with
    its closing template tokens."""
    short = lava.load_backend("tiny-z-image", max_sequence_length=24)
    tail = len(short.pipe.tokenizer("<|im_end|>\n<|im_start|>assistant\n")["input_ids"])
    assert ZIMAGE.sequence_window(short) == 24 - tail
    names = ["cat", "dog", "horse", "sheep", "tree", "sky", "road", "car", "bus", "boat", "zxqv", "qqzk"]
    prompt = lava.encode_prompt(short, names)
    assert prompt.num_prompts >= 2
    lengths = prompt.text_mask.sum(1)
    assert int(lengths.max()) <= 24
    for name in names:
        assert max(prompt.t5_spans[name]) < 24 - tail
    with pytest.raises(lava.errors.ClassNameError, match="does not fit"):
        lava.encode_prompt(short, ["x" * 40])


def _two_rows(backend, first, second):
    """One ``PromptEncoding`` of two prompt rows of very different lengths (``split_classes`` balances
    the rows it makes, so such a pair is joined here from two encodings)."""
    import dataclasses

    a, b = lava.encode_prompt(backend, first), lava.encode_prompt(backend, second)
    return dataclasses.replace(
        a,
        classes=a.classes + b.classes,
        texts=a.texts + b.texts,
        embeds=torch.cat([a.embeds, b.embeds]),
        pooled=torch.cat([a.pooled, b.pooled]),
        clip_spans={**a.clip_spans, **b.clip_spans},
        t5_spans={**a.t5_spans, **b.t5_spans},
        rows={**dict.fromkeys(a.classes, 0), **dict.fromkeys(b.classes, 1)},
        text_mask=torch.cat([a.text_mask, b.text_mask]),
    )


def test_padded_and_masked_tokens(tiny_zimage, inputs):
    """Every text key captured (the "null" presence rule's keys): positions past an entry's caption
    region, and the batch padding of the shorter entry, take probability exactly 0; the caption's
    own pad tokens (``cap_pad_token``, up to a multiple of 32) are attended by the model, so they
    take what the model gives them."""
    noisy, _ = inputs
    prompt = _two_rows(tiny_zimage, ["zqxjv qzxvk wqzxv", "vkzqx jqzxw xvqzk", "qwzx"], ["cat"])
    t = prompt.text_len
    lengths = [int(n) for n in prompt.text_mask.sum(1)]
    assert len(set(lengths)) > 1
    slices = lava.capture(tiny_zimage, noisy, prompt, layers=[1], columns=prompt.text_keys(), heads="none")
    maps = slices.maps[1][0]  # [H, N_img, R·T]
    longest = _ceil32(max(lengths))
    for r, n in enumerate(lengths):
        row = maps[..., r * t : (r + 1) * t]
        assert row[..., :n].min() > 0  # real caption tokens
        assert row[..., n : _ceil32(n)].min() > 0  # the model's own caption pads: attended
        assert not row[..., _ceil32(n) :].any()  # batch padding and positions no call holds: exactly 0
    assert _ceil32(min(lengths)) < longest  # the shorter entry was padded and masked
    # each row's probabilities of an image token over its text keys stay below 1 (the rest is image)
    for r in range(2):
        assert float(maps[..., r * t : (r + 1) * t].sum(-1).max()) < 1


def test_inputs_and_outputs_follow_the_pipeline(tiny_zimage, inputs):
    noisy, prompt = inputs
    inp = transformer_inputs(tiny_zimage, noisy, prompt)
    assert set(inp) == {"x", "t", "cap_feats"}
    assert [tuple(x.shape) for x in inp["x"]] == [(4, 1, *noisy.latents.shape[-2:])]
    assert torch.equal(inp["x"][0][:, 0], noisy.latents[0])
    assert inp["t"].item() == pytest.approx((1000 - noisy.timestep) / 1000)  # ZImagePipeline: (1000 - t)/1000
    n = int(prompt.text_mask[0].sum())
    assert torch.equal(inp["cap_feats"][0], prompt.embeds[0, :n])
    out = tiny_zimage.transformer(**inp, return_dict=False)[0]
    v = ZIMAGE.output_latents(out, noisy.grid)
    assert v.shape == noisy.latents.shape
    assert torch.equal(v, -out[0][:, 0][None])  # the pipeline negates the model's output too
    with pytest.raises(LavaError, match="no guidance"):
        ZIMAGE.inputs(noisy.latents, prompt.embeds, prompt.pooled, torch.tensor([400.0]), guidance=3.5)


def test_velocity_sign_matches_the_scheduler_step(tiny_zimage, inputs):
    """lava's velocity ε − x₀ is what ZImagePipeline hands the scheduler: one Euler step with it from
    x_t equals the pipeline's own step."""
    noisy, prompt = inputs
    out = tiny_zimage.transformer(**transformer_inputs(tiny_zimage, noisy, prompt), return_dict=False)[0]
    v = ZIMAGE.output_latents(out, noisy.grid)
    # x_{t-dt} = x_t + (σ_next − σ) · v: with σ_next = 0, x₀ estimate = x_t − σ v
    x0 = noisy.latents - noisy.sigma * v
    pipe_noise_pred = -torch.stack([o.float() for o in out]).squeeze(2)
    torch.testing.assert_close(x0, noisy.latents - noisy.sigma * pipe_noise_pred)


def test_several_prompt_rows(tiny_zimage, image):
    colours = "red green blue yellow black white".split()
    names = [f"{w} thing" for w in colours] + [f"xq{i}zz" for i in range(20)]
    prompt = lava.encode_prompt(tiny_zimage, names)
    assert prompt.num_prompts >= 2
    noisy = lava.noise(tiny_zimage, image)
    together = lava.capture(tiny_zimage, noisy, prompt, layers=[1, 2])
    apart = lava.capture(tiny_zimage, noisy, prompt, layers=[1, 2], prompt_batch=1)
    for layer in (1, 2):
        torch.testing.assert_close(together.maps[layer], apart.maps[layer], atol=1e-6, rtol=1e-5)
    seg = lava.segment(image, names, backend=tiny_zimage)
    assert seg.labels[0].shape == (image.height, image.width)
    assert seg.scores[0].shape[0] == len(names)


def test_presence_and_refinement_run(tiny_zimage, inputs, image):
    from lava.stages.presence import denoising_presence

    noisy, prompt = inputs
    presence = denoising_presence(tiny_zimage, noisy, prompt)
    assert presence.shape == (1, len(CLASSES)) and float(presence.max()) == pytest.approx(1.0)
    seg = lava.segment(image, CLASSES, backend=tiny_zimage, refine="propagate,pamr")
    assert seg.labels[0].shape == (image.height, image.width)


def test_kept_image_qk_are_the_grid_rows(tiny_zimage, inputs, monkeypatch):
    noisy, prompt = inputs
    seen = _record_model_attention(monkeypatch)
    _run(tiny_zimage, noisy, prompt)
    monkeypatch.undo()
    slices = lava.capture(tiny_zimage, noisy, prompt, layers=[1], keep_image_qk=True)
    q, k, _ = seen[3]
    n_img = noisy.grid[0] * noisy.grid[1]
    got_q, got_k = slices.image_qk[1]
    assert got_q.shape[-2] == n_img
    torch.testing.assert_close(got_q[:, 0].double(), q[:, :, :n_img], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got_k[:, 0].double(), k[:, :, :n_img], atol=1e-6, rtol=1e-5)


def test_registry_folder_and_from_pipeline(tiny_zimage, tmp_path, capsys):
    from lava.backends import REGISTRY, list_backends
    from lava.backends.tiny_zimage import build_tiny_zimage_pipeline
    from lava.cli import main

    assert {"z-image-turbo", "tiny-z-image"} <= set(REGISTRY)
    rows = {name: (what, d) for name, what, d in list_backends()}
    assert rows["z-image-turbo"][0].startswith("Tongyi-MAI/Z-Image-Turbo")
    turbo = rows["z-image-turbo"][1]
    assert turbo.source.startswith("unmeasured") and turbo.layers == (11,)
    capsys.readouterr()
    assert main(["models"]) == 0
    listing = capsys.readouterr().out
    assert "z-image-turbo" in listing and "tiny-z-image" in listing

    wrapped = lava.from_pipeline(build_tiny_zimage_pipeline(num_layers=6))
    assert (wrapped.variant, wrapped.family, wrapped.max_sequence_length) == ("z-image-turbo", ZIMAGE, 512)
    assert wrapped.defaults.layers == (2,) and wrapped.defaults.source.startswith("unmeasured")
    assert wrapped.guidance is None
    with pytest.raises(ModelError, match="no guidance embedding"):
        lava.from_pipeline(tiny_zimage.pipe, guidance=2.0)
    with pytest.raises(ModelError, match="cannot be dropped"):
        lava.load_backend("tiny-z-image", drop_t5=True)

    folder = tmp_path / "zimage"
    tiny_zimage.pipe.save_pretrained(folder)
    loaded = lava.load_backend(str(folder), device="cpu", dtype="float32")
    assert loaded.family is ZIMAGE and loaded.variant == "z-image-turbo"
    # (the reloaded tokenizer lost the rule-built one's whole-word lookup, so it splits words
    # differently: the spans are checked against its own tokens)
    prompt = lava.encode_prompt(loaded, CLASSES)
    tok = loaded.pipe.tokenizer
    ids = tok(ZIMAGE.template_parts(tok)[0] + prompt.text + ZIMAGE.template_parts(tok)[1])["input_ids"]
    for name in CLASSES:
        assert tok.decode([ids[p] for p in prompt.t5_spans[name]]).strip() == name
    own, _ = loaded.pipe.encode_prompt(prompt=[prompt.text], device="cpu", do_classifier_free_guidance=False)
    assert torch.equal(prompt.embeds[0, : own[0].shape[0]], own[0])


def test_segment_command_runs_on_tiny_zimage(tmp_path):
    from conftest import scene

    from lava.cli import main

    img = tmp_path / "img.png"
    scene().save(img)
    out = tmp_path / "seg"
    assert main(["segment", str(img), "--model", "tiny-z-image", "--classes", "a,b", "--out", str(out)]) == 0
    assert (out / "img_labels.png").exists()


def test_memory_plan_from_the_published_configs(capsys, tmp_path):
    from PIL import Image

    from lava.cli import main
    from lava.model_spec import zimage_spec
    from lava.planner import estimate_memory, plan_memory

    spec = zimage_spec()
    assert 6.1e9 < spec.params["transformer"] < 6.2e9  # Z-Image: a 6B single-stream DiT
    assert 4.0e9 < spec.params["text_encoder"] < 4.05e9  # Qwen3-4B
    assert spec.clip_len == 0 and spec.t5_len == 512 and not spec.has_t5
    kw = dict(dtype=torch.bfloat16, device="cuda")
    on_gpu = estimate_memory(spec, (1024, 1024), **kw)
    offloaded = estimate_memory(spec, (1024, 1024), offload_text_encoders=True, **kw)
    assert on_gpu.tokens == (4096, 512, 1)
    assert on_gpu.total - offloaded.total == pytest.approx(spec.params["text_encoder"] * 2, rel=1e-6)
    assert plan_memory(spec, (1024, 1024), 16 * 2**30, **kw).offload_text_encoders  # 24 GiB cards: either
    with pytest.raises(LavaError, match="does not fit"):
        plan_memory(spec, (1024, 1024), 8 * 2**30, **kw)

    path = tmp_path / "x.png"
    Image.new("RGB", (64, 64)).save(path)
    capsys.readouterr()
    args = ["segment", str(path), "--classes", "a,b", "--model", "z-image-turbo", "--dry-run"]
    args += ["--device", "cuda"]
    assert main(args) == 0
    report = capsys.readouterr().out
    assert "no weights loaded" in report and "text_encoder" in report and "4096 image + 512 text" in report
    assert main(["segment", str(path), "--classes", "a,b", "--model", "tiny-z-image", "--dry-run"]) == 0
    assert "tiny-z-image" in capsys.readouterr().out


# ---- lava.trace over a stock ZImagePipeline ---------------------------------------------------------

TRACE_PROMPTS = ["a photo of a cat on a red sofa", "a dog in the grass"]
TRACE_SIZE = dict(height=32, width=40)  # 16x20 latents: an 8x10 grid, 80 tokens + 16 image pad tokens


def _generate(pipe, prompt, steps=2, **kw):
    """One ordinary ZImagePipeline call (lists copied: the pipeline rewrites a prompt list in place)."""
    copy = {k: list(v) if isinstance(v, list) else v for k, v in kw.items()}
    prompt = list(prompt) if isinstance(prompt, list) else prompt
    out = pipe(
        prompt,
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
        max_sequence_length=64,
        **TRACE_SIZE,
        **copy,
    )
    return out.images


def _reference(seen, calls, refiners, blocks, rows, columns, n_img):
    """``{block: [M, N_img, K]}``: the mean over the transformer calls of the float64 softmax of the
    q, k the unmodified model attended with (its own mask), heads averaged, image rows of the grid,
    text position p at joint column ceil32(N_img) + p (0 past the entry's sequence), batch ``rows``.
    ``seen``: every attention of the ``calls`` transformer calls, ``refiners`` of them before the
    4 main blocks in each."""
    assert len(seen) == calls * (refiners + 4)
    start = _ceil32(n_img)
    out = {}
    for b in blocks:
        steps = []
        for c in range(calls):
            q, k, mask = seen[c * (refiners + 4) + refiners + b]
            scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
            if mask is not None:
                scores = scores.masked_fill(~mask.bool(), float("-inf"))
            probs = torch.softmax(scores, -1)[:, :, :n_img].mean(1)[list(rows)]  # [M, N_img, N]
            n = probs.shape[-1]
            want = probs.new_zeros(len(rows), n_img, len(columns))
            held = [i for i, p in enumerate(columns) if start + p < n]
            want[..., held] = probs[..., [start + columns[i] for i in held]]
            steps.append(want)
        out[b] = torch.stack(steps).mean(0)
    return out


TRACE_CASES = {
    # name: (pipeline keywords, steps, conditional batch rows of every call, images per prompt)
    # CFG: ZImagePipeline batches [prompts; negatives]; a long negative pads and masks the prompts' entries
    "cfg_batch": (
        dict(
            prompt=TRACE_PROMPTS,
            negative_prompt=["blurry dark grainy low quality picture of nothing at all", "blurry"],
            num_images_per_prompt=2,
            guidance_scale=5.0,
        ),
        2,
        [0, 1, 2, 3],
        2,
    ),
    "no_cfg": (dict(prompt=TRACE_PROMPTS[0], guidance_scale=0.0), 2, [0], 1),
    # the negative prompt is the prompt itself: equal embeddings, yet only the prompt's entries count
    "negative_equals_prompt": (
        dict(
            prompt=TRACE_PROMPTS[0],
            negative_prompt=TRACE_PROMPTS[0],
            num_images_per_prompt=2,
            guidance_scale=5.0,
        ),
        2,
        [0, 1],
        2,
    ),
    # cfg_truncation: CFG on the first steps only, so the calls change batch size during the loop
    "cfg_truncation": (dict(prompt=TRACE_PROMPTS[0], guidance_scale=5.0, cfg_truncation=0.1), 3, [0], 1),
}


@pytest.mark.parametrize("case", sorted(TRACE_CASES))
def test_trace_images_unchanged_and_maps_equal_the_models_attention(tiny_zimage, monkeypatch, case):
    kw, steps, rows, per_prompt = TRACE_CASES[case]
    pipe = tiny_zimage.pipe
    seen = _record_model_attention(monkeypatch)
    batches = []
    hook = pipe.transformer.register_forward_pre_hook(lambda m, args: batches.append(len(args[0])))
    try:
        plain = _generate(pipe, steps=steps, **kw)
    finally:
        hook.remove()
    monkeypatch.undo()
    layers = (0, 2, 3)
    with lava.trace(pipe, layers=layers) as tr:
        traced = _generate(pipe, steps=steps, **kw)
    assert torch.equal(plain, traced)
    assert len(batches) == steps and tr.steps == list(range(steps)) and tr.grid == (8, 10)
    prompts = kw["prompt"] if isinstance(kw["prompt"], list) else [kw["prompt"]]
    assert tr.images_per_prompt == per_prompt and tr.num_images == len(rows) == len(prompts) * per_prompt
    assert tr.prompts == tuple(p for p in prompts for _ in range(per_prompt))
    cfg = kw["guidance_scale"] > 0
    if case == "cfg_truncation":
        assert batches == [2, 1, 1]  # the later steps (t_norm > 0.1) run without the negative entry
    else:
        assert set(batches) == {len(rows) * (2 if cfg else 1)}
    n_img = 80
    before, after = ZIMAGE.template_parts(pipe.tokenizer)
    # lava's text positions: the templated tokens of the longest prompt (each caption as the model reads it)
    assert tr.text_len == max(len(pipe.tokenizer(before + p + after)["input_ids"]) for p in prompts)
    refiners = len(pipe.transformer.noise_refiner) + len(pipe.transformer.context_refiner)
    want = _reference(seen, steps, refiners, layers, rows, tr.columns, n_img)
    maps = tr.maps()
    for b in layers:
        assert maps[b].shape == (len(rows), 1, n_img, tr.text_len)
        torch.testing.assert_close(maps[b][:, 0].double(), want[b], atol=1e-5, rtol=0)
    if case == "cfg_batch":  # the reference tells the halves apart: the negative half is other maps
        assert seen[refiners][2] is not None  # the entries differ in length: the model masks the padding
        negative = _reference(seen, steps, refiners, layers, [4, 5, 6, 7], tr.columns, n_img)
        assert all((maps[b][:, 0].double() - negative[b]).abs().max() > 1e-3 for b in layers)
    t = pipe.transformer
    assert "encode_prompt" not in vars(pipe) and not t._forward_pre_hooks and not t._forward_hooks
    assert all(type(b.attention.processor).__name__ == "ZSingleStreamAttnProcessor" for b in t.layers)


def test_trace_words_under_the_chat_template(tiny_zimage):
    """Words are found in the prompt text as given (the pipeline rewrites a prompt list in place,
    inside its chat template), at their tokens after the template's opening; a word's heatmap is
    the mean of its tokens' traced maps over the blocks, through lava's aggregate."""
    pipe = tiny_zimage.pipe
    prompts = list(TRACE_PROMPTS)
    with lava.trace(pipe, layers=[1, 2]) as tr:
        pipe(prompts, num_inference_steps=2, guidance_scale=5.0, output_type="latent", **TRACE_SIZE)
    assert prompts[0].startswith("<|im_start|>user")  # what ZImagePipeline did to the list
    assert tr.prompts == tuple(TRACE_PROMPTS)
    tok = pipe.tokenizer
    before, after = ZIMAGE.template_parts(tok)
    for p, text in enumerate(TRACE_PROMPTS):
        ids = tok(before + text + after)["input_ids"]
        enc = tr.encoding(["a"], p)
        assert all(tok.decode([ids[i]]).strip() == "a" for i in enc.t5_spans["a"])
    enc = tr.encoding(["cat", "red sofa"], 0)
    ids = tok(before + TRACE_PROMPTS[0] + after)["input_ids"]
    assert tok.decode([ids[i] for i in enc.t5_spans["red sofa"]]).strip() == "red sofa"
    heat = tr.heatmaps(["cat", "red sofa"], indices=[0], normalize="none")
    maps = tr.maps()
    for c, word in enumerate(["cat", "red sofa"]):
        cols = [tr.columns.index(k) for k in enc.positions(word)]
        want = torch.stack([maps[b][0, 0][:, cols].mean(-1) for b in (1, 2)]).mean(0)
        torch.testing.assert_close(heat.scores[0, c].flatten(), want)
    assert tr.heatmaps(["a"]).scores.shape == (2, 1, 8, 10)
    with pytest.raises(lava.ClassNameError, match=r"'cat' is not a word of the prompt 'a dog.*indices=\[0\]"):
        tr.heatmaps(["cat"])
    with pytest.raises(
        lava.ClassNameError, match=r"'zebra' is not a word of the prompt .*: a, photo, of, cat"
    ):
        tr.heatmaps(["zebra"], indices=[0])
    seg = tr.segment(["cat", "sofa"], indices=[0])
    assert seg.labels[0].shape == (32, 40)


def test_trace_words_up_front(tiny_zimage):
    pipe = tiny_zimage.pipe
    with lava.trace(pipe, layers=[2]) as every:
        _generate(pipe, TRACE_PROMPTS[0], guidance_scale=0.0)
    with lava.trace(pipe, layers=[2], words=["cat", "sofa"]) as some:
        _generate(pipe, TRACE_PROMPTS[0], guidance_scale=0.0)
    assert len(some.columns) == 2 < len(every.columns) == every.text_len
    idx = [every.columns.index(k) for k in some.columns]
    torch.testing.assert_close(some.maps()[2], every.maps()[2][..., idx])
    # a word not in the prompt fails as soon as the pipeline has encoded it, and nothing stays
    with pytest.raises(lava.ClassNameError, match="'zebra' is not a word"), lava.trace(pipe, words=["zebra"]):
        _generate(pipe, TRACE_PROMPTS[0], guidance_scale=0.0)
    assert "encode_prompt" not in vars(pipe)
    assert not pipe.transformer._forward_pre_hooks and not pipe.transformer._forward_hooks


def test_concept_source_refuses_z_image(tiny_zimage, inputs):
    noisy, prompt = inputs
    with pytest.raises(LavaError, match="SD3 family only"):
        lava.capture(tiny_zimage, noisy, prompt, source="concept")

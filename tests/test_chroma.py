"""Chroma through its family adapter: captures equal the softmax of the q/k (after RoPE) and the
padding mask the unmodified model attends with, the model untouched, early exit, T5-only prompts
with their padding mask, loading, planning, the CLI and lava.trace over a stock ChromaPipeline.

The reference q, k and mask are recorded from the model itself: ``scaled_dot_product_attention``
is wrapped (a plain hook, nothing of lava) during a forward pass without any capture.
"""

from __future__ import annotations

import pytest
import torch
from conftest import blocks_run
from eval_fixtures import shapes_folder

import lava
from lava.backends.chroma import CHROMA
from lava.backends.families import family_of
from lava.errors import LavaError, ModelError
from lava.stages.capture import capturing, run_until_captured, transformer_inputs
from lava.types import CapturePlan

CLASSES = ["cat", "potted plant", "hydrant"]


@pytest.fixture(scope="module")
def tiny_chroma():
    return lava.load_backend("tiny-chroma")


@pytest.fixture
def inputs(tiny_chroma, image):
    return lava.noise(tiny_chroma, image, timestep=400, seed=3), lava.encode_prompt(tiny_chroma, CLASSES)


def _output(backend, kwargs):
    return backend.transformer(**kwargs, return_dict=False)[0]


def _pipeline_mask_inputs(backend, noisy, prompt):
    """Transformer inputs with the mask as diffusers' ChromaPipeline passes it: the text mask in the
    text encoder's float dtype, extended over the image tokens by ``_prepare_attention_mask``."""
    kwargs = transformer_inputs(backend, noisy, prompt)
    _, _, float_mask, *_ = backend.pipe.encode_prompt(
        prompt=list(prompt.texts), do_classifier_free_guidance=False, max_sequence_length=prompt.text_len
    )
    n_img = kwargs["hidden_states"].shape[1]
    kwargs["attention_mask"] = backend.pipe._prepare_attention_mask(
        float_mask.shape[0], n_img, float_mask.dtype, attention_mask=float_mask
    )
    assert kwargs["attention_mask"].is_floating_point()  # what the pipeline hands the transformer
    return kwargs


def _record_attention(backend, monkeypatch, call):
    """``(output, [(q, k, mask)] per block)``: every attention call of one transformer forward,
    with the q, k ``[B, H, N, D]`` and mask the model gave SDPA."""
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording(*args, **kwargs):
        q, k = (args[i] if len(args) > i else kwargs[n] for i, n in enumerate(("query", "key")))
        seen.append((q.detach().clone(), k.detach().clone(), kwargs.get("attn_mask")))
        return sdpa(*args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
        out = call()
    return out, seen


def _probs(q, k, mask):
    """The model's attention probabilities ``[B, H, N, N]`` in float64 (bool mask: keep/drop;
    float mask: added to the scores, as SDPA reads them)."""
    scores = q.double() @ k.double().transpose(-1, -2) * q.shape[-1] ** -0.5
    if mask is not None:
        scores = (
            scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.double()
        )
    return scores.softmax(-1)


def _reference(q, k, mask, text_len, cols, direction, softmax):
    """The slice lava defines, from the explicit probabilities: ``[B, H, N_img, K]``."""
    img, txt = slice(text_len, None), slice(0, text_len)
    if softmax == "joint":
        probs = _probs(q, k, mask)
        if direction == "image_to_text":
            return probs[:, :, img][..., cols]
        return probs[:, :, cols][..., img].transpose(-1, -2)
    if direction == "image_to_text":  # softmax over the text keys only
        part = None if mask is None else mask[..., img, txt]
        return _probs(q[:, :, img], k[:, :, txt], part)[..., cols]
    part = None if mask is None else mask[..., cols, img]
    return _probs(q[:, :, cols], k[:, :, img], part).transpose(-1, -2)


# ---- the adapter -----------------------------------------------------------------------------------


def test_blocks_are_numbered_double_then_single(tiny_chroma):
    assert family_of(tiny_chroma.transformer) is CHROMA
    assert type(tiny_chroma.pipe).__name__ == "ChromaPipeline"
    assert tiny_chroma.block_kinds == ["double", "double", "single", "single"]
    assert tiny_chroma.blocks[2] is tiny_chroma.transformer.single_transformer_blocks[0]
    assert tiny_chroma.joint_blocks == (0, 1, 2, 3)
    assert tiny_chroma.clip_len == 0 and tiny_chroma.patch_size == 2 and tiny_chroma.guidance is None
    assert tiny_chroma.text_encoders == CHROMA.text_summary(tiny_chroma)
    assert "double-stream 0-1, single-stream 2-3" in tiny_chroma.describe()
    assert "CLIP+T5" not in tiny_chroma.describe()


@pytest.mark.parametrize("mask", ["lava", "pipeline"])
@pytest.mark.parametrize("impl", ["torch", "naive", "triton"])
def test_outputs_unchanged_by_capture(tiny_chroma, inputs, impl, mask):
    from lava.kernels import available_impls

    if impl not in available_impls("cpu"):
        pytest.skip(f"{impl} is not available here")
    noisy, prompt = inputs
    if mask == "lava":
        kwargs = transformer_inputs(tiny_chroma, noisy, prompt)
        assert kwargs["attention_mask"].dtype == torch.bool
    else:
        kwargs = _pipeline_mask_inputs(tiny_chroma, noisy, prompt)
    plain = _output(tiny_chroma, kwargs)
    plan = CapturePlan(layers=(0, 1, 2, 3), columns=prompt.columns(), impl=impl, early_exit=False)
    with capturing(tiny_chroma.transformer, plan) as store:
        captured = run_until_captured(tiny_chroma.transformer, **kwargs)
    assert set(store) == {0, 1, 2, 3}
    if impl == "torch":
        # The same q/k/v ops as FluxAttnProcessor and the same fused CPU kernel with the same mask:
        # bitwise the model's own output.
        assert torch.equal(captured, plain)
    else:  # a masked call runs the torch path for triton too; naive is the explicit softmax
        torch.testing.assert_close(captured, plain, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mask", ["lava", "pipeline"])
@pytest.mark.parametrize("direction", ["image_to_text", "text_to_image"])
@pytest.mark.parametrize("softmax", ["joint", "cross"])
def test_slices_equal_the_models_own_attention(tiny_chroma, inputs, monkeypatch, direction, softmax, mask):
    """Per head (heads="none"), in double- and single-stream blocks: the capture equals the softmax
    of the q and k the model attended with (after RoPE) under the mask it attended with."""
    noisy, prompt = inputs
    kwargs = (
        transformer_inputs(tiny_chroma, noisy, prompt)
        if mask == "lava"
        else _pipeline_mask_inputs(tiny_chroma, noisy, prompt)
    )
    _, seen = _record_attention(tiny_chroma, monkeypatch, lambda: _output(tiny_chroma, kwargs))
    assert len(seen) == tiny_chroma.num_blocks
    layers = (0, 1, 2, 3)
    plan = CapturePlan(
        layers=layers,
        columns=prompt.columns(),
        direction=direction,
        softmax=softmax,
        heads="none",
        early_exit=False,
    )
    with capturing(tiny_chroma.transformer, plan) as store:
        run_until_captured(tiny_chroma.transformer, **kwargs)
    t, cols = prompt.text_len, list(prompt.columns())
    for i in layers:
        q, k, m = seen[i]
        assert m is not None and m.shape[-1] == q.shape[2] and m.dtype == kwargs["attention_mask"].dtype
        want = _reference(q, k, m, t, cols, direction, softmax)
        got = store[i]
        assert got.shape == (1, 2, noisy.grid[0] * noisy.grid[1], len(cols))
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=0)


def test_recorded_qk_are_after_rope(tiny_chroma, inputs, monkeypatch):
    """The q/k recorded above are the rotated ones: they equal a float64 recomputation from the
    block's weights and FLUX.1's RoPE written from its definition (tests/test_flux.py)."""
    from test_flux import _reference_qk

    noisy, prompt = inputs
    kwargs = transformer_inputs(tiny_chroma, noisy, prompt)
    grabbed = {}

    def grab(index):
        def hook(module, args, kw):
            grabbed[index] = (kw["hidden_states"], kw.get("encoder_hidden_states"))

        return hook

    handles = [
        tiny_chroma.blocks[i].attn.register_forward_pre_hook(grab(i), with_kwargs=True) for i in (0, 3)
    ]
    try:
        _, seen = _record_attention(tiny_chroma, monkeypatch, lambda: _output(tiny_chroma, kwargs))
    finally:
        for h in handles:
            h.remove()
    t = prompt.text_len
    ids = torch.cat([kwargs["txt_ids"], kwargs["img_ids"]]).long()
    axes = tuple(tiny_chroma.transformer.config.axes_dims_rope)
    for i in (0, 3):
        q, k = _reference_qk(tiny_chroma.blocks[i].attn, *grabbed[i], t, ids, axes)
        torch.testing.assert_close(seen[i][0].double(), q, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(seen[i][1].double(), k, atol=1e-5, rtol=1e-5)


def test_masked_text_never_gets_probability(tiny_chroma, inputs):
    noisy, prompt = inputs
    mask = prompt.text_mask[0]
    kept = mask.nonzero().flatten().tolist()
    assert len(kept) < prompt.text_len  # padding to the window, most of it masked
    every = tuple(range(prompt.text_len))
    for softmax in ("joint", "cross"):
        sl = lava.capture(
            tiny_chroma, noisy, prompt, layers=[0, 1, 2, 3], columns=every, heads="none", softmax=softmax
        )
        for maps in sl.maps.values():
            assert torch.all(maps[..., ~mask] == 0)
            assert torch.all(maps[..., mask] > 0)
            if softmax == "cross":  # the kept text keys hold all of it
                torch.testing.assert_close(maps.sum(-1), torch.ones_like(maps.sum(-1)))
    # With the float mask diffusers' pipeline passes, SDPA adds it instead: the padding takes some
    # probability, and a capture then reads what that model call computed (the test above).
    plan = CapturePlan(layers=(0,), columns=every, heads="none", early_exit=True)
    with capturing(tiny_chroma.transformer, plan) as store:
        run_until_captured(tiny_chroma.transformer, **_pipeline_mask_inputs(tiny_chroma, noisy, prompt))
    assert store[0][..., ~mask].min() > 0


@pytest.mark.parametrize("impl", ["naive", "torch"])
def test_a_query_with_every_key_masked_attends_to_nothing(impl):
    """Chroma's N×N mask leaves each padded text query no key at all: SDPA gives that row zeros, and
    so do lava's kernels (the naive reference once gave NaN there, which spread through the model)."""
    from lava.kernels import SliceSpec, attention_with_slice

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 9, 8, generator=g) for _ in range(3))
    keep = torch.tensor([[1, 1, 0, 0, 1, 1, 1, 1, 1], [1, 0, 0, 0, 1, 1, 1, 1, 1]], dtype=torch.bool)
    mask = keep[:, None, None, :] & keep[:, None, :, None]  # as ChromaTransformerBlock builds it
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    spec = SliceSpec(text_start=0, text_len=4, columns=(0, 1, 2), heads="none")
    out, sl = attention_with_slice(q, k, v, spec, impl=impl, attn_mask=mask)
    assert torch.all(out[0, :, 2:4] == 0) and torch.all(out[1, :, 1:4] == 0)
    torch.testing.assert_close(out, want, atol=1e-6, rtol=1e-5)
    assert torch.all(sl[0, ..., 2] == 0) and torch.all(sl[1, ..., 1:] == 0) and not sl.isnan().any()


def test_early_exit_stops_after_deepest_captured_block(tiny_chroma, image):
    noisy = lava.noise(tiny_chroma, image)
    prompt = lava.encode_prompt(tiny_chroma, CLASSES)
    with blocks_run(tiny_chroma.blocks, tiny_chroma.transformer.norm_out) as ran:
        lava.capture(tiny_chroma, noisy, prompt, layers=[1])
        assert ran == [0, 1]
        ran.clear()
        slices = lava.capture(tiny_chroma, noisy, prompt, layers=[0, 2])
        assert ran == [0, 1, 2]
        ran.clear()
        lava.capture(tiny_chroma, noisy, prompt, layers=[2], early_exit=False)
        assert ran == [0, 1, 2, 3, "norm_out"]
    assert list(slices.maps) == [0, 2]


def test_processors_and_hooks_restored(tiny_chroma):
    transformer = tiny_chroma.transformer
    before = [b.attn.processor for b in tiny_chroma.blocks]
    with pytest.raises(RuntimeError, match="boom"), capturing(transformer, CapturePlan(layers=(1, 3))):
        assert transformer.context_embedder._forward_pre_hooks  # single-stream block 3 reads T there
        raise RuntimeError("boom")
    assert [b.attn.processor for b in tiny_chroma.blocks] == before
    assert not transformer.context_embedder._forward_pre_hooks
    assert all(not b._forward_hooks and not b._forward_pre_hooks for b in tiny_chroma.blocks)


# ---- text: T5 only, padded and masked as the pipeline does ----------------------------------------


def test_prompt_is_the_pipelines_own_encoding(tiny_chroma):
    prompt = lava.encode_prompt(tiny_chroma, CLASSES)
    embeds, _, mask, neg, _, _ = tiny_chroma.pipe.encode_prompt(
        prompt=list(prompt.texts), do_classifier_free_guidance=False, max_sequence_length=128
    )
    assert neg is None and prompt.text_len == 128 and prompt.clip_len == 0
    # lava.encode_prompt calls this same encode_prompt on the same texts in one batch: bitwise equal
    assert torch.equal(prompt.embeds, embeds) and torch.equal(prompt.text_mask, mask > 0)
    assert prompt.pooled.shape == (1, 0)
    ids = tiny_chroma.t5_tokenizer(prompt.texts[0])["input_ids"]  # the tokens and the end token
    assert prompt.text_mask[0].tolist() == [True] * (len(ids) + 1) + [False] * (128 - len(ids) - 1)


def test_class_spans_decode_to_the_class_names(tiny_chroma):
    tok = tiny_chroma.t5_tokenizer
    prompt = lava.encode_prompt(tiny_chroma, [*CLASSES, "traffic light", "zebra crossing"])
    ids = tok(prompt.texts[0], padding="max_length", max_length=prompt.text_len)["input_ids"]
    for name in prompt.classes:
        span = prompt.t5_spans[name]
        assert span == tuple(range(span[0], span[-1] + 1))  # contiguous
        assert tok.decode([ids[p] for p in span]) == name
        assert prompt.text_mask[0, list(span)].all()  # a class is never in the masked padding
        assert prompt.clip_spans[name] == ()
    assert len(prompt.t5_spans["hydrant"]) > 1  # spelled out, not in the toy vocabulary


def test_long_vocabulary_splits_within_the_window(tiny_chroma, image):
    names = [f"{w} thing" for w in "red green blue yellow black white orange purple".split()]
    short = lava.load_backend("tiny-chroma", max_sequence_length=24)
    prompt = lava.encode_prompt(short, [*names, "zyxwvut qrstuv", "mnopqr stuvw"])
    assert prompt.num_prompts >= 3
    for name in prompt.classes:
        row = prompt.row(name)
        assert max(prompt.t5_spans[name]) < short.family.sequence_window(short) == 23
        assert prompt.text_mask[row, list(prompt.t5_spans[name])].all()
    # each row has its own padding mask: the rows of one batched forward differ in length
    assert len({int(m.sum()) for m in prompt.text_mask}) > 1
    noisy = lava.noise(short, image)
    together = lava.capture(short, noisy, prompt, layers=[1, 2])
    apart = lava.capture(short, noisy, prompt, layers=[1, 2], prompt_batch=1)
    for layer in (1, 2):
        torch.testing.assert_close(together.maps[layer], apart.maps[layer], atol=1e-6, rtol=1e-5)
    seg = lava.segment(image, prompt.classes, backend=short, max_classes_per_prompt=4)
    assert seg.labels[0].shape == (image.height, image.width) and len(seg.classes) == len(prompt.classes)


def test_packing_timestep_and_mask_match_chroma_pipeline(tiny_chroma, image):
    from diffusers import ChromaPipeline

    noisy = lava.noise(tiny_chroma, image, seed=1)
    b, c, h, w = noisy.latents.shape
    prompt = lava.encode_prompt(tiny_chroma, ["cat"])
    inp = transformer_inputs(tiny_chroma, noisy, prompt)
    assert torch.equal(inp["hidden_states"], ChromaPipeline._pack_latents(noisy.latents, b, c, h, w))
    assert torch.equal(
        inp["img_ids"], ChromaPipeline._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", torch.float32)
    )
    assert torch.equal(inp["txt_ids"], torch.zeros(128, 3))
    assert inp["timestep"].item() == pytest.approx(noisy.timestep / 1000)
    assert "pooled_projections" not in inp and "guidance" not in inp
    piped = _pipeline_mask_inputs(tiny_chroma, noisy, prompt)["attention_mask"]
    assert torch.equal(inp["attention_mask"], piped > 0)  # the pipeline's mask, as keep/drop
    assert torch.equal(CHROMA.output_latents(inp["hidden_states"], noisy.grid), noisy.latents)


# ---- loading, registry, planning -------------------------------------------------------------------


def test_registry_and_from_pipeline(tiny_chroma):
    from lava.backends import REGISTRY, list_backends
    from lava.backends.tiny_chroma import build_tiny_chroma_pipeline

    assert {"chroma", "chroma-base", "tiny-chroma"} <= set(REGISTRY)
    rows = {name: (what, d) for name, what, d in list_backends()}
    assert rows["chroma"][0].startswith("lodestones/Chroma1-HD")
    assert rows["chroma-base"][0].startswith("lodestones/Chroma1-Base")
    assert rows["chroma"][1].source.startswith("unmeasured") and rows["chroma"][1].layers == (12, 17)
    wrapped = lava.from_pipeline(build_tiny_chroma_pipeline())
    assert (wrapped.variant, wrapped.family, wrapped.max_sequence_length) == ("chroma", CHROMA, 512)
    assert wrapped.guidance is None
    with pytest.raises(ModelError, match="no guidance embedding"):
        lava.from_pipeline(wrapped.pipe, guidance=3.5)
    with pytest.raises(ModelError, match="T5 cannot be dropped"):
        lava.load_backend("tiny-chroma", drop_t5=True)


def test_folder_loads_as_chroma(tiny_chroma, tmp_path, image):
    folder = tmp_path / "chroma-tiny"
    tiny_chroma.pipe.save_pretrained(folder)
    loaded = lava.load_backend(str(folder), device="cpu", dtype="float32", max_sequence_length=128)
    assert loaded.family is CHROMA and type(loaded.pipe).__name__ == "ChromaPipeline"
    noisy = lava.noise(tiny_chroma, image)
    a = lava.capture(tiny_chroma, noisy, lava.encode_prompt(tiny_chroma, CLASSES), layers=[1, 3])
    b = lava.capture(loaded, noisy, lava.encode_prompt(loaded, CLASSES), layers=[1, 3])
    for layer in (1, 3):
        assert torch.equal(a.maps[layer], b.maps[layer])
    with pytest.raises(ModelError, match="Chroma model"):
        lava.load_backend(str(folder), drop_t5=True)


def test_planner_counts_chroma_at_full_size():
    from lava.backends.chroma import full_size_modules
    from lava.planner import estimate_memory, plan_memory, spec_from_pipeline

    spec = spec_from_pipeline(full_size_modules(), 512)
    assert 8.8e9 < spec.params["transformer"] < 9.0e9  # Chroma1: 8.9 B
    assert 4.7e9 < spec.params["text_encoder"] < 4.8e9  # T5-XXL's encoder
    assert (spec.clip_len, spec.t5_len, spec.grid_unit, spec.has_t5) == (0, 512, 16, False)
    kw = dict(dtype=torch.bfloat16, device="cuda", captured_layers=2)
    on_gpu = estimate_memory(spec, (1024, 1024), **kw)
    offloaded = estimate_memory(spec, (1024, 1024), offload_text_encoders=True, **kw)
    assert on_gpu.tokens[:2] == (4096, 512)
    t5_bf16 = spec.params["text_encoder"] * 2
    assert on_gpu.total - offloaded.total >= t5_bf16 - 2**20  # the encoder leaves the GPU
    assert offloaded.placement["text_encoder"] == ("cpu", "float32")
    assert plan_memory(spec, (1024, 1024), 20 * 2**30, **kw).offload_text_encoders
    fp32 = {**kw, "dtype": torch.float32}  # the encoder offloaded is not enough in fp32: bf16 is proposed
    with pytest.raises(LavaError, match="Cheapest setting that fits: --dtype bfloat16"):
        plan_memory(spec, (1024, 1024), 20 * 2**30, **fp32)
    with pytest.raises(LavaError, match="nothing lava can change fits"):  # the transformer alone is 16.6 GiB
        plan_memory(spec, (1024, 1024), 12 * 2**30, **kw)


def test_dry_run_plans_chroma_not_sd3(tmp_path, capsys):
    from PIL import Image

    from lava.cli import main

    path = tmp_path / "x.png"
    Image.new("RGB", (64, 64)).save(path)
    args = ["segment", str(path), "--classes", "a,b", "--dry-run"]
    assert main([*args, "--model", "tiny-chroma"]) == 0
    out = capsys.readouterr().out
    assert "text_encoder " in out and "text_encoder_3" not in out and "+ 128 text tokens" in out
    assert (
        main([*args, "--model", "chroma", "--resolution", "1024", "--device", "cuda", "--dtype", "bf16"]) == 0
    )
    out = capsys.readouterr().out
    assert "4096 image + 512 text tokens" in out and "text_encoder_2" not in out


def test_segment_sweep_and_models_commands(tmp_path, capsys):
    import json

    from conftest import scene

    from lava.cli import main

    img = tmp_path / "img.png"
    scene().save(img)
    out = tmp_path / "seg"
    assert (
        main(["segment", str(img), "--model", "tiny-chroma", "--classes", "cat,dog", "--out", str(out)]) == 0
    )
    assert (out / "img_labels.png").exists()
    root = tmp_path / "shapes"
    root.mkdir()
    shapes_folder(root)
    sweep = tmp_path / "sweep"
    args = [
        "sweep",
        "--dataset",
        "folder",
        "--root",
        str(root),
        "--model",
        "tiny-chroma",
        "--out",
        str(sweep),
    ]
    assert main([*args, "--timesteps", "300,700", "--layers", "0,3"]) == 0
    cells = json.loads((sweep / "sweep.json").read_text())["cells"]
    assert {tuple(c["layers"]) for c in cells} >= {(0,), (3,)}
    capsys.readouterr()
    assert main(["models"]) == 0
    listing = capsys.readouterr().out
    assert "tiny-chroma" in listing and "lodestones/Chroma1-HD" in listing and "chroma-base" in listing


def test_concept_source_refuses_chroma(tiny_chroma, inputs):
    noisy, prompt = inputs
    with pytest.raises(LavaError, match="SD3 family only"):
        lava.capture(tiny_chroma, noisy, prompt, source="concept")


def test_presence_and_propagation_run(tiny_chroma, inputs, image):
    from lava.stages.presence import denoising_presence

    noisy, prompt = inputs
    presence = denoising_presence(tiny_chroma, noisy, prompt)
    assert presence.shape == (1, len(CLASSES)) and float(presence.max()) == pytest.approx(1.0)
    seg = lava.segment(image, CLASSES, backend=tiny_chroma, refine="propagate,pamr")
    assert seg.labels[0].shape == (image.height, image.width)


# ---- lava.trace over a stock ChromaPipeline -------------------------------------------------------


def test_trace_images_unchanged_and_maps_equal_the_models_attention(tiny_chroma, monkeypatch):
    pipe = tiny_chroma.pipe
    prompts = ["a photo of a cat on a red sofa", "a dog in the grass"]

    def generate():
        return pipe(
            prompts,
            height=32,
            width=48,
            num_inference_steps=2,
            guidance_scale=4.0,  # CFG: a second transformer call per step, with the negative prompt
            max_sequence_length=32,
            generator=torch.Generator().manual_seed(0),
            output_type="pt",
        ).images

    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    inside = [False]  # the T5 encoder calls SDPA too: only the transformer's calls are recorded

    def recording(*args, **kwargs):
        if inside[0]:
            calls.append((kwargs["query"].clone(), kwargs["key"].clone(), kwargs["attn_mask"].clone()))
        return sdpa(*args, **kwargs)

    transformer = tiny_chroma.transformer
    hooks = [
        transformer.register_forward_pre_hook(lambda *a: inside.__setitem__(0, True)),
        transformer.register_forward_hook(lambda *a: inside.__setitem__(0, False)),
    ]
    try:
        with monkeypatch.context() as m:
            m.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
            plain = generate()
    finally:
        for h in hooks:
            h.remove()
    layers = (1, 2, 3)  # double-stream 1, single-stream 2 and 3
    with lava.trace(tiny_chroma, layers=layers) as tr:
        traced = generate()
    assert torch.equal(plain, traced)
    assert calls[0][2].is_floating_point()  # the stock pipeline's float mask: traced as it is
    n = tiny_chroma.num_blocks
    assert len(calls) == 2 * 2 * n and tr.steps == [0, 1] and tr.text_len == 32
    maps = tr.maps()
    for block in layers:
        per_step = []
        for step in range(2):  # the conditional call comes first in each step
            q, k, mask = calls[step * 2 * n + block]
            p = _probs(q, k, mask)[:, :, 32:, :32].mean(1)  # [text; image], heads averaged
            per_step.append(p[..., list(tr.columns)])
        want = torch.stack(per_step).mean(0)
        torch.testing.assert_close(maps[block][:, 0].double(), want, atol=1e-5, rtol=0)
    heat = tr.heatmaps(["cat", "sofa"], indices=[0])
    assert heat.scores.shape[:2] == (1, 2)

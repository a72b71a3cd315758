"""FLUX.2 through its family adapter, on ``tiny-flux2`` (a real ``Flux2KleinPipeline`` at toy size):
captures equal to the softmax of the q/k the unmodified model attends with, outputs unchanged,
early exit, class spans under the chat template, padding attended as the model does, latents
and ids as the pipeline makes them, the CLI, several prompt rows, loading and tracing."""

from __future__ import annotations

import pytest
import torch
from conftest import blocks_run, model_output

import lava
from lava.backends.families import family_of
from lava.backends.flux2 import FLUX2
from lava.errors import LavaError, ModelError
from lava.stages.capture import capturing, run_until_captured, transformer_inputs
from lava.types import CapturePlan

CLASSES = ["cat", "potted plant", "hydrant"]


@pytest.fixture(scope="module")
def tiny_flux2():
    return lava.load_backend("tiny-flux2")


@pytest.fixture
def inputs(tiny_flux2, image):
    return lava.noise(tiny_flux2, image, timestep=400, seed=3), lava.encode_prompt(tiny_flux2, CLASSES)


def _record_attention(monkeypatch):
    """Record the (query, key) ``[B, N, H, D]`` of every attention call the model itself makes:
    the tensors diffusers' FLUX.2 processors hand to their attention kernel."""
    import diffusers.models.transformers.transformer_flux2 as module

    seen = []
    original = module.dispatch_attention_fn

    def recording(query, key, value, *args, **kwargs):
        seen.append((query.detach().clone(), key.detach().clone(), kwargs.get("attn_mask")))
        return original(query, key, value, *args, **kwargs)

    monkeypatch.setattr(module, "dispatch_attention_fn", recording)
    return seen


def test_family_and_block_numbering(tiny_flux2):
    assert family_of(tiny_flux2.transformer) is FLUX2
    assert tiny_flux2.family is FLUX2
    assert tiny_flux2.block_kinds == ["double", "double", "single", "single"]
    assert tiny_flux2.blocks[2] is tiny_flux2.transformer.single_transformer_blocks[0]
    assert tiny_flux2.joint_blocks == (0, 1, 2, 3)
    assert tiny_flux2.clip_len == 0 and tiny_flux2.patch_size == 2 and tiny_flux2.grid_unit == 4
    text = tiny_flux2.describe()
    assert "double-stream 0-1, single-stream 2-3" in text and "Qwen3ForCausalLM" in text


@pytest.mark.parametrize("impl", ["torch", "naive"])
def test_outputs_unchanged_by_capture(tiny_flux2, inputs, impl):
    noisy, prompt = inputs
    plain = model_output(tiny_flux2, noisy, prompt)
    before = [b.attn.processor for b in tiny_flux2.blocks]
    plan = CapturePlan(layers=(0, 1, 2, 3), columns=prompt.columns(), impl=impl, early_exit=False)
    with capturing(tiny_flux2.transformer, plan) as store:
        captured = run_until_captured(tiny_flux2.transformer, **transformer_inputs(tiny_flux2, noisy, prompt))
    assert set(store) == {0, 1, 2, 3}
    assert [b.attn.processor for b in tiny_flux2.blocks] == before
    if impl == "torch":
        # The same projections, norms, RoPE and fused CPU SDPA as Flux2AttnProcessor and
        # Flux2ParallelSelfAttnProcessor, in the same layout: bitwise the model's own output.
        assert torch.equal(captured, plain)
    else:
        torch.testing.assert_close(captured, plain, atol=1e-5, rtol=1e-5)


def test_per_head_map_equals_softmax_of_the_models_own_qk(tiny_flux2, inputs, monkeypatch):
    """image→text, joint softmax, every head: lava's capture against the softmax, in float64, of the
    q and k (after norms and RoPE) that the unmodified model passes to its attention kernel, over
    all its keys (padding included: the model has no mask)."""
    noisy, prompt = inputs
    seen = _record_attention(monkeypatch)
    model_output(tiny_flux2, noisy, prompt)  # the unmodified model, recorded
    assert len(seen) == 4 and all(mask is None for *_, mask in seen)
    t = prompt.text_len
    pads = list(range(t - 5, t))  # padded positions at the end of the 128-token text
    cols = list(prompt.columns()) + pads
    slices = lava.capture(tiny_flux2, noisy, prompt, layers=(0, 1, 2, 3), heads="none", columns=cols)
    for i, (q, k, _) in enumerate(seen):
        q, k = q.double().transpose(1, 2), k.double().transpose(1, 2)  # [B, H, N, D]
        probs = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
        want = probs[:, :, t:][..., cols]
        got = slices.maps[i]
        assert got.shape == (1, 2, noisy.grid[0] * noisy.grid[1], len(cols))
        assert (got.double() - want).abs().max() <= 1e-5
        assert float(want[..., -len(pads) :].min()) > 0  # padded tokens are attended, as in the model


def test_text_tokens_are_rotated(tiny_flux2, inputs, monkeypatch):
    """FLUX.2 gives text tokens the position ids (0, 0, 0, l): their keys are rotated (unlike
    FLUX.1's all-zero text ids), so a capture that skipped RoPE on text would differ."""
    noisy, prompt = inputs
    seen = _record_attention(monkeypatch)
    inp = transformer_inputs(tiny_flux2, noisy, prompt)
    assert torch.equal(inp["txt_ids"][:, 3], torch.arange(prompt.text_len))
    tiny_flux2.transformer(**inp)
    attn = tiny_flux2.blocks[0].attn
    k = seen[0][1]  # [B, N, H, D] after norm and RoPE
    unrotated = attn.norm_added_k(attn.add_k_proj(_context(tiny_flux2, inp)).unflatten(-1, (2, -1)))
    assert torch.allclose(k[:, 0], unrotated[:, 0], atol=1e-6)  # position 0: identity rotation
    assert not torch.allclose(k[:, 5], unrotated[:, 5], atol=1e-3)


def _context(backend, inp):
    """The text stream the first double-stream block's attention sees (its normed, modulated input)."""
    tr = backend.transformer
    temb = tr.time_guidance_embed(inp["timestep"] * 1000, None)
    mod = tr.double_stream_modulation_txt(temb)
    (shift, scale, _), _ = type(tr.double_stream_modulation_txt).split(mod, 2)
    ctx = tr.context_embedder(inp["encoder_hidden_states"])
    return (1 + scale) * tr.transformer_blocks[0].norm1_context(ctx) + shift


def test_early_exit_stops_after_deepest_captured_block(tiny_flux2, inputs):
    noisy, prompt = inputs
    with blocks_run(tiny_flux2.blocks, tiny_flux2.transformer.norm_out, "out") as ran:
        lava.capture(tiny_flux2, noisy, prompt, layers=[1])
        assert ran == [0, 1]
        ran.clear()
        slices = lava.capture(tiny_flux2, noisy, prompt, layers=[0, 2])
        assert ran == [0, 1, 2]
        ran.clear()
        lava.capture(tiny_flux2, noisy, prompt, layers=[3], early_exit=False)
        assert ran == [0, 1, 2, 3, "out"]
    assert list(slices.maps) == [0, 2]


def test_hooks_and_processors_restored_on_error(tiny_flux2):
    before = [b.attn.processor for b in tiny_flux2.blocks]
    with (
        pytest.raises(RuntimeError, match="boom"),
        capturing(tiny_flux2.transformer, CapturePlan(layers=(3,))),
    ):
        # a single-stream capture reads the text length from the first double-stream block
        assert tiny_flux2.blocks[0]._forward_pre_hooks
        raise RuntimeError("boom")
    assert [b.attn.processor for b in tiny_flux2.blocks] == before
    assert all(not b._forward_hooks and not b._forward_pre_hooks for b in tiny_flux2.blocks)


def test_kv_cache_calls_are_refused(tiny_flux2):
    from lava.backends.flux2 import Flux2Call

    call = Flux2Call(lambda *a: a, single_stream=True)
    assert call("attn", "h", "mask", "rope") == ("attn", "h", None, "mask", "rope")
    with pytest.raises(LavaError, match="KV-cached"):
        call("attn", "h", None, None, kv_cache_mode="extract")


def _own_ids(backend, text):
    """The token ids (and pad mask) of ``text`` as Flux2KleinPipeline tokenizes it."""
    tok = backend.pipe.tokenizer
    chat = tok.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    enc = tok(chat, padding="max_length", truncation=True, max_length=backend.max_sequence_length)
    return enc["input_ids"], enc["attention_mask"]


@pytest.mark.parametrize("classes", [CLASSES, ["user", "assistant", "cat"]])
def test_class_spans_are_exact_under_the_chat_template(tiny_flux2, classes):
    """Decoding the pipeline's own tokens at each span gives the class name back: the spans count
    the template's tokens before the prompt, and a class also spelled in the template ("user",
    "assistant") is found in the prompt, not in the template."""
    prompt = lava.encode_prompt(tiny_flux2, classes)
    ids, mask = _own_ids(tiny_flux2, prompt.texts[0])
    tok = tiny_flux2.pipe.tokenizer
    real = sum(mask)
    first = min(prompt.t5_spans[classes[0]])
    assert tok.decode(ids[:first]).endswith("<|im_start|>user\n")  # the template comes first
    for name in classes:
        span = prompt.t5_spans[name]
        assert span == tuple(range(span[0], span[-1] + 1))
        assert tok.decode([ids[p] for p in span]).strip() == name
        assert max(span) < real  # never a padded position
    assert prompt.clip_spans == dict.fromkeys(classes, ())
    assert prompt.text_mask is None and prompt.embeds.shape == (1, 128, 48) and prompt.pooled.shape == (1, 0)


def test_embeddings_are_the_pipelines_own(tiny_flux2):
    prompt = lava.encode_prompt(tiny_flux2, CLASSES)
    own, _ids = tiny_flux2.pipe.encode_prompt(prompt.texts[0], device="cpu", max_sequence_length=128)
    assert torch.equal(prompt.embeds, own)


def test_window_and_long_vocabulary_split(tiny_flux2, image):
    """The window is max_sequence_length less the template's closing tokens; a long class list is
    split into prompts whose classes all lie inside it, and one batched forward equals one per row."""
    window = FLUX2.sequence_window(tiny_flux2)
    tok = tiny_flux2.pipe.tokenizer
    closing = tok("<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")["input_ids"]
    assert window == 128 - len(closing)
    names = [f"{w} thing" for w in "red green blue yellow black white orange purple".split()]
    names += [f"xq{i}zz" for i in range(14)]
    prompt = lava.encode_prompt(tiny_flux2, names)
    assert prompt.num_prompts >= 2
    assert all(max(prompt.t5_spans[c]) < window for c in prompt.classes)
    for row, text in enumerate(prompt.texts):
        ids, _ = _own_ids(tiny_flux2, text)
        for name in (c for c in prompt.classes if prompt.rows[c] == row):
            assert tok.decode([ids[p] for p in prompt.t5_spans[name]]).strip() == name
    noisy = lava.noise(tiny_flux2, image)
    together = lava.capture(tiny_flux2, noisy, prompt, layers=[1, 2])
    apart = lava.capture(tiny_flux2, noisy, prompt, layers=[1, 2], prompt_batch=1)
    for layer in (1, 2):
        torch.testing.assert_close(together.maps[layer], apart.maps[layer], atol=1e-6, rtol=1e-5)
    seg = lava.segment(image, names, backend=tiny_flux2)
    assert seg.labels[0].shape == (image.height, image.width) and len(seg.classes) == len(names)


def test_latents_and_ids_are_the_pipelines(tiny_flux2, image):
    """lava's latents, patchified, are Flux2Pipeline._encode_vae_image's (batch-norm normalised);
    the packed tokens and the position ids are the pipeline's."""
    from diffusers.image_processor import VaeImageProcessor

    pipe = tiny_flux2.pipe
    noisy = lava.noise(tiny_flux2, image, seed=1)
    h, w = noisy.input_size
    pixels = VaeImageProcessor(vae_scale_factor=2).preprocess(image, height=h, width=w)
    own = pipe._encode_vae_image(pixels, generator=None)
    assert own.shape[1] == 16 and noisy.clean.shape[1] == 4
    torch.testing.assert_close(pipe._patchify_latents(noisy.clean), own, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(own, pipe._patchify_latents(pipe.vae.encode(pixels).latent_dist.mode()))
    prompt = lava.encode_prompt(tiny_flux2, ["cat"])
    inp = transformer_inputs(tiny_flux2, noisy, prompt)
    patched = pipe._patchify_latents(noisy.latents)
    assert torch.equal(inp["hidden_states"], pipe._pack_latents(patched))
    assert torch.equal(inp["img_ids"], pipe._prepare_latent_ids(patched)[0])
    assert torch.equal(inp["txt_ids"], pipe._prepare_text_ids(prompt.embeds)[0])
    assert inp["timestep"].item() == pytest.approx(noisy.timestep / 1000) and "guidance" not in inp
    assert torch.equal(FLUX2.output_latents(inp["hidden_states"], noisy.grid), noisy.latents)


def test_segment_runs_from_the_cli(tmp_path, capsys):
    from conftest import scene

    from lava.cli import main

    img = tmp_path / "img.png"
    scene().save(img)
    out = tmp_path / "seg"
    assert (
        main(["segment", str(img), "--model", "tiny-flux2", "--classes", "cat,dog", "--out", str(out)]) == 0
    )
    assert (out / "img_labels.png").exists()
    capsys.readouterr()
    assert main(["models"]) == 0
    listing = capsys.readouterr().out
    for name in ("tiny-flux2", "flux2-dev", "flux2-klein-4b", "flux2-klein-9b", "flux2-klein-base-9b"):
        assert name in listing
    assert "unmeasured" in listing and "8-55 single-stream" in listing


def test_registry_and_from_pipeline(tiny_flux2, tmp_path, image):
    from lava.backends import REGISTRY, list_backends
    from lava.backends.tiny_flux2 import build_tiny_flux2_pipeline

    assert {"flux2-dev", "flux2-klein-4b", "flux2-klein-9b", "tiny-flux2"} <= set(REGISTRY)
    rows = {name: (what, d) for name, what, d in list_backends()}
    assert rows["flux2-dev"][0].startswith("black-forest-labs/FLUX.2-dev")
    assert rows["flux2-dev"][1].layers == (6, 7) and rows["flux2-klein-4b"][1].layers == (3, 4)
    assert rows["flux2-klein-9b"][1].source.startswith("unmeasured")

    klein = lava.from_pipeline(tiny_flux2.pipe)
    assert (klein.family, klein.variant, klein.guidance, klein.max_sequence_length) == (
        FLUX2,
        "flux2-klein-4b",
        None,
        512,
    )
    dev = lava.from_pipeline(build_tiny_flux2_pipeline(guidance_embeds=True))
    assert (dev.variant, dev.guidance) == ("flux2-dev", 4.0)
    inp = transformer_inputs(dev, lava.noise(dev, image, resolution=32), lava.encode_prompt(dev, ["cat"]))
    assert inp["guidance"].item() == 4.0
    with pytest.raises(ModelError, match="no T5 to drop"):
        lava.load_backend("tiny-flux2", drop_t5=True)
    # a folder saved with save_pretrained loads through Flux2KleinPipeline, by its model_index.json
    folder = tmp_path / "klein"
    tiny_flux2.pipe.save_pretrained(folder)
    loaded = lava.load_backend(str(folder), device="cpu", dtype="float32")
    assert type(loaded.pipe).__name__ == "Flux2KleinPipeline" and loaded.family is FLUX2
    a = lava.encode_prompt(loaded, ["cat"])
    assert a.t5_spans == lava.encode_prompt(tiny_flux2, ["cat"]).t5_spans


def test_trace_over_the_klein_pipeline():
    """lava.trace around an ordinary Flux2KleinPipeline call: images bit-identical, every step traced,
    the words found in the chat-templated sequence; under true CFG (a base klein) only the
    conditional call is read."""
    from lava.backends.tiny_flux2 import build_tiny_flux2_pipeline

    pipe = build_tiny_flux2_pipeline()

    def run(**kw):
        return pipe(
            prompt="a cat on a red sofa",
            height=32,
            width=32,
            num_inference_steps=3,
            generator=torch.Generator().manual_seed(0),
            output_type="pt",
            **kw,
        ).images

    plain = run()
    with lava.trace(pipe, layers=[1, 2]) as tr:
        traced = run()
    assert torch.equal(plain, traced)
    assert tr.steps == [0, 1, 2] and tr.grid == (8, 8)
    enc = tr.encoding(["cat", "sofa"])
    ids, _ = _own_ids(lava.from_pipeline(pipe, move=False), "a cat on a red sofa")
    assert [pipe.tokenizer.decode([ids[p] for p in enc.t5_spans[w]]).strip() for w in ("cat", "sofa")] == [
        "cat",
        "sofa",
    ]
    assert tr.heatmaps(["cat", "sofa"]).scores.shape == (1, 2, 8, 8)
    pipe.register_to_config(is_distilled=False)  # base klein: a negative-prompt call per step
    with lava.trace(pipe, layers=[1]) as cfg:
        run(guidance_scale=4.0)
    assert cfg.steps == [0, 1, 2] and cfg._count == 3


def test_memory_planner_sizes_flux2_from_its_configs(tmp_path, capsys):
    """--dry-run plans FLUX.2 (not as SD3): transformer and LLM encoder counted at their real width
    from the released configs, 16 px per token, 512 text tokens and no CLIP part; --max-memory
    moves the encoder to the CPU when that is what fits."""
    from PIL import Image

    from lava.backends.flux2_sizes import planner_spec
    from lava.cli import main
    from lava.planner import plan_memory

    spec = planner_spec("flux2-klein-4b")
    assert 3.5e9 < spec.params["transformer"] < 4.5e9 and 3.5e9 < spec.params["text_encoder"] < 4.5e9
    assert (spec.grid_unit, spec.clip_len, spec.t5_len, spec.has_t5) == (16, 0, 512, False)
    on_gpu = dict(dtype=torch.bfloat16, device="cuda", captured_layers=2, text_tokens=512)
    plan = plan_memory(spec, (1024, 1024), 12 * 2**30, **on_gpu)
    assert plan.offload_text_encoders and plan.tokens[:2] == (4096, 512)
    with pytest.raises(LavaError, match="does not fit"):
        plan_memory(spec, (1024, 1024), 4 * 2**30, **on_gpu)
    path = tmp_path / "x.png"
    Image.new("RGB", (64, 64)).save(path)
    for model, tokens in (("flux2-dev", "4096 image + 512 text tokens"), ("tiny-flux2", "+ 128 text tokens")):
        args = ["segment", str(path), "--classes", "a,b", "--model", model, "--dry-run"]
        assert main([*args, "--device", "cuda", "--dtype", "bf16"]) == 0
        out = capsys.readouterr().out
        assert "text_encoder " in out and "text_encoder_3" not in out and tokens in out


def test_planner_reads_a_flux2_pipeline_with_its_geometry(tiny_flux2):
    from lava.planner import estimate_memory, spec_from_pipeline

    spec = spec_from_pipeline(tiny_flux2.pipe, tiny_flux2.max_sequence_length)
    assert (spec.grid_unit, spec.clip_len, spec.t5_len) == (4, 0, 128)
    plan = estimate_memory(tiny_flux2.pipe, (32, 32), dtype=torch.float32, text_tokens=128)
    assert plan.tokens[:2] == (64, 128)


def test_segment_with_propagation_and_kept_image_qk(tiny_flux2, inputs, image):
    """Propagation reads the image rows of the rotated q/k of double- and single-stream blocks."""
    noisy, prompt = inputs
    slices = lava.capture(tiny_flux2, noisy, prompt, layers=(1, 2), keep_image_qk=True)
    assert all(slices.image_qk[i][0].shape[-2] == noisy.grid[0] * noisy.grid[1] for i in (1, 2))
    seg = lava.segment(image, CLASSES, backend=tiny_flux2, refine="propagate,pamr")
    assert seg.labels[0].shape == (image.height, image.width)

"""Qwen-Image through its family adapter, on ``tiny-qwen-image``: captures equal to a recomputation
from the q/k the unmodified model attends with (after its multimodal RoPE, under its padding
mask), the model untouched, early exit, class spans exact under the chat template and its
34-token crop, padding that takes no probability, the CLI, several prompt rows, lava.trace,
loading from folders and pipelines, and the memory planner at Qwen-Image's real sizes."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import blocks_run, model_output

import lava
from lava.backends.families import family_of
from lava.backends.qwen import QWEN
from lava.errors import ClassNameError, LavaError, ModelError
from lava.stages.capture import capturing, run_until_captured, transformer_inputs
from lava.types import CapturePlan

CLASSES = ["cat", "potted plant", "hydrant"]


@pytest.fixture(scope="module")
def tiny_qwen():
    return lava.load_backend("tiny-qwen-image")


@pytest.fixture
def inputs(tiny_qwen, image):
    return lava.noise(tiny_qwen, image, timestep=400, seed=3), lava.encode_prompt(tiny_qwen, CLASSES)


def test_family_blocks_and_description(tiny_qwen):
    assert family_of(tiny_qwen.transformer) is QWEN
    assert tiny_qwen.num_blocks == 3 and tiny_qwen.block_kinds == ["double"] * 3
    assert tiny_qwen.joint_blocks == (0, 1, 2)
    assert tiny_qwen.clip_len == 0 and tiny_qwen.patch_size == 2 and tiny_qwen.vae_scale_factor == 2
    assert "Qwen2.5-VL only" in tiny_qwen.describe() and "34 tokens cropped" in tiny_qwen.text_encoders


@pytest.mark.parametrize("impl", ["torch", "naive"])
def test_outputs_unchanged_by_capture(tiny_qwen, inputs, impl):
    noisy, prompt = inputs
    assert prompt.text_mask is not None and not bool(prompt.text_mask.all())  # padded, masked
    plain = model_output(tiny_qwen, noisy, prompt)
    plan = CapturePlan(layers=(0, 1, 2), columns=prompt.columns(), impl=impl, early_exit=False)
    with capturing(tiny_qwen.transformer, plan) as store:
        captured = run_until_captured(tiny_qwen.transformer, **transformer_inputs(tiny_qwen, noisy, prompt))
    assert set(store) == {0, 1, 2}
    if impl == "torch":
        # The processor's own ops in its [B, N, H, D] layout, and the same fused SDPA call with
        # the same mask: bitwise the model's output.
        assert torch.equal(captured, plain)
    else:
        torch.testing.assert_close(captured, plain, atol=1e-5, rtol=1e-5)


def _record_model_attention(monkeypatch):
    """Record the joint q, k and mask that diffusers' own ``QwenDoubleStreamAttnProcessor2_0``
    hands to its attention function (``[B, N, H, D]``, after norms and RoPE)."""
    import diffusers.models.transformers.transformer_qwenimage as qi

    seen = []
    original = qi.dispatch_attention_fn

    def record(query, key, value, attn_mask=None, **kw):
        seen.append((query.detach().clone(), key.detach().clone(), attn_mask))
        return original(query, key, value, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(qi, "dispatch_attention_fn", record)
    return seen


@pytest.mark.parametrize("softmax", ["joint", "cross"])
def test_image_to_text_map_equals_the_models_own_qk(tiny_qwen, inputs, monkeypatch, softmax):
    """Per head, heads="none": the captured image→text probabilities equal a softmax recomputed
    from the q/k the unmodified model attended with, under its own mask, to 1e-5 in fp32."""
    noisy, prompt = inputs
    seen = _record_model_attention(monkeypatch)
    model_output(tiny_qwen, noisy, prompt)  # the model's own processors, nothing of lava's installed
    monkeypatch.undo()
    assert len(seen) == 3
    cols = list(range(prompt.text_len))  # every text key, padding included
    slices = lava.capture(
        tiny_qwen, noisy, prompt, layers=(0, 1, 2), heads="none", columns=cols, softmax=softmax
    )
    t = prompt.text_len
    for block, (q, k, mask) in enumerate(seen):
        q, k = q.transpose(1, 2).double(), k.transpose(1, 2).double()  # [B, H, N, D]
        scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
        scores = scores.masked_fill(~mask, float("-inf"))  # [B, 1, 1, N]: padded text keys out
        image_rows = scores[:, :, t:]
        want = torch.softmax(image_rows if softmax == "joint" else image_rows[..., :t], -1)[..., :t]
        got = slices.maps[block]
        assert got.shape == (1, 2, noisy.grid[0] * noisy.grid[1], t)
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=0)


def test_propagation_reads_the_image_rows_the_model_attends_with(tiny_qwen, inputs, image, monkeypatch):
    """Kept image q/k (for propagation) are the rows after the text, as the model's own processor
    rotated them; propagation and PAMR run; the concept source is refused by name."""
    noisy, prompt = inputs
    seen = _record_model_attention(monkeypatch)
    model_output(tiny_qwen, noisy, prompt)
    monkeypatch.undo()
    slices = lava.capture(tiny_qwen, noisy, prompt, layers=(1, 2), keep_image_qk=True)
    t = prompt.text_len
    for block in (1, 2):
        q, k, _ = seen[block]
        got_q, got_k = slices.image_qk[block]
        torch.testing.assert_close(got_q[:, 0], q.transpose(1, 2)[:, :, t:], atol=1e-6, rtol=0)
        torch.testing.assert_close(got_k[:, 0], k.transpose(1, 2)[:, :, t:], atol=1e-6, rtol=0)
    seg = lava.segment(image, CLASSES, backend=tiny_qwen, refine="propagate,pamr")
    assert seg.labels[0].shape == (image.height, image.width)
    with pytest.raises(LavaError, match="SD3 family only"):
        lava.capture(tiny_qwen, noisy, prompt, source="concept")


def _rope_reference(x: torch.Tensor, positions: torch.Tensor, axes=(4, 6, 6), theta=10000.0) -> torch.Tensor:
    """Rotary embedding from its definition, float64: channel pairs of each head turned by
    ``position[axis] · theta^(-2j/dim)`` per axis. x ``[B, H, N, D]``, positions ``[N, 3]``."""
    angles = [
        positions[:, a, None].double() * theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
        for a, d in enumerate(axes)
    ]
    turn = torch.polar(torch.ones(1, dtype=torch.float64), torch.cat(angles, -1))
    pairs = torch.view_as_complex(x.double().unflatten(-1, (-1, 2)).contiguous())
    return torch.view_as_real(pairs * turn).flatten(-2)


def test_rope_positions_are_qwens_multimodal_layout(tiny_qwen, inputs):
    """Recomputed from the block's weights in float64 with positions written out: image rows and
    columns centred on the image (row r at r - ceil(h/2)), frame 0; text token i at max(h/2, w/2) + i
    on all three axes. The capture matches; with Flux's layout (text at 0) it does not."""
    noisy, prompt = inputs
    seen = {}
    attn = tiny_qwen.blocks[1].attn
    hd = attn.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    try:
        got = lava.capture(tiny_qwen, noisy, prompt, layers=[1], heads="none").maps[1]
    finally:
        hd.remove()
    ref = copy.deepcopy(attn).double()
    split = lambda x: x.unflatten(-1, (2, -1)).transpose(1, 2)  # noqa: E731
    h_img, ctx = seen["hidden_states"].double(), seen["encoder_hidden_states"].double()
    q = ref.norm_q(split(ref.to_q(h_img)))
    k = ref.norm_k(split(ref.to_k(h_img)))
    cq = ref.norm_added_q(split(ref.add_q_proj(ctx)))
    ck = ref.norm_added_k(split(ref.add_k_proj(ctx)))
    gh, gw = noisy.grid
    rows, cols = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    img_pos = torch.stack([torch.zeros_like(rows), rows - (gh - gh // 2), cols - (gw - gw // 2)], -1)
    t = prompt.text_len
    txt_pos = (max(gh // 2, gw // 2) + torch.arange(t))[:, None].expand(t, 3)
    mask = torch.cat([prompt.text_mask[0], torch.ones(gh * gw, dtype=torch.bool)])

    def image_to_text(text_pos):
        qq = torch.cat([_rope_reference(cq, text_pos), _rope_reference(q, img_pos.reshape(-1, 3))], 2)
        kk = torch.cat([_rope_reference(ck, text_pos), _rope_reference(k, img_pos.reshape(-1, 3))], 2)
        s = (qq @ kk.transpose(-1, -2) / qq.shape[-1] ** 0.5).masked_fill(~mask, float("-inf"))
        return torch.softmax(s[:, :, t:], -1)[..., list(prompt.columns())]

    torch.testing.assert_close(got.double(), image_to_text(txt_pos), atol=1e-5, rtol=1e-4)
    assert (got.double() - image_to_text(torch.zeros_like(txt_pos))).abs().max() > 1e-4


def test_padding_takes_no_probability_and_changes_nothing(tiny_qwen, inputs):
    noisy, prompt = inputs
    valid = prompt.text_mask[0]
    n_valid = int(valid.sum())
    assert valid[:n_valid].all() and not valid[n_valid:].any()
    cols = list(range(prompt.text_len))
    for softmax in ("joint", "cross"):
        got = lava.capture(
            tiny_qwen, noisy, prompt, layers=[0, 2], heads="none", columns=cols, softmax=softmax
        )
        for m in got.maps.values():
            assert torch.all(m[..., n_valid:] == 0)  # exactly zero at every padded key
            if softmax == "cross":  # over the text keys alone, the real ones share all of it
                torch.testing.assert_close(m.sum(-1), torch.ones_like(m.sum(-1)), atol=1e-5, rtol=0)
    # The pipeline's own unpadded embeddings (no mask: one prompt, every token real) give the
    # same prediction as lava's padded, masked sequence.
    own, own_mask = tiny_qwen.pipe.encode_prompt(prompt.texts[0], device="cpu", max_sequence_length=64)
    assert own_mask is None and own.shape[1] == n_valid
    torch.testing.assert_close(prompt.embeds[:, :n_valid], own, atol=0, rtol=0)
    padded = model_output(tiny_qwen, noisy, prompt)
    kw = transformer_inputs(tiny_qwen, noisy, prompt)
    kw.update(encoder_hidden_states=own, encoder_hidden_states_mask=None)
    unpadded = tiny_qwen.transformer(**kw, return_dict=False)[0]
    torch.testing.assert_close(padded, unpadded, atol=1e-5, rtol=1e-5)


def test_early_exit_stops_after_deepest_captured_block(tiny_qwen, inputs):
    noisy, prompt = inputs
    with blocks_run(tiny_qwen.blocks, tiny_qwen.transformer.norm_out, "out") as ran:
        lava.capture(tiny_qwen, noisy, prompt, layers=[1])
        assert ran == [0, 1]
        ran.clear()
        lava.capture(tiny_qwen, noisy, prompt, layers=[0, 2], early_exit=False)
        assert ran == [0, 1, 2, "out"]
    assert all(
        type(b.attn.processor).__name__ == "QwenDoubleStreamAttnProcessor2_0" for b in tiny_qwen.blocks
    )


def test_class_spans_are_exact_under_the_chat_template(tiny_qwen):
    prompt = lava.encode_prompt(tiny_qwen, CLASSES)
    pipe = tiny_qwen.pipe
    assert prompt.clip_spans == dict.fromkeys(CLASSES, ())
    templated = pipe.prompt_template_encode.format(prompt.texts[0])
    ids = pipe.tokenizer(templated)["input_ids"]
    drop = pipe.prompt_template_encode_start_idx
    assert drop == 34
    for name in CLASSES:
        pos = prompt.t5_spans[name]
        assert pos == tuple(range(pos[0], pos[-1] + 1))
        assert pipe.tokenizer.decode([ids[drop + p] for p in pos]).strip() == name
    assert len(prompt.t5_spans["hydrant"]) > 1  # not in the tiny vocabulary: split, every piece kept
    # The span indexes the sequence the transformer sees: the encoder's last hidden layer at those
    # tokens of the templated prompt, after the 34 cropped ones.
    with torch.no_grad():
        hidden = pipe.text_encoder(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[-1]
    for name in CLASSES:
        pos = list(prompt.t5_spans[name])
        torch.testing.assert_close(
            prompt.embeds[0, pos], hidden[0, [drop + p for p in pos]], atol=1e-6, rtol=0
        )


def test_window_keeps_the_template_closing_and_splits_long_lists():
    backend = lava.load_backend("tiny-qwen-image", max_sequence_length=16)
    window = QWEN.sequence_window(backend)
    assert window == 16 - 5  # <|im_end|>, newline, <|im_start|>, assistant, newline stay inside
    names = [
        "cat",
        "dog",
        "horse",
        "sheep",
        "cow",
        "bird",
        "bus",
        "car",
        "train",
        "boat",
        "tree",
        "sky",
        "road",
    ]
    prompt = lava.encode_prompt(backend, names)
    assert prompt.num_prompts > 1 and prompt.text_len == 16
    pipe = backend.pipe
    for row, text in enumerate(prompt.texts):
        n = len(pipe.tokenizer(pipe.prompt_template_encode.format(text))["input_ids"]) - 34
        assert n <= 16 and int(prompt.text_mask[row].sum()) == n  # the whole prompt, closing included
    assert all(max(prompt.t5_spans[c]) < window for c in names)
    with pytest.raises(ClassNameError, match=r"Qwen2\.5-VL window holds 11 content tokens"):
        lava.encode_prompt(backend, ["a very long name made of many words that never fit"])


def test_several_prompt_rows_read_as_each_prompt_alone(tiny_qwen, image):
    """A class list split over prompt rows of different lengths runs as one batch; each row's map
    equals that row's prompt run alone (its own mask, its own padding)."""
    names = ["cat", "potted plant", "hydrant", "dining table", "sky"]
    noisy = lava.noise(tiny_qwen, image, timestep=300)
    prompt = lava.encode_prompt(tiny_qwen, names, max_classes_per_prompt=2)
    assert prompt.num_prompts == 3
    lengths = prompt.text_mask.sum(1)
    assert len(set(lengths.tolist())) > 1
    together = lava.aggregate(lava.capture(tiny_qwen, noisy, prompt, layers=[1, 2]), prompt, normalize="none")
    assert together.scores.shape[1] == len(names)
    for row in range(prompt.num_prompts):
        group = [c for c in names if prompt.rows[c] == row]
        alone = lava.encode_prompt(tiny_qwen, group)
        heat = lava.aggregate(lava.capture(tiny_qwen, noisy, alone, layers=[1, 2]), alone, normalize="none")
        idx = [names.index(c) for c in group]
        torch.testing.assert_close(together.scores[:, idx], heat.scores, atol=1e-5, rtol=1e-4)
    seg = lava.segment(image, names, backend=tiny_qwen, max_classes_per_prompt=2)
    assert seg.labels[0].shape == (image.height, image.width)


def test_images_encode_as_the_img2img_pipeline_does(tiny_qwen, image):
    noisy = lava.noise(tiny_qwen, image, timestep=0.0)
    vae = tiny_qwen.vae
    from diffusers.image_processor import VaeImageProcessor

    h, w = noisy.input_size
    pixels = VaeImageProcessor(vae_scale_factor=2).preprocess(image, height=h, width=w)
    with torch.no_grad():
        z = vae.encode(pixels[:, :, None]).latent_dist.mean[:, :, 0]
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1)
    torch.testing.assert_close(noisy.clean, (z - mean) / std, atol=1e-6, rtol=1e-6)
    assert noisy.clean.shape[1] == 4 and noisy.grid == (noisy.clean.shape[2] // 2, noisy.clean.shape[3] // 2)
    out = model_output(tiny_qwen, noisy, lava.encode_prompt(tiny_qwen, CLASSES))
    assert QWEN.output_latents(out, noisy.grid).shape == noisy.clean.shape


def test_segment_command_runs_on_tiny_qwen(tmp_path, capsys):
    from conftest import scene
    from PIL import Image

    from lava.cli import main

    img = tmp_path / "img.png"
    scene().save(img)
    out = tmp_path / "seg"
    args = ["segment", str(img), "--model", "tiny-qwen-image", "--classes", "cat,potted plant"]
    args += ["--out", str(out)]
    assert main(args) == 0
    labels = np.array(Image.open(out / "img_labels.png"))
    assert labels.shape == (40, 56)
    assert "RANDOM weights" in capsys.readouterr().err
    assert main(["models"]) == 0
    listing = capsys.readouterr().out
    assert "qwen-image" in listing and "tiny-qwen-image" in listing and "Qwen/Qwen-Image" in listing
    assert "unmeasured: Seg4Diff's SD3-medium relative depth" in listing


def test_trace_over_the_pipelines_own_call():
    """lava.trace wraps QwenImagePipeline's own call: its images are bit-identical, and the maps
    of the prompt's words sit at their tokens after the cropped system prompt."""
    from lava.backends.tiny_qwen import build_tiny_qwen_pipeline

    pipe = build_tiny_qwen_pipeline()
    call = dict(height=32, width=32, num_inference_steps=2, output_type="np", true_cfg_scale=1.0)
    plain = pipe("a cat on a red sofa", generator=torch.Generator().manual_seed(0), **call).images
    with lava.trace(pipe, layers=[0, 2]) as tr:
        traced = pipe("a cat on a red sofa", generator=torch.Generator().manual_seed(0), **call).images
    assert np.array_equal(plain, traced)
    assert tr.steps == [0, 1] and tr.grid == (8, 8)
    enc = tr.encoding(["cat", "sofa"])
    ids = pipe.tokenizer(pipe.prompt_template_encode.format("a cat on a red sofa"))["input_ids"]
    assert [pipe.tokenizer.decode([ids[34 + p]]) for p in enc.t5_spans["cat"]] == [" cat"]
    heat = tr.heatmaps(["cat", "sofa"])
    assert heat.scores.shape == (1, 2, 8, 8)
    maps = tr.maps()
    assert set(maps) == {0, 2} and maps[0].shape[-1] == tr.text_len
    assert all(float(m.sum(-1).max()) <= 1 + 1e-5 for m in maps.values())


def test_loads_from_a_folder_and_from_a_pipeline(tmp_path, tiny_qwen):
    from lava.backends.tiny_qwen import build_tiny_qwen_pipeline

    pipe = build_tiny_qwen_pipeline()
    pipe.save_pretrained(tmp_path / "qwen")
    loaded = lava.load_backend(str(tmp_path / "qwen"))
    assert loaded.family is QWEN and loaded.variant == "qwen-image" and loaded.max_sequence_length == 256
    assert loaded.defaults.layers == (1,) and loaded.defaults.source.startswith(
        "unmeasured"
    )  # depth 22/60 of 3
    text = "cat potted plant"
    assert torch.equal(loaded.encode_text(text)[0][:, :64], tiny_qwen.encode_text(text)[0])
    wrapped = lava.from_pipeline(pipe)
    assert wrapped.family is QWEN and wrapped.pipe is pipe and wrapped.guidance is None
    with pytest.raises(ModelError, match="no guidance embedding"):
        lava.from_pipeline(pipe, guidance=3.5)
    with pytest.raises(ModelError, match="nothing can be dropped"):
        lava.load_backend("tiny-qwen-image", drop_t5=True)
    with pytest.raises(LavaError, match="no guidance embedding"):
        QWEN.inputs(torch.zeros(1, 4, 4, 4), torch.zeros(1, 2, 32), None, torch.ones(1), guidance=1.0)


def test_planner_sizes_qwen_image_from_its_configs(tmp_path):
    """Qwen-Image's published sizes, from configs alone: a 20.4 B transformer and an 8.3 B
    Qwen2.5-VL-7B encoder, no CLIP part (the tokenizer's 131072 is not a window), factor-8 VAE."""
    from lava.planner import plan_memory, spec_from_folder, spec_from_pipeline
    from scripts.qwen_image_configs import write_config_folder

    spec = spec_from_folder(write_config_folder(str(tmp_path / "q")))
    assert spec.params["transformer"] == pytest.approx(20.43e9, rel=1e-3)
    assert spec.params["text_encoder"] == pytest.approx(8.29e9, rel=1e-3)
    assert spec.clip_len == 0 and spec.t5_len == 256 and spec.grid_unit == 16 and not spec.has_t5
    cuda, bf16, gib = torch.device("cuda"), torch.bfloat16, 2**30
    as_is = plan_memory(spec, (1024, 1024), 80 * gib, dtype=bf16, device=cuda)
    assert not as_is.offload_text_encoders and as_is.tokens == (4096, 256, 1)
    offloaded = plan_memory(spec, (1024, 1024), 48 * gib, dtype=bf16, device=cuda)
    assert offloaded.offload_text_encoders and offloaded.placement["text_encoder"] == ("cpu", "float32")
    assert offloaded.total < 48 * gib < as_is.total
    with pytest.raises(LavaError, match="nothing lava can change fits"):
        plan_memory(spec, (1024, 1024), 24 * gib, dtype=bf16, device=cuda)
    tiny = spec_from_pipeline(lava.load_backend("tiny-qwen-image").pipe, 64)
    assert tiny.clip_len == 0 and tiny.vae_scale == 2 and tiny.vae_channels == 8

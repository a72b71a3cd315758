"""Flux through the family adapter: exact captures after RoPE in double- and single-stream
blocks, the model untouched, early exit, T5-only prompts, packing, and memory at 1024 px."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import blocks_run, model_output
from meta_memory import meta_peak

import lava
from lava.backends.families import family_of
from lava.backends.family import FLUX, SD3
from lava.errors import LavaError, ModelError
from lava.kernels.torch_slice import chunk_budget
from lava.stages.capture import (
    CaptureProcessor,
    CaptureStore,
    capturing,
    run_until_captured,
    transformer_inputs,
)
from lava.types import CapturePlan

CLASSES = ["cat", "potted plant", "hydrant"]


@pytest.fixture
def inputs(tiny_flux, image):
    return lava.noise(tiny_flux, image, timestep=400, seed=3), lava.encode_prompt(tiny_flux, CLASSES)


def test_blocks_are_numbered_double_then_single(tiny_flux):
    assert family_of(tiny_flux.transformer) is FLUX
    assert tiny_flux.num_blocks == 4
    assert tiny_flux.block_kinds == ["double", "double", "single", "single"]
    assert tiny_flux.blocks[2] is tiny_flux.transformer.single_transformer_blocks[0]
    assert tiny_flux.joint_blocks == (0, 1, 2, 3)
    assert "double-stream 0-1, single-stream 2-3" in tiny_flux.describe()


@pytest.mark.parametrize("impl", ["torch", "naive", "triton"])
def test_outputs_unchanged_by_capture(tiny_flux, inputs, impl):
    from lava.kernels import available_impls

    if impl not in available_impls("cpu"):
        pytest.skip(f"{impl} is not available here")
    noisy, prompt = inputs
    plain = model_output(tiny_flux, noisy, prompt)
    plan = CapturePlan(layers=(0, 1, 2, 3), columns=prompt.columns(), impl=impl, early_exit=False)
    with capturing(tiny_flux.transformer, plan) as store:
        captured = run_until_captured(tiny_flux.transformer, **transformer_inputs(tiny_flux, noisy, prompt))
    assert set(store) == {0, 1, 2, 3}
    if impl == "torch":
        # Same q/k/v ops in the same [B, N, H, D] layout as FluxAttnProcessor, and the same fused
        # CPU SDPA kernel: the output is bitwise the model's own.
        assert torch.equal(captured, plain)
    else:
        torch.testing.assert_close(captured, plain, atol=1e-5, rtol=1e-5)


def _rope(x: torch.Tensor, ids: torch.Tensor, axes: tuple[int, ...], theta: float = 10000.0) -> torch.Tensor:
    """Rotary embedding written from its definition, in float64: consecutive channel pairs of each
    head are complex numbers turned by ``pos · theta^(-2j/d)`` per axis.

    x ``[B, H, N, D]``, ids ``[N, 3]``."""
    angles = []
    for axis, dim in enumerate(axes):
        freqs = theta ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        angles.append(ids[:, axis, None].double() * freqs)
    turn = torch.polar(torch.ones(1, dtype=torch.float64), torch.cat(angles, dim=-1))  # [N, D/2]
    pairs = torch.view_as_complex(x.double().unflatten(-1, (-1, 2)).contiguous())
    return torch.view_as_real(pairs * turn).flatten(-2)


def _reference_qk(attn, hidden, context, text_len, ids, axes):
    """q, k ``[B, H, N, D]`` in float64 from the block's own weights: projections, RMS norms,
    ``[text; image]``, then RoPE. ``context`` is None in a single-stream block."""
    attn = copy.deepcopy(attn).double()
    h = attn.heads

    def split(x):
        return x.double().unflatten(-1, (h, -1)).transpose(1, 2)

    q, k = split(attn.to_q(hidden.double())), split(attn.to_k(hidden.double()))
    q, k = attn.norm_q(q), attn.norm_k(k)
    if context is not None:
        cq, ck = split(attn.add_q_proj(context.double())), split(attn.add_k_proj(context.double()))
        q, k = torch.cat([attn.norm_added_q(cq), q], 2), torch.cat([attn.norm_added_k(ck), k], 2)
    assert q.shape[2] == ids.shape[0] and text_len < q.shape[2]
    return _rope(q, ids, axes), _rope(k, ids, axes)


@pytest.mark.parametrize("direction", ["image_to_text", "text_to_image"])
@pytest.mark.parametrize("softmax", ["joint", "cross"])
@pytest.mark.parametrize("heads", ["mean", "none"])
def test_slices_equal_float64_softmax_after_rope(tiny_flux, inputs, direction, softmax, heads):
    noisy, prompt = inputs
    layers = (0, 1, 2, 3)  # double-stream 0-1, single-stream 2-3
    seen = {}

    def grab(index):
        def hook(module, args, kwargs):
            seen[index] = (kwargs["hidden_states"], kwargs.get("encoder_hidden_states"))

        return hook

    attns = [tiny_flux.blocks[i].attn for i in layers]
    handles = [
        a.register_forward_pre_hook(grab(i), with_kwargs=True) for i, a in zip(layers, attns, strict=True)
    ]
    try:
        slices = lava.capture(
            tiny_flux, noisy, prompt, layers=layers, direction=direction, softmax=softmax, heads=heads
        )
    finally:
        for hd in handles:
            hd.remove()

    t, cols = prompt.text_len, list(prompt.columns())
    gh, gw = noisy.grid
    rows, cls = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, cls], -1).reshape(-1, 3)
    ids = torch.cat([torch.zeros(t, 3, dtype=torch.long), img_ids])  # text ids are zeros
    axes = tuple(tiny_flux.transformer.config.axes_dims_rope)
    for i in layers:
        hidden, context = seen[i]
        assert (context is None) == (tiny_flux.block_kinds[i] == "single")
        q, k = _reference_qk(tiny_flux.blocks[i].attn, hidden, context, t, ids, axes)
        scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5  # [B, H, N, N] float64
        img = slice(t, None)
        if direction == "image_to_text":
            if softmax == "joint":
                want = torch.softmax(scores[:, :, img], -1)[..., cols]
            else:
                want = torch.softmax(scores[:, :, img, :t], -1)[..., cols]
        else:
            if softmax == "joint":
                want = torch.softmax(scores[:, :, cols], -1)[..., img]
            else:
                want = torch.softmax(scores[:, :, cols, img], -1)
            want = want.transpose(-1, -2)
        if heads == "mean":
            want = want.mean(1, keepdim=True)
        got = slices.maps[i]
        assert got.shape == (1, 1 if heads == "mean" else 2, gh * gw, len(cols))
        torch.testing.assert_close(got.double(), want, atol=2e-6, rtol=1e-4)


def test_rope_matters_for_the_slice(tiny_flux, inputs):
    """The reference above is not trivially satisfied: without RoPE the image→text map differs."""
    noisy, prompt = inputs
    t = prompt.text_len
    seen = {}
    attn = tiny_flux.blocks[0].attn
    hd = attn.register_forward_pre_hook(
        lambda m, a, kw: seen.update(h=kw["hidden_states"], c=kw["encoder_hidden_states"]), with_kwargs=True
    )
    try:
        got = lava.capture(tiny_flux, noisy, prompt, layers=[0]).maps[0]
    finally:
        hd.remove()
    n = seen["h"].shape[1] + t
    q, k = _reference_qk(attn, seen["h"], seen["c"], t, torch.zeros(n, 3), (4, 4, 8))  # identity rotation
    no_rope = torch.softmax(q @ k.transpose(-1, -2) / 4.0, -1)[:, :, t:][..., list(prompt.columns())].mean(
        1, True
    )
    assert (got.double() - no_rope).abs().max() > 1e-4


def test_early_exit_stops_after_deepest_captured_block(tiny_flux, image):
    noisy = lava.noise(tiny_flux, image)
    prompt = lava.encode_prompt(tiny_flux, CLASSES)
    with blocks_run(tiny_flux.blocks, tiny_flux.transformer.norm_out) as ran:
        lava.capture(tiny_flux, noisy, prompt, layers=[1])
        assert ran == [0, 1]  # the last double-stream block: no single-stream block runs
        ran.clear()
        slices = lava.capture(tiny_flux, noisy, prompt, layers=[0, 2])
        assert ran == [0, 1, 2]
        ran.clear()
        lava.capture(tiny_flux, noisy, prompt, layers=[2], early_exit=False)
        assert ran == [0, 1, 2, 3, "norm_out"]
    assert list(slices.maps) == [0, 2]


def test_processors_and_hooks_restored(tiny_flux, image):
    before = [b.attn.processor for b in tiny_flux.blocks]
    plan = CapturePlan(layers=(1, 3))
    with pytest.raises(RuntimeError, match="boom"), capturing(tiny_flux.transformer, plan):
        assert type(tiny_flux.blocks[3].attn.processor).__name__ == "CaptureProcessor"
        raise RuntimeError("boom")
    assert [b.attn.processor for b in tiny_flux.blocks] == before
    assert all(not b._forward_hooks and not b._forward_pre_hooks for b in tiny_flux.blocks)
    with (
        pytest.raises(LavaError, match=r"blocks \[7\] do not exist"),
        capturing(tiny_flux.transformer, CapturePlan(layers=(7,))),
    ):
        pass


def test_single_stream_processor_needs_the_text_length(tiny_flux):
    attn = tiny_flux.blocks[2].attn
    proc = CaptureProcessor(
        2, CapturePlan(layers=(2,), columns=(0,)), CaptureStore(CapturePlan(layers=(2,))), FLUX, True
    )
    with pytest.raises(LavaError, match="number of text tokens"):
        proc(attn, torch.randn(1, 20, attn.query_dim))


def test_triton_and_naive_slices_match_torch(tiny_flux, inputs):
    from lava.kernels import available_impls

    noisy, prompt = inputs
    ref = lava.capture(tiny_flux, noisy, prompt, layers=[1, 3], heads="none", impl="torch")
    for impl in ("naive", "triton"):
        if impl not in available_impls("cpu"):
            continue
        got = lava.capture(tiny_flux, noisy, prompt, layers=[1, 3], heads="none", impl=impl)
        for layer in (1, 3):
            torch.testing.assert_close(got.maps[layer], ref.maps[layer], atol=1e-5, rtol=1e-4)


def test_prompt_spans_are_t5_tokens(tiny_flux):
    prompt = lava.encode_prompt(tiny_flux, CLASSES)
    assert tiny_flux.clip_len == 0 and prompt.clip_len == 0
    assert prompt.text_len == tiny_flux.max_sequence_length == 128
    assert all(prompt.clip_spans[c] == () for c in CLASSES)
    ids = tiny_flux.t5_tokenizer(prompt.text)["input_ids"]
    pieces = tiny_flux.t5_tokenizer.convert_ids_to_tokens(ids)
    assert [pieces[p] for p in prompt.t5_spans["cat"]] == ["▁cat"]
    assert "".join(pieces[p] for p in prompt.t5_spans["hydrant"]).strip("▁") == "hydrant"  # spelled out
    assert prompt.columns("clip") == ()
    assert prompt.embeds.shape[1] == 128 and prompt.pooled.shape == (1, 12)  # CLIP pooled only


def test_long_vocabulary_splits_over_t5_windows(tiny_flux, image):
    names = [f"{w} thing" for w in "red green blue yellow black white orange purple".split()] + [
        "zyxwvut qrstuv",
        "mnopqr stuvw",
    ]
    prompt = lava.encode_prompt(tiny_flux, names * 1 + [f"xq{i}zz" for i in range(14)])
    assert prompt.num_prompts >= 2
    assert all(max(prompt.t5_spans[c]) < tiny_flux.max_sequence_length - 1 for c in prompt.classes)
    noisy = lava.noise(tiny_flux, image)
    together = lava.capture(tiny_flux, noisy, prompt, layers=[1, 2])
    apart = lava.capture(tiny_flux, noisy, prompt, layers=[1, 2], prompt_batch=1)
    for layer in (1, 2):
        torch.testing.assert_close(together.maps[layer], apart.maps[layer], atol=1e-6, rtol=1e-5)


def test_packing_matches_flux_pipeline(tiny_flux, image):
    from diffusers import FluxPipeline

    noisy = lava.noise(tiny_flux, image, seed=1)
    b, c, h, w = noisy.latents.shape
    assert (h // 2, w // 2) == noisy.grid and c == 4
    inp = transformer_inputs(tiny_flux, noisy, lava.encode_prompt(tiny_flux, ["cat"]))
    torch.testing.assert_close(
        inp["hidden_states"], FluxPipeline._pack_latents(noisy.latents, b, c, h, w), atol=0, rtol=0
    )
    want_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", torch.float32)
    assert torch.equal(inp["img_ids"], want_ids)
    assert torch.equal(inp["txt_ids"], torch.zeros(128, 3))
    assert inp["timestep"].item() == pytest.approx(noisy.timestep / 1000)  # the model multiplies by 1000
    assert inp["guidance"].item() == 3.5
    back = FLUX.output_latents(inp["hidden_states"], noisy.grid)
    assert torch.equal(back, noisy.latents)


def test_seg4diff_timestep_is_what_its_schedule_gives(tiny_flux):
    from lava.backends.flux import SEG4DIFF_FLUX_T

    # tiny-flux carries FLUX.1-dev's scheduler config; Seg4Diff shifts by mu = calculate_shift(16).
    assert tiny_flux.timestep_for_step(-8, 50, image_seq_len=16) == pytest.approx(SEG4DIFF_FLUX_T, abs=0.01)
    assert tiny_flux.timestep_for_step(-8, 50, image_seq_len=4096) == pytest.approx(375.61, abs=0.01)
    with pytest.raises(LavaError, match="image_seq_len"):
        tiny_flux.timestep_for_step(-8, 50)


def test_registry_and_from_pipeline(tiny_flux):
    from lava.backends import REGISTRY, list_backends
    from lava.backends.tiny import build_tiny_flux_pipeline

    assert {"flux-dev", "flux-schnell", "tiny-flux"} <= set(REGISTRY)
    rows = {name: (what, d) for name, what, d in list_backends()}
    assert rows["flux-dev"][0].startswith("black-forest-labs/FLUX.1-dev")
    assert rows["flux-dev"][1].layers == (12, 17) and "Seg4Diff" in rows["flux-dev"][1].source
    assert rows["flux-schnell"][1].source.startswith("unmeasured")

    dev = lava.from_pipeline(tiny_flux.pipe)
    assert (dev.variant, dev.guidance, dev.max_sequence_length, dev.family) == ("flux-dev", 3.5, 512, FLUX)
    schnell = lava.from_pipeline(build_tiny_flux_pipeline(guidance_embeds=False))
    assert (schnell.variant, schnell.guidance, schnell.max_sequence_length) == ("flux-schnell", None, 256)
    with pytest.raises(ModelError, match="no guidance embedding"):
        lava.from_pipeline(schnell.pipe, guidance=2.0)
    with pytest.raises(ModelError, match="T5 cannot be dropped"):
        lava.load_backend("tiny-flux", drop_t5=True)
    assert family_of(lava.load_backend("tiny-sd3").transformer) is SD3


def test_schnell_like_model_segments(image):
    from lava.backends.tiny import build_tiny_flux_pipeline

    backend = lava.from_pipeline(build_tiny_flux_pipeline(guidance_embeds=False), max_sequence_length=64)
    assert "guidance" not in transformer_inputs(
        backend, lava.noise(backend, image, resolution=32), lava.encode_prompt(backend, ["cat"])
    )
    seg = lava.segment(image, ["cat", "dog"], backend=backend, layers=[0, 3], resolution=32)
    assert tuple(seg.labels[0].shape) == (40, 56)


def test_concept_source_refuses_flux(tiny_flux, inputs):
    noisy, prompt = inputs
    with pytest.raises(LavaError, match="SD3 family only"):
        lava.capture(tiny_flux, noisy, prompt, source="concept")


def test_presence_runs_on_packed_outputs(tiny_flux, inputs):
    from lava.stages.presence import denoising_presence

    noisy, prompt = inputs
    presence = denoising_presence(tiny_flux, noisy, prompt)
    assert presence.shape == (1, len(CLASSES)) and float(presence.max()) == pytest.approx(1.0)


def test_planner_does_not_crash_on_flux(tiny_flux):
    from lava.planner import estimate_memory, plan_memory

    plan = estimate_memory(tiny_flux.pipe, (64, 64), dtype=torch.float32)
    assert plan.total > 0
    assert plan_memory(tiny_flux.pipe, (64, 64), 2**40, dtype=torch.float32).total > 0


@pytest.mark.parametrize("kind", ["double", "single"])
@pytest.mark.parametrize("direction", ["image_to_text", "text_to_image"])
@pytest.mark.parametrize("softmax", ["joint", "cross"])
def test_capture_is_memory_flat_at_flux_1024px(monkeypatch, kind, direction, softmax):
    """One FLUX.1 attention at 1024 px (4096 image + 512 text tokens, 24 heads × 128), on meta
    tensors: the capture's extra memory over the model's own processor is one chunk of scores,
    the log-sum-exps and the slice, nothing N×N (the N×N probabilities would be 1.9 GiB).

    The attention kernel itself is replaced by a stand-in that allocates only its output, as the
    fused kernels do, in both runs: on meta SDPA decomposes into its math path, which would put
    an N×N matrix into *both* peaks and hide what the capture adds.
    """
    from diffusers.models.transformers.transformer_flux import FluxAttention, FluxAttnProcessor

    def flat_sdpa(*args, **kwargs):
        q = args[0] if args else kwargs["query"]
        return torch.empty_like(q)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", flat_sdpa)
    n_img, t, h, d, n_cols = 4096, 512, 24, 128, 20
    c, n = h * d, n_img + t
    with torch.device("meta"):
        if kind == "double":
            attn = FluxAttention(
                c, heads=h, dim_head=d, out_dim=c, added_kv_proj_dim=c, context_pre_only=False, bias=True
            )
            args = (torch.empty(1, n_img, c), torch.empty(1, t, c))
        else:
            attn = FluxAttention(c, heads=h, dim_head=d, out_dim=c, bias=True, pre_only=True)
            args = (torch.empty(1, n, c), None)
        rotary = (torch.empty(n, d), torch.empty(n, d))
    attn.requires_grad_(False)  # as in inference: no autograd graph keeping intermediates alive
    own = meta_peak(lambda: FluxAttnProcessor()(attn, *args, None, rotary))
    plan = CapturePlan(
        layers=(0,), columns=tuple(range(n_cols)), direction=direction, softmax=softmax, impl="torch"
    )
    proc = CaptureProcessor(0, plan, CaptureStore(plan), FLUX, single_stream=kind == "single")
    proc.text_len = t
    peak = meta_peak(lambda: proc(attn, *args, None, rotary))
    budget = chunk_budget(torch.device("meta"))
    lse_and_slice = 4 * h * n + 2 * 4 * n_img * n_cols
    nxn = 4 * h * n * n
    assert peak - own <= budget + lse_and_slice + 2**20, f"extra {(peak - own) / 2**20:.1f} MiB"
    assert peak < nxn / 2, f"peak {peak / 2**20:.0f} MiB vs N×N {nxn / 2**20:.0f} MiB"


def test_segment_and_sweep_commands_run_on_tiny_flux(tmp_path, capsys):
    import json

    from conftest import scene
    from PIL import Image as PILImage

    from lava.cli import main

    img = tmp_path / "img.png"
    scene().save(img)
    out = tmp_path / "seg"
    assert main(["segment", str(img), "--model", "tiny-flux", "--classes", "a,b", "--out", str(out)]) == 0
    assert (out / "img_labels.png").exists()
    root = tmp_path / "shapes"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    (root / "classes.txt").write_text("background\nred square\nblue circle\n")
    for i in range(2):
        label = np.zeros((24, 32), dtype=np.uint8)
        label[4:12, 4:12], label[14:22, 18:30] = 1, 2
        PILImage.fromarray((np.random.default_rng(i).random((24, 32, 3)) * 255).astype(np.uint8)).save(
            root / "images" / f"s{i}.png"
        )
        PILImage.fromarray(label).save(root / "labels" / f"s{i}.png")
    sweep = tmp_path / "sweep"
    args = ["sweep", "--dataset", "folder", "--root", str(root), "--model", "tiny-flux", "--out", str(sweep)]
    assert main([*args, "--timesteps", "300,700", "--layers", "0,2,3"]) == 0
    cells = json.loads((sweep / "sweep.json").read_text())["cells"]
    assert {tuple(c["layers"]) for c in cells} >= {(0,), (2,), (3,)}
    capsys.readouterr()
    assert main(["models"]) == 0
    listing = capsys.readouterr().out
    assert "flux-dev" in listing and "flux-schnell" in listing and "tiny-flux" in listing
    assert "19-56 single-stream" in listing


def test_fused_projections_capture_the_same(inputs):
    """After ``fuse_qkv_projections()`` the model takes q/k/v from ``to_qkv``; so does the capture."""
    noisy, prompt = inputs
    backend = lava.load_backend("tiny-flux")
    before = lava.capture(backend, noisy, prompt, layers=[0, 2])
    backend.transformer.fuse_qkv_projections()
    assert backend.blocks[0].attn.fused_projections
    plain = model_output(backend, noisy, prompt)
    plan = CapturePlan(layers=(0, 1, 2, 3), columns=prompt.columns(), early_exit=False)
    with capturing(backend.transformer, plan):
        captured = run_until_captured(backend.transformer, **transformer_inputs(backend, noisy, prompt))
    assert torch.equal(captured, plain)
    after = lava.capture(backend, noisy, prompt, layers=[0, 2])
    for layer in (0, 2):
        torch.testing.assert_close(after.maps[layer], before.maps[layer], atol=1e-6, rtol=1e-5)


def test_kept_image_qk_are_the_image_rows_after_rope(tiny_flux, inputs):
    """Propagation on Flux reads the image rows of the rotated q/k (text comes first there), in
    double- and single-stream blocks."""
    noisy, prompt = inputs
    layers = (1, 2)  # one double-stream, one single-stream block
    seen = {}

    def grab(index):
        def hook(module, args, kwargs):
            seen[index] = (kwargs["hidden_states"], kwargs.get("encoder_hidden_states"))

        return hook

    handles = [tiny_flux.blocks[i].attn.register_forward_pre_hook(grab(i), with_kwargs=True) for i in layers]
    try:
        slices = lava.capture(tiny_flux, noisy, prompt, layers=layers, keep_image_qk=True)
    finally:
        for hd in handles:
            hd.remove()
    t = prompt.text_len
    gh, gw = noisy.grid
    rows, cls = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, cls], -1).reshape(-1, 3)
    ids = torch.cat([torch.zeros(t, 3, dtype=torch.long), img_ids])
    axes = tuple(tiny_flux.transformer.config.axes_dims_rope)
    for i in layers:
        q, k = _reference_qk(tiny_flux.blocks[i].attn, *seen[i], t, ids, axes)
        got_q, got_k = slices.image_qk[i]
        assert got_q.shape[-2] == gh * gw
        torch.testing.assert_close(got_q[:, 0].double(), q[:, :, t:], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(got_k[:, 0].double(), k[:, :, t:], atol=1e-5, rtol=1e-4)


def test_segment_with_propagation_runs_on_flux(tiny_flux, image):
    seg = lava.segment(image, CLASSES, backend=tiny_flux, refine="propagate,pamr")
    assert seg.labels[0].shape == (image.height, image.width)


def test_memory_planning_plans_flux(tiny_flux, tmp_path, capsys):
    """The planner plans FLUX.1: tiny-flux from its pipeline (a folder saved from it the same, with
    the T5 window it loads with), FLUX.1-dev and -schnell at their real size from the released configs
    (meta tensors, no download): T5 alone in the text sequence, 2x2 packing, 16 px per token."""
    from PIL import Image

    from lava.backends import flux
    from lava.cli import main
    from lava.planner import estimate_memory, fmt_bytes, plan_memory, spec_from_pipeline

    path = tmp_path / "x.png"
    Image.new("RGB", (64, 64)).save(path)
    args = ["segment", str(path), "--classes", "a,b", "--dry-run"]
    gh, gw = lava.noise(tiny_flux, Image.new("RGB", (64, 64))).grid  # at tiny-flux's own resolution
    assert main([*args, "--model", "tiny-flux"]) == 0
    tiny = capsys.readouterr().out
    assert f"{gh * gw} image + {tiny_flux.max_sequence_length} text tokens" in tiny
    folder = tmp_path / "flux-tiny"
    tiny_flux.pipe.save_pretrained(folder)
    assert main([*args, "--model", str(folder), "--resolution", "32"]) == 0
    saved = capsys.readouterr().out
    loaded = lava.load_backend(str(folder))  # a dev-like config (guidance): FLUX.1-dev's T5 window
    assert f"{gh * gw} image + {loaded.max_sequence_length} text tokens" in saved
    assert loaded.max_sequence_length == 512
    # The folder's safetensors headers count what the built modules hold.
    for module in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        assert next(ln for ln in tiny.splitlines() if ln.startswith(f"  {module} ")) in saved

    dev = spec_from_pipeline(flux.full_size_modules("flux-dev"), 512)
    assert abs(dev.params["transformer"] / 11.9e9 - 1) < 0.01  # FLUX.1-dev: 11.9 B
    assert 4.7e9 < dev.params["text_encoder_2"] < 4.8e9  # T5-XXL's encoder
    assert 1.2e8 < dev.params["text_encoder"] < 1.3e8  # CLIP-L's text tower
    assert (dev.clip_len, dev.t5_len, dev.grid_unit, dev.has_t5) == (0, 512, 16, False)
    schnell = spec_from_pipeline(flux.full_size_modules("flux-schnell"), 256)
    guidance = dev.params["transformer"] - schnell.params["transformer"]  # the guidance embedding alone
    assert 0 < guidance < 0.002 * dev.params["transformer"]
    kw = dict(dtype=torch.bfloat16, device="cuda", captured_layers=2)
    on_gpu = estimate_memory(dev, (1024, 1024), **kw)
    offloaded = estimate_memory(dev, (1024, 1024), offload_text_encoders=True, **kw)
    encoders = dev.params["text_encoder"] + dev.params["text_encoder_2"]
    assert on_gpu.tokens[:2] == (4096, 512)
    assert on_gpu.total - offloaded.total >= encoders * 2 - 2**20  # both encoders leave the GPU (bf16)
    assert offloaded.memory("cpu").weight_bytes == encoders * 4  # and run in fp32 on the CPU
    assert plan_memory(dev, (1024, 1024), 24 * 2**30, **kw).offload_text_encoders
    with pytest.raises(LavaError, match="nothing lava can change fits"):  # the transformer alone is 22.2 GiB
        plan_memory(dev, (1024, 1024), 20 * 2**30, **kw)

    full = [*args, "--resolution", "1024", "--device", "cuda", "--dtype", "bf16"]
    assert main([*full, "--model", "flux-dev"]) == 0
    out = capsys.readouterr().out
    assert "4096 image + 512 text tokens" in out and f"estimated peak {fmt_bytes(on_gpu.total)}" in out
    assert main([*full, "--model", "flux-dev", "--offload-text-encoders"]) == 0
    assert f"estimated peak {fmt_bytes(offloaded.total)}" in capsys.readouterr().out
    assert main([*full, "--model", "flux-schnell"]) == 0
    assert "4096 image + 256 text tokens" in capsys.readouterr().out
    assert main([*full, "--model", "flux-dev", "--drop-t5"]) == 1  # refused as loading refuses it
    assert "T5 cannot be dropped" in capsys.readouterr().err


def test_tiny_flux_takes_a_text_window_like_tiny_sd3():
    """Both tiny backends take max_sequence_length (a preset's text window), through one loader."""
    short = lava.load_backend("tiny-flux", max_sequence_length=77)
    assert short.max_sequence_length == 77
    assert lava.encode_prompt(short, CLASSES).text_len == 77

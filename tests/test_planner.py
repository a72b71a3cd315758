"""The memory planner: formula against a measured peak, the order of savings, and refusals."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch

import lava
from lava.cli import main
from lava.errors import LavaError
from lava.planner import ModelSpec, apply_plan, estimate_memory, parse_bytes, plan_memory

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("8GiB", 8 * 2**30),
        ("12G", 12 * 2**30),
        ("1500MB", 1500 * 2**20),
        ("750M", 750 * 2**20),
        ("4096", 4096),
        (10, 10),
    ],
)
def test_parse_bytes(text, value):
    assert parse_bytes(text) == value


def test_parse_bytes_rejects_garbage():
    with pytest.raises(LavaError, match="cannot read memory size"):
        parse_bytes("lots")


def test_estimate_grows_linearly_not_quadratically(tiny):
    small = estimate_memory(tiny.pipe, (256, 256), dtype=torch.float32)
    big = estimate_memory(tiny.pipe, (1024, 1024), dtype=torch.float32)
    n_small, n_big = (256 // 4) ** 2 + 333, (1024 // 4) ** 2 + 333
    ratio = big.transformer_activations / small.transformer_activations
    assert ratio == pytest.approx(n_big / n_small, rel=1e-6)


def test_transformer_term_against_measured_peak():
    from diffusers import SD3Transformer2DModel
    from memprobe import peak_bytes
    from planner_check import _Pipe

    from lava.stages.capture import capturing, run_until_captured
    from lava.types import CapturePlan

    torch.manual_seed(0)
    model = SD3Transformer2DModel(
        sample_size=32,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=1,
        attention_head_dim=64,
        num_attention_heads=8,
        joint_attention_dim=256,
        caption_projection_dim=512,
        pooled_projection_dim=64,
        pos_embed_max_size=64,
    ).eval()
    inputs = dict(
        hidden_states=torch.randn(1, 16, 64, 64),
        encoder_hidden_states=torch.randn(1, 333, 256),
        pooled_projections=torch.randn(1, 64),
        timestep=torch.tensor([500.0]),
    )
    plan = CapturePlan(layers=(0,), columns=tuple(range(32)), early_exit=False)

    def fn():
        with torch.no_grad(), capturing(model, plan):
            return run_until_captured(model, **inputs)

    measured, _ = peak_bytes(fn)
    est = estimate_memory(_Pipe(model), (512, 512), dtype=torch.float32, columns=32, text_tokens=333)
    assert 0.8 <= (est.transformer_activations + est.slices) / measured <= 2.0


def test_plan_tries_savings_in_order(tiny):
    # On CUDA offloading moves the text encoders out of the budgeted memory: tried first.
    size, cuda = (256, 256), {"dtype": torch.float32, "device": "cuda"}
    full = estimate_memory(tiny.pipe, size, **cuda)
    assert plan_memory(tiny.pipe, size, full.total, **cuda) == full
    offloaded = estimate_memory(tiny.pipe, size, offload_text_encoders=True, **cuda)
    assert offloaded.total < full.total
    chosen = plan_memory(tiny.pipe, size, offloaded.total, **cuda)
    assert chosen.offload_text_encoders and not chosen.drop_t5
    with pytest.raises(LavaError, match=r"does not fit in 1.00 KiB: nothing lava can change fits"):
        plan_memory(tiny.pipe, size, 1024, **cuda)


def test_apply_plan_drops_t5_and_offloads(image):
    backend = lava.load_backend("tiny-sd3")
    plan = estimate_memory(
        backend.pipe, (32, 32), dtype=torch.float32, offload_text_encoders=True, drop_t5=True
    )
    placed = apply_plan(backend, plan, device="cpu", dtype=torch.float32)
    assert placed.pipe.text_encoder_3 is None and not placed.has_t5
    assert placed.name == "tiny-sd3" and "memory_plan" in placed.info
    prompt = lava.encode_prompt(placed, ["cat", "dog"])
    assert prompt.t5_spans == {} and prompt.text_len == placed.text_len
    assert tuple(lava.segment(image, ["cat", "dog"], backend=placed).labels[0].shape) == (40, 56)


def test_cli_max_memory(tmp_path, capsys):
    from conftest import scene

    path = tmp_path / "a.png"
    scene().save(path)
    out = tmp_path / "out"
    args = ["segment", str(path), "--classes", "cat", "--model", "tiny-sd3", "--out", str(out)]
    assert main([*args, "--max-memory", "1KiB", "--resolution", "64"]) == 1
    err = capsys.readouterr().err
    assert "does not fit in 1.00 KiB" in err and "estimated peak" in err
    assert not out.exists()
    assert main([*args, "--max-memory", "4GiB"]) == 0
    assert "memory plan" in capsys.readouterr().err
    assert (out / "a_labels.png").exists()


# ---- the rules: what goes where, in which dtype, which memories are shared ---------------------------

SD3_MEDIUM = ModelSpec(
    params={
        "transformer": 2_087_000_000,
        "vae": 83_800_000,
        "text_encoder": 123_650_000,
        "text_encoder_2": 694_660_000,
        "text_encoder_3": 4_762_310_000,
    },
    heads=24,
    head_dim=64,
    patch_size=2,
    joint_dim=4096,
    vae_sample_size=1024,
    largest=63_242_240,
)
GiB = 2**30


def test_cpu_run_counts_every_module_in_one_memory_and_text_encoders_in_fp32():
    plan = estimate_memory(SD3_MEDIUM, (1024, 1024), dtype=torch.bfloat16, device="cpu")
    assert [m.name for m in plan.memories] == ["cpu"]
    assert plan.placement["transformer"] == ("cpu", "bfloat16")
    # CPU matmuls in half precision are slow or unsupported: lava keeps text encoders fp32 there.
    assert plan.placement["text_encoder_3"] == ("cpu", "float32")
    text = sum(SD3_MEDIUM.params[n] for n in ("text_encoder", "text_encoder_2", "text_encoder_3")) * 4
    image = sum(SD3_MEDIUM.params[n] for n in ("transformer", "vae")) * 2
    assert plan.weights == text + image
    # "Offloading" to the CPU on a CPU run moves nothing and saves nothing.
    offloaded = estimate_memory(SD3_MEDIUM, (1024, 1024), dtype=torch.bfloat16, offload_text_encoders=True)
    assert offloaded.total == plan.total


def test_cuda_run_puts_offloaded_encoders_in_the_process_memory():
    kw = {"dtype": torch.bfloat16, "device": "cuda"}
    plan = estimate_memory(SD3_MEDIUM, (1024, 1024), offload_text_encoders=True, **kw)
    gpu, ram = plan.memory("cuda:0"), plan.memory("cpu")
    assert set(gpu.weights) == {"transformer", "vae"} and all(
        dt == "bfloat16" for dt, _ in gpu.weights.values()
    )
    assert set(ram.weights) == {"text_encoder", "text_encoder_2", "text_encoder_3"}
    assert all(dt == "float32" for dt, _ in ram.weights.values())
    assert plan.total == gpu.peak < estimate_memory(SD3_MEDIUM, (1024, 1024), **kw).total


def test_dtype_halves_the_weights():
    fp32 = estimate_memory(SD3_MEDIUM, (512, 512), dtype=torch.float32, device="cuda")
    bf16 = estimate_memory(SD3_MEDIUM, (512, 512), dtype=torch.bfloat16, device="cuda")
    assert bf16.weights * 2 == fp32.weights
    assert bf16.transformer_activations * 2 == fp32.transformer_activations


def test_vae_tiles_only_beyond_its_own_sample_size_and_in_tiles_of_that_size():
    from lava.planner import VAE_FACTOR

    kw = {"dtype": torch.float32, "device": "cpu"}
    # 1024x768 fits one 1024 px tile: tiling changes nothing, as in diffusers.
    small = estimate_memory(SD3_MEDIUM, (768, 1024), vae_tiling=True, **kw)
    assert not small.vae_tiles and small.vae_activations == 768 * 1024 * 128 * 4 * VAE_FACTOR
    big = estimate_memory(SD3_MEDIUM, (1536, 2048), vae_tiling=True, **kw)
    assert big.vae_tiles and big.vae_activations == 1024 * 1024 * 128 * 4 * VAE_FACTOR
    # The threshold and the tile are the VAE config's sample_size, whatever it is.
    spec512 = ModelSpec(**{**vars(SD3_MEDIUM), "vae_sample_size": 512})
    tiled = estimate_memory(spec512, (768, 1024), vae_tiling=True, **kw)
    assert tiled.vae_tiles and tiled.vae_activations == 512 * 512 * 128 * 4 * VAE_FACTOR
    # plan_memory does not take a saving that saves nothing.
    untiled = estimate_memory(SD3_MEDIUM, (768, 1024), **kw)
    assert not plan_memory(SD3_MEDIUM, (768, 1024), untiled.total, **kw).vae_tiling


def test_diffusers_vae_tiles_at_its_sample_size():
    """The rule the planner copies: AutoencoderKL tiles when a side exceeds ``sample_size``, in
    ``sample_size`` tiles."""
    from diffusers import AutoencoderKL

    for size in (32, 64):
        vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, sample_size=size)
        assert vae.tile_sample_min_size == size


def test_refusal_proposes_the_cheapest_setting_that_fits():
    kw = {"device": "cuda"}
    fp32 = estimate_memory(SD3_MEDIUM, (1024, 1024), dtype=torch.float32, drop_t5=True, **kw)
    # Even without T5 the fp32 weights exceed the budget; bf16 fits.
    budget = int(fp32.weights * 0.75)
    with pytest.raises(LavaError, match=r"Cheapest setting that fits: --dtype bfloat16 \(estimated peak"):
        plan_memory(SD3_MEDIUM, (1024, 1024), budget, dtype=torch.float32, **kw)
    # A budget only a lower resolution meets proposes it: the bf16 weights fit, but a 1024 px VAE
    # tile (1.25 GiB) does not; at 512 px the whole image takes 0.31 GiB.
    bf16 = estimate_memory(SD3_MEDIUM, (2048, 2048), dtype=torch.bfloat16, offload_text_encoders=True, **kw)
    with pytest.raises(LavaError, match=r"Cheapest setting that fits: --resolution 512 \("):
        plan_memory(SD3_MEDIUM, (2048, 2048), bf16.weights + GiB, dtype=torch.bfloat16, **kw)
    with pytest.raises(LavaError, match=r"nothing lava can change fits.*raise --max-memory"):
        plan_memory(SD3_MEDIUM, (1024, 1024), GiB, dtype=torch.float32, **kw)


def test_folder_spec_reads_headers_not_weights(tmp_path, monkeypatch):
    from lava.backends.tiny import build_tiny_pipeline
    from lava.planner import spec_from_folder, spec_from_pipeline

    pipe = build_tiny_pipeline()
    pipe.save_pretrained(tmp_path / "m")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("weights loaded"))
    folder = spec_from_folder(str(tmp_path / "m"), max_sequence_length=128)
    built = spec_from_pipeline(pipe, 128)
    assert folder == built
    assert not spec_from_folder(str(tmp_path / "m"), drop_t5=True).has_t5


def test_loader_fills_modules_in_the_target_dtype(tmp_path):
    from diffusers import SD3Transformer2DModel

    from lava.backends.loading import load_module
    from lava.backends.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline()
    pipe.transformer.to(torch.float16).save_pretrained(tmp_path / "t")
    loaded = load_module(
        SD3Transformer2DModel, tmp_path / "t", dtype=torch.float32, device=torch.device("cpu")
    )
    want = pipe.transformer.state_dict()
    got = loaded.state_dict()
    assert set(got) == set(want)
    for name, value in want.items():
        assert got[name].dtype == torch.float32 and torch.equal(got[name], value.float()), name


def test_cli_dry_run_loads_nothing(tmp_path, capsys, monkeypatch):
    from conftest import scene

    from lava.backends import loading
    from lava.backends.tiny import build_tiny_pipeline

    folder = tmp_path / "m"
    build_tiny_pipeline().save_pretrained(folder)
    path = tmp_path / "a.png"
    scene().save(path)
    out = tmp_path / "out"
    monkeypatch.setattr(loading, "load_module", lambda *a, **k: pytest.fail("weights loaded"))
    args = ["segment", str(path), "--classes", "cat", "--model", str(folder), "--out", str(out), "--dry-run"]
    assert main([*args, "--resolution", "64"]) == 0
    printed = capsys.readouterr().out
    assert "no weights loaded" in printed and "transformer     float32   on cpu" in printed
    assert re.search(r"cpu \(process memory.*\): estimated peak [0-9.]+ [KMG]iB", printed)
    assert not out.exists()
    # A plan for a GPU can be made on a machine without one.
    cuda = ["--device", "cuda", "--offload-text-encoders", "--max-memory", "8GiB", "--resolution", "64"]
    assert main([*args, *cuda]) == 0
    printed = capsys.readouterr().out
    assert (
        "cuda:0 (device memory): estimated peak" in printed and "text_encoder    float32   on cpu" in printed
    )
    assert main([*args, "--max-memory", "1KiB", "--resolution", "64"]) == 1
    assert "does not fit in 1.00 KiB" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["eval", "sweep"])
def test_eval_and_sweep_dry_run(command, tmp_path, capsys):
    args = [command, "--dataset", "voc", "--root", str(tmp_path / "none"), "--model", "tiny-sd3", "--dry-run"]
    if command == "sweep":
        args += ["--timesteps", "500", "--layers", "1,2"]
    assert main([*args, "--out", str(tmp_path / "out")]) == 0
    assert "estimated peak" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()


def test_cli_max_memory_with_a_folder_plans_then_loads_in_place(tmp_path, capsys):
    from conftest import scene

    from lava.backends.tiny import build_tiny_pipeline

    folder = tmp_path / "m"
    build_tiny_pipeline().save_pretrained(folder)
    path = tmp_path / "a.png"
    scene().save(path)
    out = tmp_path / "out"
    args = ["segment", str(path), "--classes", "cat", "--model", str(folder), "--out", str(out)]
    assert main([*args, "--resolution", "64", "--layers", "1", "--max-memory", "4GiB"]) == 0
    err = capsys.readouterr().err
    assert re.search(r"memory plan for 64x\d+ px within 4GiB: estimated peak [0-9.]+ [KMG]iB", err)
    assert (out / "a_labels.png").exists()


def test_a_folder_missing_a_component_fails_before_loading(tmp_path, monkeypatch):
    import shutil

    from lava.backends import loading
    from lava.backends.tiny import build_tiny_pipeline
    from lava.errors import ModelError

    folder = tmp_path / "m"
    build_tiny_pipeline().save_pretrained(folder)
    for f in (folder / "transformer").glob("*.safetensors"):
        f.unlink()
    shutil.rmtree(folder / "text_encoder_2")
    monkeypatch.setattr(loading, "load_module", lambda *a, **k: pytest.fail("loaded before checking"))
    with pytest.raises(ModelError, match=r"lists transformer, text_encoder_2 but those folders hold no"):
        lava.load_backend(str(folder), device="cpu")

"""The memory planner: formula against a measured peak, the order of savings, and refusals."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import lava
from lava.cli import main
from lava.errors import LavaError
from lava.planner import apply_plan, estimate_memory, parse_bytes, plan_memory

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

    from lava.capture import capturing, run_until_captured
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
    size = (256, 256)
    full = estimate_memory(tiny.pipe, size, dtype=torch.float32)
    assert plan_memory(tiny.pipe, size, full.total, dtype=torch.float32) == full
    offloaded = estimate_memory(tiny.pipe, size, dtype=torch.float32, offload_text_encoders=True)
    assert offloaded.total < full.total
    chosen = plan_memory(tiny.pipe, size, offloaded.total, dtype=torch.float32)
    assert chosen.offload_text_encoders and not chosen.drop_t5
    with pytest.raises(LavaError, match=r"does not fit in 1.00 KiB: even with every saving, estimated peak"):
        plan_memory(tiny.pipe, size, 1024, dtype=torch.float32)


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
    assert main([*args, "--max-memory", "1KiB"]) == 1
    err = capsys.readouterr().err
    assert "does not fit in 1.00 KiB" in err and "estimated peak" in err
    assert not out.exists()
    assert main([*args, "--max-memory", "4GiB"]) == 0
    assert "memory plan" in capsys.readouterr().err
    assert (out / "a_labels.png").exists()

"""Backends: registry, variant detection, wrapping a loaded pipeline, and loading errors."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

import lava
from lava.backends.sd3 import DEFAULTS, detect_variant
from lava.errors import ModelError


def _cfg(num_layers, dual=()):
    return SimpleNamespace(
        num_layers=num_layers,
        get=lambda key, default=None: dual if key == "dual_attention_layers" else default,
    )


@pytest.mark.parametrize(
    ("cfg", "hint", "variant"),
    [
        (_cfg(24), "", "sd3-medium"),
        (_cfg(24, tuple(range(13))), "", "sd3.5-medium"),
        (_cfg(38), "stabilityai/stable-diffusion-3.5-large", "sd3.5-large"),
        (_cfg(38), "stabilityai/stable-diffusion-3.5-large-turbo", "sd3.5-large-turbo"),
    ],
)
def test_variant_from_config(cfg, hint, variant):
    assert detect_variant(cfg, hint) == variant
    assert DEFAULTS[variant].source  # every default says where it comes from


def test_sd3_medium_default_is_seg4diff():
    d = DEFAULTS["sd3-medium"]
    assert d.layers == (9,) and d.timestep == pytest.approx(515.07) and "Seg4Diff" in d.source


def test_from_pipeline_wraps_loaded_modules(tiny, image):
    wrapped = lava.from_pipeline(tiny.pipe, max_sequence_length=tiny.max_sequence_length)
    assert wrapped.transformer is tiny.transformer
    assert wrapped.variant == "sd3-medium"  # read from the config: plain joint blocks
    seg = lava.segment(image, ["cat", "dog"], backend=wrapped, layers=[1], resolution=32)
    assert tuple(seg.labels[0].shape) == (40, 56)
    with pytest.raises(ModelError, match="StableDiffusion3Pipeline-like"):
        lava.from_pipeline(object())


def test_tiny35_has_dual_attention_and_qk_norm(tiny35):
    assert tiny35.blocks[0].attn2 is not None and tiny35.blocks[0].attn.norm_q is not None
    assert tiny35.joint_blocks == tuple(range(tiny35.num_blocks))


def test_layout_facts(tiny):
    assert tiny.patch_size == 2 and tiny.vae_scale_factor == 2 and tiny.grid_unit == 4
    assert tiny.text_len == 77 + tiny.max_sequence_length
    assert tiny.max_resolution == tiny.transformer.config.pos_embed_max_size * 4


def test_missing_local_folder_and_offline_hub(monkeypatch, tmp_path):
    with pytest.raises(ModelError, match="model folder not found"):
        lava.load_backend(str(tmp_path / "no-such-model"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError) as caught:
        lava.load_backend("someone/sd3-finetune", device="cpu")
    assert str(caught.value).startswith("someone/sd3-finetune is not in the local Hugging Face cache and ")
    assert "stacktrace" not in str(caught.value)


def test_bad_device_and_dtype():
    with pytest.raises(ModelError, match="unknown dtype"):
        lava.load_backend("tiny-sd3", dtype="float8")
    with pytest.raises(ModelError, match="unknown device"):
        lava.load_backend("tiny-sd3", device="tpu-9")

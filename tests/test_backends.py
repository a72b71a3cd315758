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
    with pytest.raises(ModelError, match="StableDiffusion3Pipeline- or FluxPipeline-like"):
        lava.from_pipeline(object())


def test_tiny35_has_dual_attention_and_qk_norm(tiny35):
    assert tiny35.blocks[0].attn2 is not None and tiny35.blocks[0].attn.norm_q is not None
    assert tiny35.joint_blocks == tuple(range(tiny35.num_blocks))


def test_layout_facts(tiny):
    assert tiny.patch_size == 2 and tiny.vae_scale_factor == 2 and tiny.grid_unit == 4
    assert tiny.text_len == 77 + tiny.max_sequence_length
    assert tiny.max_resolution == tiny.transformer.config.pos_embed_max_size * 4


def test_loading_from_python_is_quiet_unless_asked():
    """Like the ``lava`` command without ``--verbose``: no "Loading weights" bars or library
    warnings, in a fresh process with the libraries at their own defaults."""
    import os
    import subprocess
    import sys

    code = "import sys, lava\nlava.load_backend(sys.argv[1], verbose=sys.argv[2] == 'v')\n"
    env = {k: v for k, v in os.environ.items() if k != "TRANSFORMERS_VERBOSITY"}
    env["OMP_NUM_THREADS"] = "1"
    for name in ("lava-shapes", "tiny-sd3"):
        quiet = subprocess.run(
            [sys.executable, "-c", code, name, "q"], capture_output=True, text=True, env=env
        )
        assert quiet.returncode == 0, quiet.stderr
        assert (quiet.stdout, quiet.stderr) == ("", ""), name
    loud = subprocess.run(
        [sys.executable, "-c", code, "tiny-sd3", "v"], capture_output=True, text=True, env=env
    )
    assert loud.returncode == 0 and "[transformers]" in loud.stderr  # the check above can see chatter


def test_quiet_loading_puts_the_libraries_settings_back(capfd):
    import warnings

    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    libs = (transformers_logging, diffusers_logging)
    before = [(lib.get_verbosity(), lib.is_progress_bar_enabled()) for lib in libs]
    filters = list(warnings.filters)
    try:
        for lib in libs:
            lib.set_verbosity(lib.INFO)
            lib.enable_progress_bar()
        lava.load_backend("lava-shapes")
        assert capfd.readouterr() == ("", "")
        assert [(lib.get_verbosity(), lib.is_progress_bar_enabled()) for lib in libs] == [
            (lib.INFO, True)
        ] * 2
        assert warnings.filters == filters
    finally:
        for lib, (level, bars) in zip(libs, before):
            lib.set_verbosity(level)
            lib.enable_progress_bar() if bars else lib.disable_progress_bar()


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


# ---- a model folder saved without T5 -----------------------------------------------------------------


@pytest.fixture(scope="module")
def t5less_folder(tmp_path_factory):
    """tiny-sd3 without T5, saved with save_pretrained: model_index.json lists text_encoder_3 as null."""
    from lava.backends.tiny import build_tiny_pipeline

    folder = tmp_path_factory.mktemp("t5less") / "model"
    build_tiny_pipeline(t5=False).save_pretrained(folder)
    return folder


def test_model_index_without_t5():
    from lava.backends import lacks_t5

    full = {
        "text_encoder_3": ["transformers", "T5EncoderModel"],
        "tokenizer_3": ["transformers", "T5Tokenizer"],
    }
    assert not lacks_t5(full)
    assert lacks_t5({**full, "text_encoder_3": [None, None]})
    assert lacks_t5({**full, "tokenizer_3": None})
    assert lacks_t5({k: v for k, v in full.items() if k != "text_encoder_3"})
    assert not lacks_t5(None)  # unreadable: from_pretrained reports the problem itself


def test_folder_saved_without_t5_loads_without_drop_t5(t5less_folder, monkeypatch):
    import json

    from diffusers import StableDiffusion3Pipeline

    assert json.loads((t5less_folder / "model_index.json").read_text())["text_encoder_3"] == [None, None]
    asked = {}
    real = StableDiffusion3Pipeline.from_pretrained

    def spying(source, **kw):
        asked.update(kw)
        return real(source, **kw)

    monkeypatch.setattr(StableDiffusion3Pipeline, "from_pretrained", spying)
    backend = lava.load_backend(str(t5less_folder), device="cpu")
    # Detected from model_index.json before loading: from_pretrained is told there is no T5.
    assert asked["text_encoder_3"] is None and asked["tokenizer_3"] is None
    assert not backend.has_t5 and backend.text_encoders == "CLIP"
    assert "model_index.json lists none" in backend.info["no_t5"]
    assert "no T5 in the model" in backend.describe()
    # Asked for explicitly, dropping T5 is not news.
    assert "no_t5" not in lava.load_backend(str(t5less_folder), device="cpu", drop_t5=True).info


def test_cli_runs_a_t5less_folder_and_says_so_once(t5less_folder, tmp_path, capsys):
    from conftest import scene

    from lava.cli import main

    image = tmp_path / "img.png"
    scene().save(image)
    args = ["segment", str(image), "--classes", "cat,dog", "--model", str(t5less_folder), "--layers", "1"]
    assert main([*args, "--resolution", "32", "--out", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert err.count("has no T5 text encoder (its model_index.json lists none): running with the CLIP") == 1
    assert "as with --drop-t5" in err and "error" not in err
    assert (tmp_path / "out" / "img_labels.png").exists()

"""The reference model's tooling (scripts/, not shipped): the shape probe that gates training pilots,
the VAE trainer and the latent-space transformer trainer, on a handful of scenes."""

from __future__ import annotations

import json

import numpy as np
import torch

from lava.reference.model import ASSET_DIR, ReferenceConfig
from scripts.probe import interior_tokens, load_model, probe


def test_probe_runs_on_a_handful_of_scenes():
    pipe, encode = load_model(ASSET_DIR)
    results = probe(pipe, encode, scenes=8)
    assert [r.block for r in results] == list(range(len(pipe.transformer.transformer_blocks)))
    for r in results:
        assert 0.0 <= r.accuracy <= 1.0 and 0.0 <= r.chance <= 1.0
        assert r.tokens > 0 and 0 <= r.interior_tokens <= r.tokens


def test_probe_at_initialisation_reinitialises_the_transformer_only():
    trained, _ = load_model(ASSET_DIR)
    fresh, _ = load_model(ASSET_DIR, init=True)
    a = dict(trained.transformer.named_parameters())
    b = dict(fresh.transformer.named_parameters())
    assert any(not torch.equal(a[k], b[k]) for k in a)
    enc_a = dict(trained.text_encoder.named_parameters())
    assert all(torch.equal(v, dict(fresh.text_encoder.named_parameters())[k]) for k, v in enc_a.items())


def test_interior_tokens_need_their_block_and_a_one_pixel_border_on_one_object():
    objects = np.zeros((8, 8), np.uint8)
    objects[0:6, 0:6] = 1  # tokens of 2x2 px; the object covers tokens (0..2, 0..2)
    inside = interior_tokens(objects, 4)
    assert inside[1, 1]  # its block and its border (pixels 1..4) all on the object
    assert not inside[0, 0]  # its border leaves the image
    assert not inside[2, 2] and not inside[1, 2]  # its border reaches pixel 6, off the object
    assert not inside[3, 3]  # background


def test_vae_and_latent_transformer_train_resume_and_load_as_a_stock_pipeline(tmp_path):
    from diffusers import StableDiffusion3Pipeline

    import lava
    from scripts.train import TrainConfig, train
    from scripts.train_vae import VaeConfig, build_vae

    vae = build_vae(VaeConfig())
    vae.register_to_config(shift_factor=0.1, scaling_factor=2.0)
    vae.save_pretrained(tmp_path / "vae")
    cfg = TrainConfig(steps=2, batch_size=2, warmup=1, vae=str(tmp_path / "vae"), shape_head=0.5)
    model = ReferenceConfig(resolution=64, patch_size=1)
    out = tmp_path / "model"
    train(str(out), cfg, model, threads=1, save_every=1)
    meta = train(str(out), TrainConfig(**{**cfg.__dict__, "steps": 3}), model, threads=1, resume=True)
    assert meta["steps_done"] == 3
    saved = json.loads((out / "lava-shapes.json").read_text())
    assert saved["model"]["latent_channels"] == 4 and saved["model"]["vae_factor"] == 4
    pipe = StableDiffusion3Pipeline.from_pretrained(out, text_encoder_3=None, tokenizer_3=None)
    image = pipe(
        "a red circle", num_inference_steps=2, guidance_scale=1.0, max_sequence_length=8, output_type="pil"
    ).images[0]
    assert image.size == (64, 64)
    backend = lava.load_backend(str(out), max_sequence_length=8)
    noisy = lava.noise(backend, image)
    assert noisy.latents.shape[1] == 4 and noisy.grid == (16, 16)  # through the VAE, 4x down

"""The five stages: each alone, composed, and on bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import scene
from PIL import Image

import lava
from lava.errors import ImageError, LavaError, ModelError

CLASSES = ["cat", "potted plant", "hydrant"]


def test_segment_equals_stages_by_hand(tiny, image):
    seg = lava.segment(image, CLASSES, backend=tiny, timestep=300, layers=[1, 3], seed=5)

    noisy = lava.noise(tiny, image, timestep=300, seed=5)
    prompt = lava.encode_prompt(tiny, CLASSES)
    slices = lava.capture(tiny, noisy, prompt, layers=[1, 3])
    heat = lava.aggregate(slices, prompt)
    by_hand = lava.to_mask(heat)

    assert seg.classes == by_hand.classes == tuple(CLASSES)
    assert torch.equal(seg.labels[0], by_hand.labels[0])
    torch.testing.assert_close(seg.scores[0], by_hand.scores[0])


def test_noise_is_flow_matching_interpolation(tiny, image):
    noisy = lava.noise(tiny, image, sigma=0.3, seed=1)
    assert noisy.timestep == pytest.approx(300.0)
    torch.testing.assert_close(noisy.latents, 0.7 * noisy.clean + 0.3 * noisy.noise)
    again = lava.noise(tiny, image, sigma=0.3, seed=1)
    assert torch.equal(again.latents, noisy.latents)
    assert not torch.equal(lava.noise(tiny, image, sigma=0.3, seed=2).latents, noisy.latents)


def test_clean_latent_uses_vae_scaling_and_shift(tiny, image):
    noisy = lava.noise(tiny, image, timestep=0)
    cfg = tiny.vae.config
    from diffusers.image_processor import VaeImageProcessor

    px = VaeImageProcessor(vae_scale_factor=tiny.vae_scale_factor).preprocess(image, *noisy.input_size)
    mean = tiny.vae.encode(px).latent_dist.mean
    torch.testing.assert_close(noisy.clean, (mean - cfg.shift_factor) * cfg.scaling_factor)


def test_timestep_for_step_uses_scheduler_shift(tiny):
    # Seg4Diff's SD3-medium setting: timesteps[-8] of a 28-step schedule with shift 3.
    assert tiny.timestep_for_step(-8, 28) == pytest.approx(515.07, abs=0.01)
    assert tiny.sigma_for_timestep(515.07) == pytest.approx(0.51507)


def test_batch_result_does_not_depend_on_batching(tiny):
    imgs = [scene(seed=1), scene(seed=2), scene(h=30, w=30, seed=3)]
    one = lava.segment(imgs, CLASSES, backend=tiny, batch_size=1)
    many = lava.segment(imgs, CLASSES, backend=tiny, batch_size=3)
    for a, b in zip(one.scores, many.scores):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert [tuple(lab.shape) for lab in many.labels] == [(40, 56), (40, 56), (30, 30)]


@pytest.mark.parametrize("size", [(37, 53), (31, 31), (100, 7)])
def test_any_size_maps_back_exactly(tiny, size):
    img = scene(*size)
    seg = lava.segment(img, CLASSES, backend=tiny)
    assert tuple(seg.labels[0].shape) == size
    assert tuple(seg.scores[0].shape) == (len(CLASSES), *size)
    assert seg.labels[0].dtype == torch.uint8
    noisy = lava.noise(tiny, img)
    assert all(s % tiny.grid_unit == 0 for s in noisy.input_size)


@pytest.mark.parametrize("mode", ["RGBA", "P", "L", "LA", "I;16", "1", "CMYK"])
def test_image_modes_are_converted(tiny, mode, tmp_path):
    rgb = scene()
    if mode == "I;16":
        img = Image.fromarray(np.asarray(rgb.convert("L"), dtype=np.uint16) * 250)
        assert img.mode == "I;16"
    else:
        img = rgb.convert(mode)
    path = tmp_path / ("x.tif" if mode == "CMYK" else "x.png")
    img.save(path)
    loaded = lava.load_image(path)
    assert loaded.mode == "RGB" and loaded.size == rgb.size
    seg = lava.segment(path, CLASSES, backend=tiny)
    assert tuple(seg.labels[0].shape) == (40, 56)


def test_sixteen_bit_range_is_rescaled_not_clipped():
    arr = np.linspace(0, 65535, 64, dtype=np.uint16).reshape(8, 8)
    out = np.asarray(lava.load_image(Image.fromarray(arr)))
    assert out.min() == 0 and out.max() == 255


def test_unreadable_files(tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(ImageError, match=r"cannot read .*notes.png as an image"):
        lava.load_image(text)
    with pytest.raises(ImageError, match="not found"):
        lava.load_image(tmp_path / "missing.jpg")
    with pytest.raises(ImageError, match="directory"):
        lava.load_image(tmp_path)


def test_too_large_for_position_embedding(tiny, image):
    limit = tiny.max_resolution
    lava.noise(tiny, image, resolution=limit)
    with pytest.raises(ImageError, match=f"at most {limit} px"):
        lava.noise(tiny, image, resolution=limit + 64)
    with pytest.raises(ImageError, match=f"at most {limit} px"):
        lava.noise(tiny, scene(300, 20), resolution="original")


@pytest.mark.parametrize("t", [-1, 1000, 1e6])
def test_timestep_out_of_range(tiny, image, t):
    with pytest.raises(LavaError, match=r"timestep must be in \[0, 1000\)"):
        lava.noise(tiny, image, timestep=t)


def test_sigma_and_timestep_together(tiny, image):
    with pytest.raises(LavaError, match="either timestep or sigma"):
        lava.noise(tiny, image, timestep=3, sigma=0.1)


@pytest.mark.parametrize("layers", [[4], [-5], []])
def test_layer_out_of_range(tiny, image, layers):
    with pytest.raises(LavaError, match=r"out of range|at least one"):
        lava.segment(image, CLASSES, backend=tiny, layers=layers)


def test_negative_layer_counts_from_end(tiny):
    assert tiny.check_layers([-1, 0]) == (0, tiny.num_blocks - 1)


def test_unknown_model():
    with pytest.raises(ModelError, match="unknown model 'sd9-ultra'"):
        lava.load_backend("sd9-ultra")


def test_aggregate_options(tiny, image):
    noisy = lava.noise(tiny, image)
    prompt = lava.encode_prompt(tiny, CLASSES)
    slices = lava.capture(tiny, noisy, prompt, layers=[0, 2])
    mm = lava.aggregate(slices, prompt)
    assert mm.scores.shape == (1, 3, *noisy.grid)
    flat = mm.scores.flatten(2)
    torch.testing.assert_close(flat.amax(-1), torch.ones(1, 3))
    torch.testing.assert_close(flat.amin(-1), torch.zeros(1, 3))
    cls = lava.aggregate(slices, prompt, normalize="classes")
    torch.testing.assert_close(cls.scores.sum(1), torch.ones(1, *noisy.grid))
    raw = lava.aggregate(slices, prompt, normalize="none", layers=(2,), tokens="clip")
    idx = slices.column_indices(prompt.clip_spans["hydrant"])
    want = slices.maps[2][0, 0][:, idx].mean(-1).view(noisy.grid)
    torch.testing.assert_close(raw.scores[0, 2], want)
    with pytest.raises(LavaError, match="not captured"):
        lava.aggregate(slices, prompt, layers=(1,))
    two = lava.aggregate([slices, slices], prompt, normalize="none")
    torch.testing.assert_close(two.scores, lava.aggregate(slices, prompt, normalize="none").scores)


def test_background_threshold(tiny, image):
    seg = lava.segment(image, CLASSES, backend=tiny, mask_config=lava.MaskConfig(background_threshold=0.7))
    assert seg.classes == ("background", *CLASSES)
    best = seg.scores[0].max(0).values
    assert torch.equal(seg.labels[0] == 0, best < 0.7)


def test_overlay_and_label_image(tiny, image):
    seg = lava.segment(image, CLASSES, backend=tiny)
    ov = seg.overlay()
    assert ov.size == image.size and ov.mode == "RGB"
    lab = seg.label_image()
    assert lab.mode == "P" and np.array_equal(np.asarray(lab), seg.labels[0].numpy())

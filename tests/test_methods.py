"""Comparison methods (MaskCLIP, StableSeg-style UNet cross-attention) against explicit
recomputations from their own weights, on the tiny offline models."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from lava.errors import LavaError
from lava.methods.maskclip import (
    IMAGENET_TEMPLATES,
    dense_features,
    slide_scores,
    text_embeddings,
    window_scores,
    window_starts,
)
from lava.methods.tiny import build_tiny_clip


@pytest.fixture(scope="module")
def clip64():
    model, tok = build_tiny_clip(seed=3)
    return model.double(), tok


def _layer_norm(x, sd, prefix, eps):
    return F.layer_norm(x, x.shape[-1:], sd[f"{prefix}.weight"], sd[f"{prefix}.bias"], eps)


def _linear(x, sd, prefix):
    return x @ sd[f"{prefix}.weight"].T + sd[f"{prefix}.bias"]


def _explicit_maskclip(model, pixels):
    """MaskCLIP's dense features written out from the state dict: patch conv, class token,
    bicubic-resized position embeddings, pre-norm, full blocks, then the last block's value path
    (v + residual, MLP), post-norm and projection."""
    cfg = model.config.vision_config
    sd = {k: v for k, v in model.state_dict().items()}
    eps, heads, patch = cfg.layer_norm_eps, cfg.num_attention_heads, cfg.patch_size
    vm = "vision_model"
    x = F.conv2d(pixels, sd[f"{vm}.embeddings.patch_embedding.weight"], stride=patch)
    h, w = x.shape[-2:]
    x = x.flatten(2).transpose(1, 2)
    pos = sd[f"{vm}.embeddings.position_embedding.weight"]
    side = math.isqrt(pos.shape[0] - 1)
    grid = pos[1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
    if (h, w) != (side, side):
        grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
    pos = torch.cat([pos[:1], grid.flatten(2).transpose(1, 2)[0]])
    cls = sd[f"{vm}.embeddings.class_embedding"].expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], 1) + pos
    x = _layer_norm(x, sd, f"{vm}.pre_layrnorm", eps)

    def mlp(y, p):
        y = _linear(y, sd, f"{p}.mlp.fc1")
        return _linear(y * torch.sigmoid(1.702 * y), sd, f"{p}.mlp.fc2")  # quick GELU

    n = cfg.num_hidden_layers
    for i in range(n - 1):
        p = f"{vm}.encoder.layers.{i}"
        y = _layer_norm(x, sd, f"{p}.layer_norm1", eps)
        q, k, v = (_linear(y, sd, f"{p}.self_attn.{m}_proj") for m in "qkv")
        split = lambda t: t.view(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)  # noqa: E731
        q, k, v = split(q), split(k), split(v)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), -1) @ v
        x = x + _linear(att.transpose(1, 2).reshape(x.shape), sd, f"{p}.self_attn.out_proj")
        x = x + mlp(_layer_norm(x, sd, f"{p}.layer_norm2", eps), p)
    p = f"{vm}.encoder.layers.{n - 1}"
    v = _linear(_layer_norm(x, sd, f"{p}.layer_norm1", eps), sd, f"{p}.self_attn.v_proj")
    v = x + _linear(v, sd, f"{p}.self_attn.out_proj")
    v = v + mlp(_layer_norm(v, sd, f"{p}.layer_norm2", eps), p)
    v = _layer_norm(v[:, 1:], sd, f"{vm}.post_layernorm", eps) @ sd["visual_projection.weight"].T
    return v.transpose(1, 2).reshape(v.shape[0], -1, h, w)


@pytest.mark.parametrize("size", [(32, 32), (24, 40)])
def test_maskclip_dense_features_equal_explicit_recomputation(clip64, size):
    model, _ = clip64
    pixels = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got = dense_features(model, pixels)
    want = _explicit_maskclip(model, pixels)
    assert got.shape == (2, model.config.projection_dim, size[0] // 8, size[1] // 8)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    # And it is not the ordinary last block (the query-key attention really is skipped).
    full = model.vision_model(pixel_values=pixels, interpolate_pos_encoding=True).last_hidden_state
    ordinary = model.visual_projection(model.vision_model.post_layernorm(full[:, 1:]))
    assert not torch.allclose(ordinary.transpose(1, 2).reshape(got.shape), got)


def test_maskclip_text_embeddings_are_the_template_ensemble(clip64):
    model, tok = clip64
    got = text_embeddings(model, tok, ["cat", "potted plant"])
    assert len(IMAGENET_TEMPLATES) == 80 == len(set(IMAGENET_TEMPLATES))
    for row, name in zip(got, ["cat", "potted plant"]):
        ids = tok(
            [t.format(name) for t in IMAGENET_TEMPLATES],
            padding="max_length",
            max_length=77,
            return_tensors="pt",
        )
        out = model.text_model(**ids).pooler_output @ model.text_projection.weight.T
        each = out / out.norm(dim=-1, keepdim=True)
        mean = each.mean(0)
        torch.testing.assert_close(row.double(), mean / mean.norm(), rtol=1e-6, atol=1e-6)


def test_window_starts_follow_mmseg_slide():
    assert window_starts(48, 32, 16) == [0, 16]
    assert window_starts(50, 32, 16) == [0, 16, 18]  # the last window ends at the border
    assert window_starts(20, 32, 16) == [0]


def test_slide_scores_average_every_covering_window(clip64):
    model, tok = clip64
    text = text_embeddings(model, tok, ["cat", "dog"]).double()
    pixels = torch.randn(1, 3, 32, 56, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    got = slide_scores(model, pixels, text, window=32, stride=16)
    starts = window_starts(56, 32, 16)  # [0, 16, 24]
    total = torch.zeros(2, 32, 56, dtype=torch.float64)
    count = torch.zeros(1, 32, 56, dtype=torch.float64)
    for x in starts:
        feats = dense_features(model, pixels[..., x : x + 32])[0]
        cos = torch.einsum("dhw,cd->chw", feats / feats.norm(dim=0, keepdim=True), text)
        total[:, :, x : x + 32] += F.interpolate(
            cos[None], size=(32, 32), mode="bilinear", align_corners=False
        )[0]
        count[:, :, x : x + 32] += 1
    torch.testing.assert_close(got.double(), total / count, rtol=1e-6, atol=1e-6)
    # A window smaller than the patch grid is padded and cropped back, not refused.
    assert window_scores(model, pixels[..., :20, :30], text).shape == (2, 20, 30)


def test_maskclip_segmenter_refuses_a_timestep_or_other_blocks():
    from lava.methods import load_segmenter

    seg = load_segmenter("maskclip", "tiny-clip")
    with pytest.raises(LavaError, match="reads no diffusion timestep"):
        seg.check_timestep(500)
    with pytest.raises(LavaError, match="reads the last vision block only"):
        seg.check_layers([0])
    image = Image.fromarray(np.full((16, 24, 3), 120, dtype=np.uint8))
    heat = seg.heatmaps(image, ["cat", "dog"])[0]
    assert heat.scores.shape == (1, 2, 32, 48) and heat.image_sizes == ((16, 24),)


# ---- StableSeg-style UNet cross-attention ------------------------------------------------------


@pytest.fixture(scope="module")
def sd15():
    from lava.methods import load_segmenter

    return load_segmenter("stableseg", "tiny-sd15", dtype=torch.float64)


def _unet_inputs(seg, rows: int = 2):
    gen = torch.Generator().manual_seed(5)
    latents = torch.randn(1, 4, 8, 12, generator=gen, dtype=torch.float64)
    prompt = seg.encode_prompt(["cat", "dog", "potted plant", "hydrant"], max_classes_per_prompt=2)
    assert prompt.embeds.shape[0] == rows
    return latents, prompt


def test_unet_capture_equals_explicit_softmax_of_the_layers_own_q_k(sd15):
    from lava.methods.stableseg import cross_attention_layers

    latents, prompt = _unet_inputs(sd15)
    layers = cross_attention_layers(sd15.unet)
    seen: dict[tuple[int, str], torch.Tensor] = {}
    hooks = [
        getattr(module, proj).register_forward_hook(
            lambda _m, _i, out, key=(i, proj): seen.__setitem__(key, out.detach())
        )
        for i, (_, module) in enumerate(layers)
        for proj in ("to_q", "to_k")
    ]
    try:
        maps = sd15.capture(latents, 100, prompt, layers=range(len(layers)))
    finally:
        for h in hooks:
            h.remove()
    assert sorted(maps) == list(range(len(layers))) == [0, 1, 2, 3]
    cols = list(prompt.columns)
    for i, (_, module) in enumerate(layers):
        heads = module.heads
        q = seen[(i, "to_q")].unflatten(-1, (heads, -1)).transpose(1, 2)  # [P, H, N, d]
        k = seen[(i, "to_k")].unflatten(-1, (heads, -1)).transpose(1, 2)  # [P, H, 77, d]
        assert k.shape[2] == 77
        probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
        assert maps[i].shape == (2, heads, q.shape[2], len(cols))
        torch.testing.assert_close(maps[i].double(), probs[..., cols], rtol=1e-6, atol=1e-7)


def test_unet_output_unchanged_and_processors_restored(sd15):
    latents, prompt = _unet_inputs(sd15)
    unet = sd15.unet
    before = {n: type(p) for n, p in unet.attn_processors.items()}
    rows = prompt.embeds.shape[0]
    plain = unet(latents.expand(rows, -1, -1, -1), 100, encoder_hidden_states=prompt.embeds).sample
    from lava.methods.stableseg import capturing_cross_attention

    with capturing_cross_attention(unet, [0, 2], prompt.columns) as store:
        seen = unet(latents.expand(rows, -1, -1, -1), 100, encoder_hidden_states=prompt.embeds).sample
    assert sorted(store) == [0, 2]
    torch.testing.assert_close(seen, plain, rtol=1e-10, atol=1e-10)
    assert {n: type(p) for n, p in unet.attn_processors.items()} == before
    with pytest.raises(RuntimeError, match="boom"), capturing_cross_attention(unet, [1], prompt.columns):
        raise RuntimeError("boom")
    assert {n: type(p) for n, p in unet.attn_processors.items()} == before


def test_unet_class_maps_average_tokens_heads_and_layers_daam_style(sd15):
    latents, prompt = _unet_inputs(sd15)
    maps = sd15.capture(latents, 100, prompt, layers=[0, 1])
    got = sd15.class_maps(maps, prompt, [0, 1], (8, 12))
    cols = list(prompt.columns)
    grids = {0: (8, 12), 1: (4, 6)}  # the first down block's grid, then the mid block's
    want = []
    for c in prompt.classes:
        idx = [cols.index(p) for p in prompt.spans[c]]
        per = []
        for layer in (0, 1):
            m = maps[layer][prompt.rows[c]].mean(0)[:, idx].mean(-1).view(1, 1, *grids[layer])
            per.append(F.interpolate(m, size=(8, 12), mode="bicubic", align_corners=False)[0, 0].clamp_min(0))
        want.append(torch.stack(per).mean(0))
    torch.testing.assert_close(got, torch.stack(want))
    assert prompt.spans["potted plant"] == (1, 2, 3, 4)  # both words, split into several tokens


def test_unet_noise_is_the_schedulers_add_noise(sd15):
    image = Image.fromarray(np.full((16, 24, 3), 90, dtype=np.uint8))
    got = sd15.noisy_latents(image, 300, seed=4)
    assert got.shape == (1, 4, 10, 16)  # 20x32 px (multiples of 4 px), VAE factor 2
    again = sd15.noisy_latents(image, 300, seed=4)
    torch.testing.assert_close(got, again, rtol=0, atol=0)
    with pytest.raises(LavaError, match="whole number"):
        sd15.check_timestep(12.5)
    with pytest.raises(LavaError, match="out of range: tiny-sd15 has 4 cross-attention layers"):
        sd15.check_layers([4])


def test_maskclip_text_cache_is_per_name_and_order_free():
    from lava.methods import load_segmenter

    seg = load_segmenter("maskclip", "tiny-clip")
    first = seg.class_embeddings(["cat", "dog"])
    again = seg.class_embeddings(["dog", "sofa", "cat"])
    fresh = text_embeddings(seg.model, seg.tokenizer, ["dog", "sofa", "cat"])
    torch.testing.assert_close(again, fresh)
    torch.testing.assert_close(again[[2, 0]], first)

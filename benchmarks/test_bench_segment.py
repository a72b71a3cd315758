"""End to end: captured vs uncaptured forward, and the saving from early exit.

On CPU this runs ``tiny-sd3`` and ``tiny-flux``; on CUDA random-weight transformers with the real
architectures instead: SD3-medium (24 blocks, 24 heads × 64, 1024 px → 4096 image tokens + 333
text tokens) and FLUX.1-dev (19 double- + 38 single-stream blocks, 24 heads × 128, 1024 px →
4096 image tokens + 512 T5 tokens): timing needs the shapes, not the weights.
"""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, ON_CUDA
from full_size import TRANSFORMER as SD3_MEDIUM
from memprobe import peak_bytes

import lava
from lava.backends.family import family_of
from lava.stages.capture import capturing, run_until_captured
from lava.types import CapturePlan


def _sd3_medium_inputs():
    from diffusers import SD3Transformer2DModel

    with torch.device(DEVICE):
        model = SD3Transformer2DModel(**SD3_MEDIUM).to(torch.bfloat16).eval()
    gen = torch.Generator(device="cpu").manual_seed(0)
    inputs = dict(
        hidden_states=torch.randn(1, 16, 128, 128, generator=gen),
        encoder_hidden_states=torch.randn(1, 333, 4096, generator=gen),
        pooled_projections=torch.randn(1, 2048, generator=gen),
        timestep=torch.tensor([515.0]),
    )
    return model, {k: v.to(DEVICE, torch.bfloat16) for k, v in inputs.items()}


FLUX_DEV = dict(
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)


def _flux_dev_inputs():
    from diffusers import FluxTransformer2DModel

    # 12B parameters: built in bf16 directly (an fp32 build first would need 48 GB more).
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(DEVICE):
            model = FluxTransformer2DModel(**FLUX_DEV).eval()
    finally:
        torch.set_default_dtype(default)
    gen = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.zeros(64, 64, 3)
    ids[..., 1], ids[..., 2] = torch.arange(64)[:, None], torch.arange(64)[None, :]
    inputs = dict(
        hidden_states=torch.randn(1, 4096, 64, generator=gen),
        encoder_hidden_states=torch.randn(1, 512, 4096, generator=gen),
        pooled_projections=torch.randn(1, 768, generator=gen),
        timestep=torch.tensor([0.23168]),
        guidance=torch.tensor([3.5]),
        img_ids=ids.reshape(-1, 3),
        txt_ids=torch.zeros(512, 3),
    )
    return model, {k: v.to(DEVICE, torch.bfloat16) for k, v in inputs.items()}


@pytest.fixture(scope="module", params=["sd3", "flux"])
def model_and_inputs(request):
    if ON_CUDA:
        if request.param == "flux":
            return "flux-dev-random", *_flux_dev_inputs()
        return "sd3-medium-random", *_sd3_medium_inputs()
    name = f"tiny-{request.param}"
    backend = lava.load_backend(name, device=DEVICE)
    noisy = lava.noise(backend, torch.zeros(32, 32, 3, dtype=torch.uint8).numpy())
    prompt = lava.encode_prompt(backend, ["cat", "dog", "potted plant"])
    from lava.stages.capture import transformer_inputs

    return name, backend.transformer, transformer_inputs(backend, noisy, prompt)


CASES = [("uncaptured", None), ("captured-all-layers", "all")] + [
    (f"early-exit-{frac}", frac) for frac in ("quarter", "half", "last")
]


@pytest.mark.parametrize(("case", "layers"), CASES, ids=[c for c, _ in CASES])
@torch.no_grad()
def test_forward(benchmark, model_and_inputs, case, layers):
    name, model, inputs = model_and_inputs
    n = len(family_of(model).blocks(model))  # Flux: double- then single-stream blocks
    if layers is None:

        def fn():
            return model(**inputs, return_dict=False)[0]
    else:
        # SD3-medium: blocks 6 / 12 / 24 of 24 (indices 5 / 11 / 23); FLUX.1: 14 / 28 / 57 of 57.
        chosen = (
            tuple(range(n))
            if layers == "all"
            else ({"quarter": n // 4, "half": n // 2, "last": n}[layers] - 1,)
        )
        plan = CapturePlan(layers=chosen, columns=tuple(range(20)), early_exit=layers != "all")

        def fn():
            with capturing(model, plan):
                return run_until_captured(model, **inputs)

    peak, _ = peak_bytes(fn, DEVICE)
    benchmark.extra_info.update(model=name, device=DEVICE, case=case, peak_extra_bytes=peak)
    benchmark.pedantic(fn, rounds=3, iterations=1, warmup_rounds=1)

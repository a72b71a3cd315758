"""Memory planning for high-resolution segmentation on a budget.

The peak of one ``segment`` call on the compute device is estimated as

    peak = weights + max(vae_activations, text_activations, transformer_activations + slices)

because the VAE encode, the text encoders and the transformer pass run one after the other:

* ``weights``: bytes of every parameter resident on the device (text encoders count only when
  not offloaded, T5 only when loaded);
* ``transformer_activations = B · N · d · e · 12``: N = image + text tokens, d = width, e =
  bytes per element. Inside one joint block ~12 ``[N, d]``-sized tensors live at once (residual
  streams, norms, q/k/v, attention output, the 4d-wide MLP hidden layer and its activation).
  Flash attention and lava's slice op add nothing of size N²;
* ``vae_activations = B · H · W · c₀ · e · 6``: the VAE encoder's first stage (c₀ = 128 channels
  in SD3's VAE) at full resolution holds ~6 such maps at once; with tiling, ``H · W`` is one
  tile's;
* ``text_activations``: small (77 + 256 tokens), bounded by ``B · 333 · 4096 · e · 16``;
* ``slices = L · B · h · N_img · K · 4``: float32 slices kept for ``L`` captured blocks, ``h`` =
  1 when heads are averaged, plus one per-head buffer while a block is captured.

``plan_memory`` tries, in order, what lowers the peak without changing results — offloading the
text encoders to the CPU, then VAE tiling — then what changes them — dropping T5 — and refuses
with the estimate when nothing fits. ``benchmarks/planner_check.py`` compares the transformer
term with measured peaks (docs/benchmarks.md).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from .errors import LavaError

TRANSFORMER_FACTOR = 12
VAE_FACTOR = 6
VAE_TILE_PX = 512


def parse_bytes(text: str | int | float) -> int:
    """``"8GiB"``, ``"8G"``, ``"1500MB"``, ``"750M"`` or a plain number of bytes."""
    if isinstance(text, (int, float)):
        return int(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]?)(i?[bB])?\s*", str(text))
    if not m:
        raise LavaError(f"cannot read memory size {text!r}: expected e.g. 8GiB, 12G or 1500MB")
    power = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}[m.group(2).lower()]
    return int(float(m.group(1)) * 1024**power)


def fmt_bytes(n: float, digits: int = 2) -> str:
    """``n`` bytes in the largest binary unit it reaches, e.g. ``"1.50 GiB"``."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.{digits}f} {unit}"
    return f"{n:.0f} B"


def param_count(module) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


@dataclass(frozen=True)
class MemoryPlan:
    """An estimate of the peak, and the choices that produced it."""

    weights: int
    transformer_activations: int
    vae_activations: int
    text_activations: int
    slices: int
    offload_text_encoders: bool = False
    drop_t5: bool = False
    vae_tiling: bool = False

    @property
    def total(self) -> int:
        return self.weights + max(
            self.vae_activations, self.text_activations, self.transformer_activations + self.slices
        )

    def describe(self) -> str:
        choices = [
            n
            for n, on in (
                ("text encoders on CPU", self.offload_text_encoders),
                ("T5 dropped", self.drop_t5),
                ("VAE tiling", self.vae_tiling),
            )
            if on
        ]
        return (
            f"estimated peak {fmt_bytes(self.total)} = weights {fmt_bytes(self.weights)} + max(VAE "
            f"{fmt_bytes(self.vae_activations)}, text {fmt_bytes(self.text_activations)}, transformer "
            f"{fmt_bytes(self.transformer_activations)} + slices {fmt_bytes(self.slices)})"
            + (f" with {', '.join(choices)}" if choices else "")
        )


def estimate_memory(
    pipe,
    size: tuple[int, int],
    *,
    dtype: torch.dtype,
    batch: int = 1,
    captured_layers: int = 1,
    columns: int = 32,
    heads_kept: bool = False,
    text_tokens: int | None = None,
    offload_text_encoders: bool = False,
    drop_t5: bool = False,
    vae_tiling: bool = False,
) -> MemoryPlan:
    """Estimate the peak device memory of segmenting ``batch`` images of ``size = (H, W)`` px.

    ``pipe`` is a ``StableDiffusion3Pipeline`` (on any device: only parameter counts are read).
    """
    e = torch.empty((), dtype=dtype).element_size()
    cfg = pipe.transformer.config
    width = cfg.num_attention_heads * cfg.attention_head_dim
    vae = pipe.vae
    factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
    n_img = (size[0] // (factor * cfg.patch_size)) * (size[1] // (factor * cfg.patch_size))
    clip_len = pipe.tokenizer.model_max_length
    t = text_tokens if text_tokens is not None else clip_len + 256
    has_t5 = getattr(pipe, "text_encoder_3", None) is not None and not drop_t5

    # Weights are cast to the compute dtype when placed on the device.
    on_device = [pipe.transformer, vae]
    if not offload_text_encoders:
        on_device += [pipe.text_encoder, pipe.text_encoder_2] + ([pipe.text_encoder_3] if has_t5 else [])
    weights = sum(param_count(m) for m in on_device) * e

    transformer = batch * (n_img + t) * width * e * TRANSFORMER_FACTOR
    if vae is not None:
        c0 = vae.config.block_out_channels[0]
        h, w = (min(size[0], VAE_TILE_PX), min(size[1], VAE_TILE_PX)) if vae_tiling else size
        vae_act = batch * h * w * c0 * e * VAE_FACTOR
    else:
        vae_act = batch * size[0] * size[1] * 3 * e
    text_dim = max(cfg.joint_attention_dim, 1)
    text_act = 0 if offload_text_encoders else batch * t * text_dim * e * TRANSFORMER_FACTOR
    heads = cfg.num_attention_heads
    kept = heads if heads_kept else 1
    slices = batch * n_img * columns * 4 * (captured_layers * kept + heads)
    return MemoryPlan(
        weights=int(weights),
        transformer_activations=int(transformer),
        vae_activations=int(vae_act),
        text_activations=int(text_act),
        slices=int(slices),
        offload_text_encoders=offload_text_encoders,
        drop_t5=drop_t5 and getattr(pipe, "text_encoder_3", None) is not None,
        vae_tiling=vae_tiling,
    )


def plan_memory(pipe, size: tuple[int, int], budget: int, **kw) -> MemoryPlan:
    """The first plan whose estimate fits ``budget`` bytes; raises with the estimate if none does.

    Tried in order: as asked; text encoders on the CPU; plus VAE tiling; plus T5 dropped (this
    one changes the prompt embedding, so it is last).
    """
    step = estimate_memory(pipe, size, **kw)
    candidates = [step]
    for change in ({"offload_text_encoders": True}, {"vae_tiling": True}, {"drop_t5": True}):
        opts = {
            **kw,
            "offload_text_encoders": step.offload_text_encoders,
            "vae_tiling": step.vae_tiling,
            "drop_t5": step.drop_t5,
            **change,
        }
        step = estimate_memory(pipe, size, **opts)
        candidates.append(step)
    for cand in candidates:
        if cand.total <= budget:
            return cand
    best = candidates[-1]
    raise LavaError(
        f"segmenting {size[1]}x{size[0]} px does not fit in {fmt_bytes(budget)}: even with every saving, "
        f"{best.describe()}; lower --resolution or raise --max-memory"
    )


def apply_plan(backend, plan: MemoryPlan, *, device, dtype):
    """A backend placed on ``device`` as ``plan`` says (its modules are reused, not copied)."""
    from dataclasses import replace as dc_replace

    from .backends import place

    pipe = backend.pipe
    if plan.drop_t5:
        pipe.text_encoder_3 = None
        pipe.tokenizer_3 = None
    if plan.vae_tiling and pipe.vae is not None:
        pipe.vae.enable_tiling()
    placed = place(backend, device=device, dtype=dtype, offload_text_encoders=plan.offload_text_encoders)
    return dc_replace(placed, info={**placed.info, "memory_plan": plan.describe()})

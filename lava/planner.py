"""Memory planning: what goes on which device in which dtype, and the peak of each memory.

The plan is made from the model's configs alone (``ModelSpec``: parameter counts from the
safetensors headers or from modules built without storage), so ``lava segment --dry-run`` and
``--max-memory`` decide before any weights load, and the model is then loaded straight into the
planned dtype and device (``lava/backends/loading.py``).

Placement. The transformer and the VAE run on the compute device in the compute dtype; the text
encoders run there too, or on the CPU when offloaded, and on the CPU they are always float32
(``backends.text_dtype``). On a CPU run every module shares one memory, the process's RAM:
"offloading" the text encoders moves nothing and saves nothing there. On CUDA the device memory
holds the transformer, the VAE and the text encoders that are not offloaded; the process's RAM
holds the offloaded encoders.

The peak of one memory is

    peak = base + weights + max(loading, text, VAE, transformer + slices)

because the load, the text encoders, the VAE encode and the transformer pass happen one after
the other:

* ``base``: what the process holds besides weights and activations: 0.5 GiB after importing
  Python, torch, diffusers and transformers, plus 0.4 GiB that the full-size CPU runs held beyond
  the modelled terms (allocator slack after loading, tokenizers, images); 0 on a CUDA device
  (allocations only, as torch counts them; the CUDA context is not included);
* ``weights``: the bytes of every module resident in that memory, each in its own dtype;
* ``loading``: modules are filled one tensor at a time, so loading adds the largest tensor,
  once as stored and once converted (a CUDA device sees only the converted one);
* ``transformer = B · N · d · e · 12``: N = image + text tokens, d = width, e = bytes per element;
  inside one joint block ~12 ``[N, d]``-sized tensors live at once (residual streams, norms,
  q/k/v, attention output, the 4d-wide MLP hidden layer). Flash attention and lava's slice op
  add nothing of size N², and the pass stops after the deepest captured block;
* ``VAE = B · h · w · c₀ · e · 5``: the encoder's first stage (c₀ = 128 channels for SD3) at full
  resolution holds ~5 such maps at once (measured 0.64 GiB at 512² in fp32). diffusers tiles
  only when tiling is on *and* a side exceeds the VAE's own ``sample_size`` (1024 for SD3), and
  then its tiles are ``sample_size`` px: ``h · w`` is one such tile, otherwise the whole image;
* ``text = B · T · D · e · 12``: small (77 + 256 tokens);
* ``slices = L · B · h · N_img · K · 4``: float32 slices kept for ``L`` captured blocks, ``h`` =
  1 when heads are averaged, plus one per-head buffer while a block is captured.

``plan_memory`` tries, in order, what lowers the budgeted memory's peak without changing results
(text encoders to the CPU, on CUDA only) or barely (VAE tiling, only where it tiles), then what
changes them (dropping T5), and otherwise refuses, proposing the cheapest setting that fits —
another dtype, offloading, tiling, dropping T5, a lower resolution — with its estimate.
``benchmarks/full_size.py`` measures the estimate against peaks on a full-size SD3-medium.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from dataclasses import replace as dc_replace
from typing import NamedTuple

import torch

from .backends.wrap import place, text_dtype
from .errors import LavaError
from .model_spec import HEAVY, TEXT_ENCODERS, ModelSpec, spec_for, spec_from_folder, spec_from_pipeline

TRANSFORMER_FACTOR = 12
VAE_FACTOR = 5
# 0.5 GiB after imports (a --dry-run process) + 0.4 GiB that full-size runs hold beyond the modelled
# terms (allocator slack after loading, tokenizers, images): docs/benchmarks.md, full-size table.
CPU_BASE_BYTES = int(0.9 * 2**30)


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


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---- the plan ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Memory:
    """One memory (the process's RAM, or one CUDA device) and what it holds at its peak."""

    name: str
    base: int
    weights: dict[str, tuple[str, int]]  # module → (dtype, bytes)
    phases: dict[str, int]  # loading / text / VAE / transformer + slices → bytes at once

    @property
    def weight_bytes(self) -> int:
        return sum(b for _, b in self.weights.values())

    @property
    def peak(self) -> int:
        return self.base + self.weight_bytes + max(self.phases.values(), default=0)

    def describe(self) -> str:
        parts = [f"weights {fmt_bytes(self.weight_bytes)}"]
        if self.base:
            parts.insert(0, f"process {fmt_bytes(self.base)}")
        phases = ", ".join(f"{k} {fmt_bytes(v)}" for k, v in self.phases.items() if v)
        return f"estimated peak {fmt_bytes(self.peak)} = {' + '.join(parts)}" + (
            f" + max({phases})" if phases else ""
        )


@dataclass(frozen=True)
class MemoryPlan:
    """Where each module goes in which dtype, and the estimated peak of each memory.

    ``total`` is the peak of the compute device's memory (the one ``--max-memory`` budgets: the
    process's RAM on a CPU run, the GPU's memory on CUDA).
    """

    size: tuple[int, int]
    device: str
    dtype: str
    memories: tuple[Memory, ...]
    transformer_activations: int
    vae_activations: int
    slices: int
    weights: int
    offload_text_encoders: bool = False
    drop_t5: bool = False
    vae_tiling: bool = False
    vae_tiles: bool = False
    placement: dict[str, tuple[str, str]] = field(default_factory=dict)
    tokens: tuple[int, int, int] = (0, 0, 1)  # image tokens, text tokens, prompts per forward

    @property
    def total(self) -> int:
        return self.memory(self.device).peak

    def memory(self, name: str) -> Memory:
        for m in self.memories:
            if m.name == name:
                return m
        raise KeyError(name)

    def choices(self) -> list[str]:
        on = [
            ("text encoders on CPU", self.offload_text_encoders),
            ("T5 dropped", self.drop_t5),
            ("VAE tiling" + ("" if self.vae_tiles else " (no effect at this size)"), self.vae_tiling),
        ]
        return [n for n, flag in on if flag]

    def describe(self) -> str:
        """One line: the budgeted memory's estimate, then the choices made (kept short for logs)."""
        choices = self.choices()
        return f"{self.memory(self.device).describe()} on {self.device}, {self.dtype}" + (
            f" with {', '.join(choices)}" if choices else ""
        )

    def report(self) -> list[str]:
        """Several lines for ``--dry-run``: what goes where, tiling, and each memory's estimate."""
        h, w = self.size
        lines = [f"plan for {w}x{h} px, {self.dtype} on {self.device}:"]
        for name, (dev, dt) in self.placement.items():
            bytes_ = next(m.weights[name][1] for m in self.memories if name in m.weights)
            lines.append(f"  {name:<15} {dt:<9} on {dev:<7} {fmt_bytes(bytes_)}")
        if self.drop_t5:
            lines.append("  text_encoder_3  dropped (T5 not loaded, its tokens are zeros)")
        if self.vae_tiles:
            lines.append("  VAE encode      tiled")
        elif self.vae_tiling:
            lines.append("  VAE encode      tiling on, but no side exceeds the VAE's tile size: one pass")
        else:
            lines.append("  VAE encode      one pass (no tiling)")
        n_img, n_text, batch = self.tokens
        lines.append(
            f"  forward pass    {n_img} image + {n_text} text tokens, {batch} prompt(s) per forward pass, "
            "stopping after the deepest captured block (more prompts: activations grow with them)"
        )
        for m in self.memories:
            what = "process memory, shared by every module on the CPU" if m.name == "cpu" else "device memory"
            lines.append(f"  {m.name} ({what}): {m.describe()}")
        return lines


def estimate_memory(
    model,
    size: tuple[int, int],
    *,
    dtype: torch.dtype,
    device: str | torch.device = "cpu",
    batch: int = 1,
    captured_layers: int = 1,
    columns: int = 32,
    heads_kept: bool = False,
    text_tokens: int | None = None,
    offload_text_encoders: bool = False,
    drop_t5: bool = False,
    vae_tiling: bool = False,
) -> MemoryPlan:
    """Estimate the peak of each memory for segmenting ``batch`` images of ``size = (H, W)`` px.

    ``model`` is a ``ModelSpec`` or a ``StableDiffusion3Pipeline`` (only sizes are read).
    """
    spec = model if isinstance(model, ModelSpec) else spec_from_pipeline(model)
    dev = torch.device(device)
    devname = "cpu" if dev.type == "cpu" else str(dev if dev.index is not None else torch.device("cuda", 0))
    e = torch.empty((), dtype=dtype).element_size()
    text_dev = torch.device("cpu") if offload_text_encoders or dev.type == "cpu" else dev
    text_devname = "cpu" if text_dev.type == "cpu" else devname
    tdt = text_dtype(text_dev, dtype)
    te = torch.empty((), dtype=tdt).element_size()

    placement: dict[str, tuple[str, str]] = {}
    for name in HEAVY:
        if name not in spec.params or (name == "text_encoder_3" and not (spec.has_t5 and not drop_t5)):
            continue
        text = name in TEXT_ENCODERS
        placement[name] = (text_devname if text else devname, dtype_name(tdt if text else dtype))
    weight_of = {n: spec.params[n] * (te if n in TEXT_ENCODERS else e) for n in placement}
    t = text_tokens if text_tokens is not None else spec.clip_len + spec.t5_len
    act = activations(spec, size, e, te, t, batch, captured_layers, columns, heads_kept, vae_tiling)
    # One tensor at a time: read as stored (at most 4 bytes an element) and converted, on the CPU;
    # a CUDA device sees only the converted one.
    loading = {devname: spec.largest * e, "cpu": spec.largest * (4 + e)}

    memories = []
    for mem in dict.fromkeys(["cpu", devname]):
        weights = {n: (placement[n][1], weight_of[n]) for n in placement if placement[n][0] == mem}
        phases = {"loading": loading[mem] if weights else 0}
        if text_devname == mem:
            phases["text"] = act.text
        if devname == mem:
            phases["VAE"] = act.vae
            phases["transformer + slices"] = act.transformer + act.slices
        memories.append(Memory(mem, CPU_BASE_BYTES if mem == "cpu" else 0, weights, phases))
    return MemoryPlan(
        size=tuple(size),
        device=devname,
        dtype=dtype_name(dtype),
        memories=tuple(memories),
        transformer_activations=int(act.transformer),
        vae_activations=int(act.vae),
        slices=int(act.slices),
        weights=sum(weight_of[n] for n in placement if placement[n][0] == devname),
        offload_text_encoders=offload_text_encoders,
        drop_t5=drop_t5 and spec.has_t5,
        vae_tiling=vae_tiling,
        vae_tiles=act.tiles,
        placement=placement,
        tokens=(act.image_tokens, t, batch),
    )


class Activations(NamedTuple):
    """The activation terms of the peak formula (module docstring), in bytes."""

    image_tokens: int
    transformer: int
    slices: int
    vae: int
    text: int
    tiles: bool  # whether the VAE encode tiles at this size


def activations(
    spec: ModelSpec,
    size: tuple[int, int],
    e: int,
    te: int,
    text_tokens: int,
    batch: int,
    captured_layers: int,
    columns: int,
    heads_kept: bool,
    vae_tiling: bool,
) -> Activations:
    """The transformer pass (with the slices kept), the VAE encode and the text encoders, for
    ``batch`` images of ``size``; ``e``/``te``: bytes per element of the compute and text dtypes."""
    width = spec.heads * spec.head_dim
    n_img = (size[0] // spec.grid_unit) * (size[1] // spec.grid_unit)
    transformer = batch * (n_img + text_tokens) * width * e * TRANSFORMER_FACTOR
    kept = spec.heads if heads_kept else 1
    slices = batch * n_img * columns * 4 * (captured_layers * kept + spec.heads)
    tile = spec.vae_sample_size
    tiles = bool(vae_tiling and tile and "vae" in spec.params and max(size) > tile)
    h, w = (min(size[0], tile), min(size[1], tile)) if tiles else size
    if "vae" in spec.params:
        vae = batch * h * w * spec.vae_channels * e * VAE_FACTOR
    else:
        vae = batch * size[0] * size[1] * 3 * e
    text = batch * text_tokens * max(spec.joint_dim, 1) * te * TRANSFORMER_FACTOR
    return Activations(n_img, transformer, slices, vae, text, tiles)


def plan_memory(model, size: tuple[int, int], budget: int, **kw) -> MemoryPlan:
    """The first plan whose estimate fits ``budget`` bytes; raises with a proposal if none does.

    Tried in order: as asked; text encoders on the CPU (only where that is another memory, i.e.
    on CUDA); plus VAE tiling (only where it tiles); plus T5 dropped (this one changes the prompt
    embedding, so it is last). When none fits, the error names the cheapest setting that does
    (see ``propose``), or says that nothing lava can change fits.
    """
    spec = model if isinstance(model, ModelSpec) else spec_from_pipeline(model)
    candidates = _savings(spec, size, **kw)
    for cand in candidates:
        if cand.total <= budget:
            return cand
    best = min(candidates, key=lambda c: c.total)
    where = f"segmenting {size[1]}x{size[0]} px does not fit in {fmt_bytes(budget)}"
    proposal = propose(spec, size, budget, **kw)
    if proposal is None:
        cpu = torch.device(kw.get("device", "cpu")).type == "cpu"
        raise LavaError(
            f"{where}: nothing lava can change fits (dtype, offloading, VAE tiling, dropping T5, "
            f"resolution down to a quarter): as asked, {best.describe()}; raise --max-memory"
            + (" or use a CUDA device" if cpu else "")
        )
    flags, plan = proposal
    return_line = plan.memory(plan.device).describe()
    raise LavaError(
        f"{where}: {best.describe()}. Cheapest setting that fits: {flags} ({return_line}"
        + (f" with {', '.join(plan.choices())}" if plan.choices() else "")
        + "); or raise --max-memory"
    )


def _savings(spec: ModelSpec, size: tuple[int, int], **kw) -> list[MemoryPlan]:
    """The plans ``plan_memory`` tries, in its order; a saving that saves nothing here (offloading on
    a CPU, tiling an image that fits one tile, dropping an absent T5) is skipped."""
    step = estimate_memory(spec, size, **kw)
    candidates = [step]
    for change in ({"offload_text_encoders": True}, {"vae_tiling": True}, {"drop_t5": True}):
        opts = {
            **kw,
            "offload_text_encoders": step.offload_text_encoders,
            "vae_tiling": step.vae_tiling,
            "drop_t5": step.drop_t5,
            **change,
        }
        nxt = estimate_memory(spec, size, **opts)
        if nxt.total < step.total:
            step = nxt
            candidates.append(step)
    return candidates


def propose(spec: ModelSpec, size: tuple[int, int], budget: int, **kw) -> tuple[str, MemoryPlan] | None:
    """The cheapest setting whose plan fits ``budget``: ``(what to pass, plan)``, or ``None``.

    Each dtype (the one asked, and bf16 for fp32) and resolution (the one asked, then 3/4, 1/2 and
    1/4 of the long side, not below 256 px) gets ``plan_memory``'s own savings (offloading, VAE
    tiling, dropping T5, which ``--max-memory`` applies by itself); the cheapest that fits wins.
    Cost, lowest first: another dtype (bf16 for fp32: small numeric changes), then each step down
    in resolution (coarser maps). Among equal costs the lower estimate wins.
    """
    dtype = kw.pop("dtype")
    dtypes = [dtype] + ([torch.bfloat16] if dtype == torch.float32 else [])
    long_side, unit = max(size), spec.grid_unit
    sides = [long_side] + [
        s for s in (long_side * 3 // 4, long_side // 2, long_side // 4) if s >= max(unit, 256)
    ]
    found = []
    for dt, side in itertools.product(dtypes, sides):
        scaled = tuple(max(unit, round(s * side / long_side / unit) * unit) for s in size)
        fits = [p for p in _savings(spec, scaled, dtype=dt, **kw) if p.total <= budget]
        if not fits:
            continue
        plan = fits[0]
        flags = ([f"--dtype {dtype_name(dt)}"] if dt != dtype else []) + (
            [f"--resolution {side}"] if side != long_side else []
        )
        cost = (dt != dtype) * 1 + sides.index(side) * 2
        found.append((cost, plan.total, " ".join(flags) or "as asked", plan))
    if not found:
        return None
    _, _, flags, plan = min(found, key=lambda f: (f[0], f[1]))
    return flags, plan


def apply_plan(backend, plan: MemoryPlan, *, device, dtype):
    """A backend placed on ``device`` as ``plan`` says (its modules are reused, not copied)."""
    pipe = backend.pipe
    if plan.drop_t5:
        pipe.text_encoder_3 = None
        pipe.tokenizer_3 = None
    if plan.vae_tiling and pipe.vae is not None:
        pipe.vae.enable_tiling()
    placed = place(backend, device=device, dtype=dtype, offload_text_encoders=plan.offload_text_encoders)
    return dc_replace(placed, info={**placed.info, "memory_plan": plan.describe()})


__all__ = [
    "Memory",
    "MemoryPlan",
    "ModelSpec",
    "apply_plan",
    "estimate_memory",
    "fmt_bytes",
    "parse_bytes",
    "plan_memory",
    "propose",
    "spec_for",
    "spec_from_folder",
    "spec_from_pipeline",
]

"""Memory of reading attention maps while a pipeline generates: ``lava.trace`` against storing
every step's maps (the approach of attention-map-diffusers), side by side, one process each.

    python -m benchmarks.trace_memory --size 1024 --steps 7,28 --json docs/results/trace_memory.json

The model is a ``StableDiffusion3Pipeline`` whose transformer has SD3-medium's attention width
(24 heads × 64 = 1536, patch 2, 4096 image tokens at 1024 px, 77 CLIP + 256 T5 text tokens) but
only ``--blocks`` blocks and tiny text encoders and VAE (8× down), all with seeded random
weights: the maps' memory depends on the width, the token counts, the traced blocks and the
steps, not on the weights or the depth. Both approaches trace the same blocks of the same call
(CFG 7.0, so every transformer call holds the negative and the conditional prompt).

* ``store``: what attention-map-diffusers does (re-implemented here from its description, no code
  taken): on each traced block and step, the explicit softmax over all joint keys
  (``[B, H, N, N]``), of which the image→text part ``[B, H, N_img, T]`` of both CFG halves is
  moved into a per-step store that lives until the call ends.
* ``none``: the same call with nothing traced (the pipeline's own memory and time).
* ``lava``: ``lava.trace(pipe, words=None)``: running sums of ``[N_img, T]`` per block and image
  (conditional half, heads averaged), no ``N×N``.

Each approach runs in its own process (``--approach``), so its peak resident set size
(``ru_maxrss``) is its own; the table reports it against the peak RSS before the pipeline call,
and the bytes the maps hold at the end.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

HEADS, HEAD_DIM = 24, 64  # SD3-medium's joint attention width
APPROACHES = ("none", "lava", "store")
PROMPT = "a photo of a red fox standing in the snow next to a wooden fence, soft morning light"


def rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports kB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def build_pipe(blocks: int, size: int):
    """SD3-medium-width transformer (``blocks`` blocks), tiny encoders, an 8×-down tiny VAE."""
    from diffusers import AutoencoderKL, StableDiffusion3Pipeline

    from lava.backends.tiny import build_tiny_pipeline, seeded

    small = build_tiny_pipeline(
        "sd3", num_layers=blocks, heads=HEADS, head_dim=HEAD_DIM, pos_embed_max_size=size // 16
    )
    with seeded(1):
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            latent_channels=4,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(4, 4, 4, 4),
            layers_per_block=1,
            norm_num_groups=2,
            sample_size=size,
            scaling_factor=1.5305,
            shift_factor=0.0609,
            use_quant_conv=False,
            use_post_quant_conv=False,
        )
    parts = {k: v for k, v in small.components.items() if k != "vae"}
    pipe = StableDiffusion3Pipeline(vae=vae, **parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


class StoreEveryStep:
    """The store-every-step processor: explicit softmax over all joint keys, the image→text part of
    every head and both CFG halves kept per call (as attention-map-diffusers keeps it)."""

    def __init__(self, store: list):
        self.store = store

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        from einops import rearrange

        from lava.backends.family import SD3

        joint = SD3.qkv(attn, hidden_states, encoder_hidden_states)
        scale = joint.q.shape[-1] ** -0.5
        scores = joint.q @ joint.k.transpose(-1, -2)  # [B, H, N, N]
        probs = torch.softmax(scores.mul_(scale), dim=-1)
        del scores
        n_img = joint.text_start
        self.store.append(probs[:, :, :n_img, n_img:].cpu().clone())
        out = rearrange(probs @ joint.v, "b h n d -> b n (h d)").to(joint.q.dtype)
        del probs
        return SD3.finish(attn, out, joint, False)


def run_one(approach: str, blocks: int, size: int, steps: int, traced: list[int]) -> dict:
    torch.manual_seed(0)
    pipe = build_pipe(blocks, size)
    call = dict(
        prompt=PROMPT,
        height=size,
        width=size,
        num_inference_steps=steps,
        guidance_scale=1.0,
        generator=torch.Generator().manual_seed(0),
        max_sequence_length=256,
        output_type="np",
    )
    before = rss_bytes()
    start = time.perf_counter()
    if approach == "none":  # the plain call: what the pipeline itself takes
        pipe(**call)
        held = 0
    elif approach == "lava":
        import lava

        with lava.trace(pipe, layers=traced) as tr:
            pipe(**call)
        held = tr.nbytes
    else:
        store: list[torch.Tensor] = []
        originals = {i: pipe.transformer.transformer_blocks[i].attn.processor for i in traced}
        for i in traced:
            pipe.transformer.transformer_blocks[i].attn.set_processor(StoreEveryStep(store))
        try:
            pipe(**call)
        finally:
            for i, proc in originals.items():
                pipe.transformer.transformer_blocks[i].attn.set_processor(proc)
        held = sum(t.numel() * t.element_size() for t in store)
    wall = time.perf_counter() - start
    peak = rss_bytes()
    return {
        "approach": approach,
        "size": size,
        "steps": steps,
        "blocks": blocks,
        "traced": traced,
        "peak_rss_mb": round(peak / 2**20, 1),
        "rss_before_call_mb": round(before / 2**20, 1),
        "call_peak_extra_mb": round((peak - before) / 2**20, 1),
        "maps_held_mb": round(held / 2**20, 2),
        "wall_s": round(wall, 1),
        "threads": torch.get_num_threads(),
    }


def markdown(rows: list[dict]) -> str:
    head = (
        "approach",
        "px",
        "steps",
        "traced blocks",
        "peak RSS (MB)",
        "peak RSS before the call (MB)",
        "call's extra peak (MB)",
        "maps held at the end (MB)",
        "wall (s)",
    )
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append(
            f"| {r['approach']} | {r['size']} | {r['steps']} | {len(r['traced'])} | {r['peak_rss_mb']} | "
            f"{r['rss_before_call_mb']} | {r['call_peak_extra_mb']} | {r['maps_held_mb']} | {r['wall_s']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--steps", default="7,28", help="comma-separated step counts")
    p.add_argument("--blocks", type=int, default=1, help="transformer blocks at SD3-medium width")
    p.add_argument("--approach", choices=APPROACHES, help="run one approach in this process")
    p.add_argument("--json", type=Path)
    p.add_argument("--markdown", type=Path)
    args = p.parse_args(argv)
    steps = [int(s) for s in args.steps.split(",")]
    traced = list(range(args.blocks))
    if args.approach:
        for n in steps:
            print(json.dumps(run_one(args.approach, args.blocks, args.size, n, traced)), flush=True)
        return
    rows = []
    for n in steps:
        for approach in APPROACHES:
            cmd = [sys.executable, "-m", "benchmarks.trace_memory", "--approach", approach]
            cmd += ["--size", str(args.size), "--steps", str(n), "--blocks", str(args.blocks)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    table = markdown(rows)
    print(table)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(table + "\n")


if __name__ == "__main__":
    main()

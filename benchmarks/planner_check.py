"""Check the memory planner's transformer term against measured peaks → docs/benchmarks.md.

    python benchmarks/planner_check.py                 # CPU, fp32, a 2-block SD3-medium-width model
    python benchmarks/planner_check.py --device cuda   # bf16, all 24 blocks

Builds a random-weight ``SD3Transformer2DModel`` with SD3-medium's width (24 heads × 64, joint
dim 4096), runs one forward with lava's capture on one block at several resolutions, and
compares the measured peak of memory allocated during the call with
``estimate_memory(...).transformer_activations + slices`` (lava/planner.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from full_size import TRANSFORMER
from memprobe import peak_bytes
from scaling import ROOT, write_section

from lava.planner import estimate_memory, fmt_bytes
from lava.stages.capture import capturing, run_until_captured
from lava.types import CapturePlan


class _Pipe:
    """Just enough of a pipeline for ``estimate_memory``: a transformer and 8x VAE geometry."""

    def __init__(self, transformer):
        from types import SimpleNamespace

        self.transformer = transformer
        self.vae = SimpleNamespace(
            config=SimpleNamespace(block_out_channels=(128, 256, 512, 512)), parameters=lambda: iter(())
        )
        self.tokenizer = SimpleNamespace(model_max_length=77)
        self.text_encoder = self.text_encoder_2 = self.text_encoder_3 = None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--blocks", type=int, default=None)
    parser.add_argument("--sizes", default="256,512,768")
    args = parser.parse_args()
    from diffusers import SD3Transformer2DModel

    cuda = args.device.startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32
    blocks = args.blocks or (24 if cuda else 2)
    torch.manual_seed(0)
    with torch.device(args.device):
        model = SD3Transformer2DModel(**{**TRANSFORMER, "num_layers": blocks}).to(dtype).eval()
    pipe = _Pipe(model)
    rows = []
    for px in (int(s) for s in args.sizes.split(",")):
        lat = px // 8
        inputs = dict(
            hidden_states=torch.randn(1, 16, lat, lat, device=args.device, dtype=dtype),
            encoder_hidden_states=torch.randn(1, 333, 4096, device=args.device, dtype=dtype),
            pooled_projections=torch.randn(1, 2048, device=args.device, dtype=dtype),
            timestep=torch.tensor([500.0], device=args.device),
        )
        plan = CapturePlan(layers=(blocks - 1,), columns=tuple(range(32)), early_exit=False)

        def fn(plan=plan, inputs=inputs):
            with torch.no_grad(), capturing(model, plan):
                return run_until_captured(model, **inputs)

        measured, _ = peak_bytes(fn, args.device)
        est = estimate_memory(pipe, (px, px), dtype=dtype, captured_layers=1, columns=32, text_tokens=333)
        predicted = est.transformer_activations + est.slices
        rows.append((px, (px // 16) ** 2 + 333, measured, predicted))
        print(rows[-1], flush=True)

    name = torch.cuda.get_device_name() if cuda else "CPU, fp32"
    lines = [
        f"Measured on: {name}; random SD3-medium-width transformer ({blocks} blocks), capture of one block, "
        "K = 32 columns. Estimate = transformer activations + slices from `lava/planner.py`.",
        "",
        "| px | tokens N | measured peak | estimate | estimate / measured |",
        "|---:|---:|---:|---:|---:|",
    ]
    lines += [f"| {px} | {n} | {fmt_bytes(m)} | {fmt_bytes(p)} | {p / m:.2f} |" for px, n, m, p in rows]
    key = "planner-" + ("cuda" if cuda else "cpu")
    write_section(ROOT / "docs" / "benchmarks.md", key, "\n".join(lines))


if __name__ == "__main__":
    main()

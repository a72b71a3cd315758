"""Time and peak memory of propagation (``lava.propagate``) against the explicit N×N product.

    OMP_NUM_THREADS=1 python benchmarks/propagate_scaling.py --tokens 1024,4096 [--device cuda]

One step over 24 heads of 64 (SD3) and 20 class maps, float32; the explicit product is skipped
where its ``[B, H, N, N]`` matrix would not fit (``--max-naive-tokens``). Peak memory comes from
``memprobe.peak_bytes`` (the CUDA allocator's peak, or the CPU profiler replay).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from memprobe import median_seconds, peak_bytes

from lava.stages.propagate import propagate


def explicit(q: torch.Tensor, k: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
    """``mean_h softmax(q kᵀ/√D) · maps`` with the whole ``[B, H, N, N]`` matrix."""
    attn = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
    return (attn @ maps[:, None]).mean(1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", default="1024,4096", help="image token counts, e.g. 1024,4096,16384")
    p.add_argument("--device", default="cpu")
    p.add_argument("--heads", type=int, default=24)
    p.add_argument("--classes", type=int, default=20)
    p.add_argument("--max-naive-tokens", type=int, default=4096)
    args = p.parse_args()
    setup = f"{args.device}, {args.heads} heads x 64, {args.classes} maps"
    print(f"| tokens | path ({setup}) | median ms | peak MiB |")
    print("|---|---|---|---|")
    for n in (int(x) for x in args.tokens.split(",")):
        gen = torch.Generator(device=args.device).manual_seed(0)
        q, k = (torch.randn(1, args.heads, n, 64, device=args.device, generator=gen) for _ in range(2))
        maps = torch.rand(1, n, args.classes, device=args.device, generator=gen)
        paths = [("fused (lava.propagate)", propagate)]
        if n <= args.max_naive_tokens:
            paths.append(("explicit N×N", explicit))
        for name, fn in paths:

            def call(fn=fn, q=q, k=k, maps=maps):
                return fn(q, k, maps)

            seconds = median_seconds(call, repeat=3, device=args.device)
            peak, _ = peak_bytes(call, device=args.device)
            print(f"| {n} | {name} | {seconds * 1e3:.0f} | {peak / 2**20:.0f} |")


if __name__ == "__main__":
    main()

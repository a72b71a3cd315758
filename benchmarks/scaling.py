"""Peak memory and time of one captured layer vs resolution, per implementation → docs/benchmarks.md.

    python benchmarks/scaling.py                 # CPU: 24 heads × 64, N_img 256 … 16384
    python benchmarks/scaling.py --device cuda   # adds triton, bf16
    python benchmarks/scaling.py --tables standalone   # only the no-values table

Writes the table between the ``scaling`` markers of docs/benchmarks.md and the plot
docs/figures/scaling_<device>.png. Every number is measured in this run, except ``naive`` where
its three fp32 ``[H, N, N]`` buffers would not fit: that row says "computed" and gives
``3·H·N²·4`` bytes. The ``standalone`` table (between the ``standalone`` markers) measures
``lava.kernels.attention_slice`` called with q and k only, the case where no attention output is
computed and the joint log-sum-exp comes from the op's own byte-sized chunks.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.nn.functional as F
from memprobe import median_seconds, peak_bytes

from lava.kernels import SliceSpec, attention_slice, attention_with_slice
from lava.kernels.torch_slice import chunk_budget
from lava.planner import fmt_bytes as planner_fmt_bytes

ROOT = Path(__file__).resolve().parents[1]
TEXT, K, HEAD_DIM = 333, 20, 64
RES = {256: 256, 1024: 512, 4096: 1024, 16384: 2048}  # image tokens → px for SD3 (VAE 8 × patch 2)


def measure(impl: str, n_img: int, heads: int, device: str, dtype: torch.dtype, naive_limit: float) -> dict:
    n = n_img + TEXT
    row = dict(impl=impl, n_img=n_img, px=RES.get(n_img), heads=heads)
    if impl == "naive" and 3 * heads * n * n * 4 > naive_limit:
        row.update(peak=3 * heads * n * n * 4, seconds=None, how="computed")
        return row
    gen = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(1, heads, n, HEAD_DIM, generator=gen).to(device, dtype) for _ in range(3))
    spec = SliceSpec(text_start=n_img, text_len=TEXT, columns=tuple(range(K)))

    def fn():
        if impl == "sdpa":
            return F.scaled_dot_product_attention(q, k, v)
        return attention_with_slice(q, k, v, spec, impl=impl)

    peak, _ = peak_bytes(fn, device)
    repeat = 1 if n_img >= 16384 and device == "cpu" else 3
    row.update(peak=peak, seconds=median_seconds(fn, repeat=repeat, device=device), how="measured")
    return row


def measure_standalone(n_img: int, heads: int, device: str, dtype: torch.dtype) -> dict:
    """``attention_slice(q, k, ...)`` with no values, torch implementation, image→text, joint."""
    n = n_img + TEXT
    gen = torch.Generator(device="cpu").manual_seed(0)
    q, k = (torch.randn(1, heads, n, HEAD_DIM, generator=gen).to(device, dtype) for _ in range(2))

    def fn():
        return attention_slice(q, k, text_start=n_img, text_len=TEXT, columns=range(K), impl="torch")

    peak, _ = peak_bytes(fn, device)
    repeat = 1 if n_img >= 16384 and device == "cpu" else 3
    return dict(
        n_img=n_img, px=RES.get(n_img), peak=peak, seconds=median_seconds(fn, repeat=repeat, device=device)
    )


def standalone_table(rows: list[dict], heads: int, device: str, device_name: str) -> str:
    budget = chunk_budget(torch.device(device))
    lines = [
        f'Measured on: {device_name}. `attention_slice(q, k, …)` with no values (`impl="torch"`), 1 image, '
        f"{heads} heads × {HEAD_DIM}, {TEXT} text tokens, K = {K} class columns, image→text, joint softmax, "
        f"heads averaged; chunk budget {fmt_bytes(budget)} of scores.",
        "",
        "| image tokens | SD3 px | peak extra memory | N×N fp32 probabilities | median time |",
        "|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        n = r["n_img"] + TEXT
        cells = [
            r["n_img"],
            r["px"],
            fmt_bytes(r["peak"]),
            fmt_bytes(heads * n * n * 4),
            f"{r['seconds'] * 1e3:.1f} ms",
        ]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)


def fmt_bytes(b: float) -> str:
    return planner_fmt_bytes(b, digits=1)


def table(rows: list[dict], device_name: str) -> str:
    lines = [
        f"Measured on: {device_name}. One layer, 1 image, {rows[0]['heads']} heads × {HEAD_DIM}, "
        f"{TEXT} text tokens, K = {K} class columns, image→text, joint softmax, heads averaged.",
        "",
        "Peak extra memory counts every tensor allocated during the call (the attention output too);",
        "the capture's own cost is what it adds over plain SDPA (`sdpa` row) for the same layer.",
        "",
        "| image tokens | SD3 px | impl | peak extra memory | over SDPA | median time | time / SDPA | how |",
        "|---:|---:|---|---:|---:|---:|---:|---|",
    ]
    by = {(r["impl"], r["n_img"]): r for r in rows}
    for r in rows:
        base = by.get(("sdpa", r["n_img"]))
        t = "–" if r["seconds"] is None else f"{r['seconds'] * 1e3:.1f} ms"
        over = fmt_bytes(max(r["peak"] - base["peak"], 0)) if base and r["impl"] != "sdpa" else "–"
        ratio = (
            f"{r['seconds'] / base['seconds']:.2f}" if base and r["seconds"] and r["impl"] != "sdpa" else "–"
        )
        cells = [r["n_img"], r["px"], r["impl"], fmt_bytes(r["peak"]), over, t, ratio, r["how"]]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    lines.append("")
    for n in sorted({r["n_img"] for r in rows}):
        if ("naive", n) in by and ("torch", n) in by and ("sdpa", n) in by:
            naive, fused, sdpa = by[("naive", n)]["peak"], by[("torch", n)]["peak"], by[("sdpa", n)]["peak"]
            lines.append(
                f"- {n} image tokens: naive / torch peak memory {naive / fused:.0f}×; "
                f"capture cost over SDPA, naive / torch: {(naive - sdpa) / max(fused - sdpa, 1):.0f}×"
            )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, device_name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for impl in sorted({r["impl"] for r in rows}):
        rs = [r for r in rows if r["impl"] == impl]
        axes[0].plot([r["n_img"] for r in rs], [r["peak"] / 2**20 for r in rs], "o-", label=impl)
        rt = [r for r in rs if r["seconds"] is not None]
        axes[1].plot([r["n_img"] for r in rt], [r["seconds"] for r in rt], "o-", label=impl)
    for ax, title in zip(axes, ("peak extra memory (MiB)", "median time (s)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("image tokens (256 = 256 px … 16384 = 2048 px)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"one captured layer, {device_name}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def write_section(doc: Path, key: str, body: str) -> None:
    start, end = f"<!-- {key}:start -->", f"<!-- {key}:end -->"
    text = doc.read_text() if doc.exists() else ""
    block = f"{start}\n{body}\n{end}"
    if start in text:
        text = re.sub(re.escape(start) + r".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text += f"\n{block}\n"
    doc.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--heads", type=int, default=24)
    parser.add_argument("--sizes", default="256,1024,4096,16384")
    parser.add_argument("--naive-limit-gib", type=float, default=12.0)
    parser.add_argument("--tables", default="capture,standalone", help="which tables: capture, standalone")
    args = parser.parse_args()
    device = args.device
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    sizes = [int(s) for s in args.sizes.split(",")]
    tables = set(args.tables.split(","))
    name = (
        torch.cuda.get_device_name()
        if device.startswith("cuda")
        else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads), fp32"
    )
    suffix = "cuda" if device.startswith("cuda") else "cpu"
    if "capture" in tables:
        # naive last: freeing its GiB-sized buffers slows whatever runs right after it.
        impls = ["sdpa", "torch"] + (["triton"] if device.startswith("cuda") else []) + ["naive"]
        rows = []
        for n in sizes:
            for impl in impls:
                rows.append(measure(impl, n, args.heads, device, dtype, args.naive_limit_gib * 2**30))
                print(rows[-1], flush=True)
        key = f"scaling-{suffix}"
        write_section(ROOT / "docs" / "benchmarks.md", key, table(rows, name))
        plot(rows, ROOT / "docs" / "figures" / f"{key}.png", name)
    if "standalone" in tables:
        rows = []
        for n in sizes:
            rows.append(measure_standalone(n, args.heads, device, dtype))
            print(rows[-1], flush=True)
        write_section(
            ROOT / "docs" / "benchmarks.md",
            f"standalone-{suffix}",
            standalone_table(rows, args.heads, device, name),
        )


if __name__ == "__main__":
    main()

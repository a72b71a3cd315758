"""The memory planner against measured peaks on a full-size SD3-medium → docs/benchmarks.md.

    python benchmarks/full_size.py                    # the default grid (15-25 min on 2 shared cores)
    python benchmarks/full_size.py --settings fp32-1024,bf16-1024-offload --keep /tmp/sd3

Builds a full-size SD3-medium folder with seeded random weights (transformer 2.0 B parameters,
CLIP-L, CLIP-G, the 16-channel VAE; no T5, as a T5-less download would be) in a temporary
directory, about 5.6 GB in fp16, and deletes it afterwards (``--keep DIR`` builds it there and
keeps it). Then, for every setting, one fresh ``lava segment`` process segments one image:
its estimate is read from ``lava segment --dry-run`` (nothing heavy loaded) and its peak process
memory (``VmHWM``, loading included) from the real run with the same options. Runs use one
thread and read block 0, so the forward stops after one block (the peak of a block does not
depend on its depth) and the grid stays short on a CPU.

Not part of CI: it needs ~6 GB of disk and up to ~14 GiB of RAM per run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

ROOT = Path(__file__).resolve().parents[1]

# SD3-medium's published configs (stabilityai/stable-diffusion-3-medium-diffusers).
TRANSFORMER = dict(
    sample_size=128,
    patch_size=2,
    in_channels=16,
    out_channels=16,
    num_layers=24,
    attention_head_dim=64,
    num_attention_heads=24,
    joint_attention_dim=4096,
    caption_projection_dim=1536,
    pooled_projection_dim=2048,
    pos_embed_max_size=192,
)
VAE = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=16,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    norm_num_groups=32,
    sample_size=1024,
    scaling_factor=1.5305,
    shift_factor=0.0609,
    use_quant_conv=False,
    use_post_quant_conv=False,
)
CLIP_L = dict(
    hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, projection_dim=768
)
CLIP_G = dict(
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=20,
    projection_dim=1280,
    hidden_act="gelu",
)


def _random(factory, generator: torch.Generator):
    """``factory()`` built on the meta device, then given fp16 storage and seeded N(0, 0.02) values
    (no fp32 copy and no default initialisation of 2 B parameters)."""
    with torch.device("meta"):
        module = factory()
    module = module.to_empty(device="cpu").to(torch.float16)
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            if t.is_floating_point():
                t.normal_(0.0, 0.02, generator=generator)
    return module.eval()


def build_folder(path: str | Path, seed: int = 0) -> Path:
    """A full-size SD3-medium pipeline folder without T5, seeded random weights, saved in fp16."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from lava.backends.tiny import build_tokenizers

    clip_tok, clip_tok_2, _ = build_tokenizers()
    g = torch.Generator().manual_seed(seed)

    def clip(cfg: dict, tok):
        config = CLIPTextConfig(
            vocab_size=49408,
            max_position_embeddings=77,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            **cfg,
        )
        return _random(lambda: CLIPTextModelWithProjection(config), g)

    pipe = StableDiffusion3Pipeline(
        transformer=_random(lambda: SD3Transformer2DModel(**TRANSFORMER), g),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_random(lambda: AutoencoderKL(**VAE), g),
        text_encoder=clip(CLIP_L, clip_tok),
        tokenizer=clip_tok,
        text_encoder_2=clip(CLIP_G, clip_tok_2),
        tokenizer_2=clip_tok_2,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    path = Path(path)
    pipe.save_pretrained(path, safe_serialization=True)
    return path


# (name, image, options): one fresh process each. --max-memory lets the planner turn VAE tiling on
# (where it tiles, that is where a side exceeds the VAE's 1024 px sample size).
SETTINGS = {
    "fp32-512": ("c512.png", ["--dtype", "float32", "--resolution", "512"]),
    "fp32-1024": ("a1024.png", ["--dtype", "float32", "--resolution", "1024"]),
    "bf16-512": ("c512.png", ["--dtype", "bfloat16", "--resolution", "512"]),
    "bf16-1024": ("a1024.png", ["--dtype", "bfloat16", "--resolution", "1024"]),
    "bf16-1024-offload": (
        "a1024.png",
        ["--dtype", "bfloat16", "--resolution", "1024", "--offload-text-encoders"],
    ),
    "fp32-1024x768-tiling": (
        "b2048.png",
        ["--dtype", "float32", "--resolution", "1024", "--max-memory", "14GiB"],
    ),
    "bf16-2048x1536-tiling": (
        "b2048.png",
        ["--dtype", "bfloat16", "--resolution", "2048", "--max-memory", "10GiB"],
    ),
    "fp32-2048x1536-tiling": (
        "b2048.png",
        ["--dtype", "float32", "--resolution", "2048", "--max-memory", "15GiB"],
    ),
}
IMAGES = {"c512.png": (512, 512), "a1024.png": (1024, 1024), "b2048.png": (2048, 1536)}
CHILD = """
import sys
from lava.cli import main
rc = main(sys.argv[1:])
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
print("VMHWM", int(status["VmHWM"].split()[0]) * 1024, flush=True)
sys.exit(rc)
"""


def run_setting(folder: Path, images: Path, name: str, out: Path) -> dict:
    """Dry-run estimate and measured peak of one setting, each in a fresh process."""
    image, opts = SETTINGS[name]
    argv = ["segment", str(images / image), "--classes", "cat", "--model", str(folder), "--layers", "0"]
    argv += ["--out", str(out / name), "--device", "cpu", *opts]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    dry = subprocess.run(
        [sys.executable, "-m", "lava.cli", *argv, "--dry-run"], capture_output=True, text=True, env=env
    )
    if dry.returncode:
        raise SystemExit(f"{name}: dry run failed: {dry.stderr.strip()}")
    line = next(x for x in dry.stdout.splitlines() if x.strip().startswith("cpu ("))
    estimate = float(re.search(r"estimated peak ([0-9.]+) GiB", line).group(1)) * 2**30
    plan = [x.strip() for x in dry.stdout.splitlines()[2:] if not x.strip().startswith("cpu (")]
    t0 = time.perf_counter()
    real = subprocess.run([sys.executable, "-c", CHILD, *argv], capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - t0
    found = re.search(r"VMHWM (\d+)", real.stdout)
    if real.returncode or not found:  # recorded as failed (e.g. killed for memory), not hidden
        print(f"{name}: run failed (exit {real.returncode}): {real.stderr.strip()[-1500:]}", flush=True)
    peak = int(found.group(1)) if found and not real.returncode else None
    row = dict(name=name, estimate=estimate, peak=peak, seconds=seconds, plan=plan, line=line.strip())
    print(json.dumps(row), flush=True)
    return row


def table(rows: list[dict], command: str) -> str:
    from lava.planner import fmt_bytes

    lines = [
        f"Measured on: CPU (x86_64, 2 cores shared with other jobs, 1 thread), {time.strftime('%Y-%m-%d')}; "
        "full-size SD3-medium with seeded random weights and no T5 (2.03 B transformer, CLIP-L, CLIP-G, "
        "16-channel VAE; saved in fp16), one 1-class image, block 0 read. "
        f"Command: `{command}`.",
        "",
        "Estimate: `lava segment ... --dry-run` (the `cpu` line: process memory, nothing loaded). "
        "Measured: the peak resident memory (`VmHWM`) of a fresh `lava segment` process with the same "
        "options, loading included.",
        "",
        "| setting | plan (dry run) | estimate | measured peak | estimate / measured | run time |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        plan = "; ".join(
            " ".join(p.split()) for p in r["plan"] if p.startswith(("VAE", "transformer ", "text_encoder "))
        )
        if r["peak"] is None:
            measured, ratio = "failed", "–"
        else:
            measured, ratio = fmt_bytes(r["peak"]), f"{r['estimate'] / r['peak']:.2f}"
        estimate = fmt_bytes(r["estimate"])
        lines.append(f"| {r['name']} | {plan} | {estimate} | {measured} | {ratio} | {r['seconds']:.0f} s |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated names from SETTINGS")
    parser.add_argument("--keep", default=None, help="build the folder here and keep it (reused if present)")
    parser.add_argument(
        "--no-write", action="store_true", help="print the table, do not touch docs/benchmarks.md"
    )
    args = parser.parse_args()
    from PIL import Image
    from scaling import write_section

    names = [n for n in args.settings.split(",") if n]
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        raise SystemExit(f"unknown settings {unknown}: expected some of {list(SETTINGS)}")
    work = Path(tempfile.mkdtemp(prefix="lava-full-size-"))
    try:
        folder = Path(args.keep) if args.keep else work / "sd3-medium-random"
        if not (folder / "model_index.json").exists():
            t0 = time.perf_counter()
            # In its own process: the 5.6 GB of fp16 modules are gone when it exits, not kept
            # resident in this one beside the measured runs.
            build = f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
            build += f"from full_size import build_folder; build_folder({str(folder)!r}, seed=0)"
            env = {**os.environ, "PYTHONPATH": str(ROOT)}
            subprocess.run([sys.executable, "-c", build], check=True, env=env, stderr=subprocess.DEVNULL)
            print(f"built {folder} in {time.perf_counter() - t0:.0f} s", flush=True)
        images = work / "images"
        images.mkdir()
        for file, (w, h) in IMAGES.items():
            Image.new("RGB", (w, h), (120, 90, 60)).save(images / file)
        rows = [run_setting(folder, images, name, work / "out") for name in names]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    command = "python benchmarks/full_size.py" + (
        f" --settings {args.settings}" if args.settings != ",".join(SETTINGS) else ""
    )
    body = table(rows, command)
    print(body)
    if not args.no_write:
        write_section(ROOT / "docs" / "benchmarks.md", "full-size-cpu", body)


if __name__ == "__main__":
    main()

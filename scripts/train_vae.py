"""Train the ``lava-shapes`` VAE: a small stock ``AutoencoderKL`` on the shape scenes.

    python -m scripts.train_vae --out runs/vae --steps 1500

The transformer of ``lava-shapes`` v2 works on this VAE's latents, as SD3 works on its own VAE's:
a convolutional encoder hands every latent cell its local edges and corners, which a patch
embedding of raw pixels does not (``shared/probes/front_end_probe.py``: a 4×-down conv encoder
made per-token shape learnable at once, a plain patch-2 embedding stayed at chance).

Objective: L1 + MSE reconstruction of the scene plus a KL term of weight ``kl`` (SD's VAEs use
about 1e-6: the latent must stay close to a Gaussian only loosely), and an L1 on image gradients,
which keeps corners and edges sharp where plain pixel losses blur them. After training, the
latent mean and standard deviation over held-out-free training scenes set diffusers'
``shift_factor`` and ``scaling_factor`` (SD3's convention ``(z - shift) · scale``), so the
transformer sees unit-variance latents.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from lava.reference.scenes import TRAIN_SEEDS, make_scene


@dataclass(frozen=True)
class VaeConfig:
    """Sizes and optimisation of the VAE run (defaults = the shipped run)."""

    resolution: int = 64
    channels: tuple[int, ...] = (32, 64, 64)  # one entry per level: len - 1 downsamplings (4×)
    latent_channels: int = 4
    layers_per_block: int = 1
    steps: int = 1500
    batch_size: int = 16
    lr: float = 1e-3
    warmup: int = 100
    kl: float = 1e-6
    edge: float = 0.5  # weight of the image-gradient L1
    same_colour: float = 0.35
    scenes: int = 20_000  # pre-rendered training scenes, cycled
    seed: int = 0
    # Training-only semantic alignment (not shipped): a small transformer head reads the latent
    # means and predicts each latent cell's shape (background/circle/square/triangle), its loss
    # weighted by ``shape``. A VAE trained for reconstruction alone hands the diffusion transformer
    # latents from which shape is not learnable (docs/reference-model.md: a supervised 4-block
    # transformer stays at chance on them); the gradient of this head through the encoder makes the
    # latents carry what the head needs (cf. VA-VAE, Yao et al. 2025: VAE latents aligned with
    # semantic features train diffusion models faster). 0: reconstruction only.
    shape: float = 0.0
    init: str | None = None  # start from this trained VAE folder instead of a seeded initialisation


def build_vae(cfg: VaeConfig):
    """An untrained stock ``AutoencoderKL`` of ``cfg`` (seeded)."""
    from diffusers import AutoencoderKL

    n = len(cfg.channels)
    state = torch.random.get_rng_state()
    torch.manual_seed(cfg.seed)
    try:
        return AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * n,
            up_block_types=("UpDecoderBlock2D",) * n,
            block_out_channels=tuple(cfg.channels),
            layers_per_block=cfg.layers_per_block,
            latent_channels=cfg.latent_channels,
            norm_num_groups=16,
            sample_size=cfg.resolution,
            # SD3's VAE has no quant convs; neither has this one.
            use_quant_conv=False,
            use_post_quant_conv=False,
            mid_block_add_attention=False,
        )
    finally:
        torch.random.set_rng_state(state)


def _render(args: tuple[int, int, float, int]) -> tuple[np.ndarray, np.ndarray]:
    seed, size, same_colour, grid = args
    scene = make_scene(seed, same_colour=same_colour, counts="train")
    return scene.render(size, 2), scene.labels(grid, "shape")


def render_scenes(seeds, size: int, same_colour: float, grid: int) -> tuple[np.ndarray, np.ndarray]:
    """``([N, size, size, 3]`` uint8 renders, ``[N, grid, grid]`` shape ids at the latent cells'
    centres (0 background)) of training scenes (2 processes)."""
    with Pool(2) as pool:
        out = pool.map(_render, [(s, size, same_colour, grid) for s in seeds], chunksize=256)
    return np.stack([o[0] for o in out]), np.stack([o[1] for o in out])


class ShapeHead(torch.nn.Module):
    """Training-only: latent means ``[B, C, g, g]`` -> per-cell shape logits ``[B, g², 4]``."""

    def __init__(self, channels: int, grid: int, width: int = 128, depth: int = 2):
        super().__init__()
        self.embed = torch.nn.Conv2d(channels, width, 1)
        self.pos = torch.nn.Parameter(torch.zeros(1, grid * grid, width))
        layer = torch.nn.TransformerEncoderLayer(
            width, 4, 4 * width, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.blocks = torch.nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.out = torch.nn.Linear(width, 4)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.embed(z).flatten(2).transpose(1, 2) + self.pos
        return self.out(self.blocks(x))


def to_pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 ``[B, H, W, 3]`` -> float ``[B, 3, H, W]`` in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def gradients(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x[..., :, 1:] - x[..., :, :-1], x[..., 1:, :] - x[..., :-1, :]


def vae_loss(
    vae, x: torch.Tensor, cfg: VaeConfig, gen: torch.Generator, head=None, labels=None
) -> tuple[torch.Tensor, dict]:
    dist = vae.encode(x).latent_dist
    z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=gen)
    rec = vae.decode(z).sample
    l1 = (rec - x).abs().mean()
    mse = F.mse_loss(rec, x)
    gx, gy = gradients(rec)
    tx, ty = gradients(x)
    edge = (gx - tx).abs().mean() + (gy - ty).abs().mean()
    kl = dist.kl().mean() / x[0].numel()
    loss = l1 + mse + cfg.edge * edge + cfg.kl * kl
    parts = {"l1": l1.item(), "mse": mse.item(), "edge": edge.item()}
    if head is not None:
        logits = head(dist.mean)
        shape = F.cross_entropy(logits.reshape(-1, 4), labels.reshape(-1))
        loss = loss + cfg.shape * shape
        parts["shape"] = shape.item()
    return loss, parts


@torch.no_grad()
def latent_stats(vae, images: np.ndarray, batch: int = 64) -> tuple[float, float]:
    """Mean and standard deviation of the latent means over ``images`` (all channels together)."""
    zs = [vae.encode(to_pixels(images[i : i + batch])).latent_dist.mean for i in range(0, len(images), batch)]
    z = torch.cat(zs)
    return float(z.mean()), float(z.std())


def lr_at(step: int, cfg: VaeConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    p = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * p)))


def train_vae(out: str, cfg: VaeConfig, threads: int | None = None) -> dict:
    """Train and save the VAE (diffusers folder, fp32) to ``out``; returns the run's metadata."""
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(cfg.seed)
    grid = cfg.resolution // 2 ** (len(cfg.channels) - 1)
    images, labels = render_scenes(TRAIN_SEEDS[: cfg.scenes], cfg.resolution, cfg.same_colour, grid)
    if cfg.init:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(cfg.init).train()
    else:
        vae = build_vae(cfg).train()
    head = ShapeHead(vae.config.latent_channels, grid) if cfg.shape > 0 else None
    params = list(vae.parameters()) + (list(head.parameters()) if head else [])
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(cfg.seed)
    order = np.random.default_rng(cfg.seed).permutation(len(images))
    start, avg = time.time(), None
    for step in tqdm(range(cfg.steps), desc="vae", unit="step", mininterval=10):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        idx = order[np.arange(step * cfg.batch_size, (step + 1) * cfg.batch_size) % len(images)]
        target = torch.from_numpy(labels[idx].astype(np.int64)) if head else None
        loss, parts = vae_loss(vae, to_pixels(images[idx]), cfg, gen, head, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        avg = parts if avg is None else {k: 0.95 * avg[k] + 0.05 * v for k, v in parts.items()}
        if step % 100 == 0 or step == cfg.steps - 1:
            shown = " ".join(f"{k} {v:.4f}" for k, v in avg.items())
            print(f"step {step} {shown} wall {time.time() - start:.0f}s", flush=True)
    vae.eval()
    mean, std = latent_stats(vae, images[:2048])
    vae.register_to_config(shift_factor=mean, scaling_factor=1.0 / std)
    meta = {
        "vae": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items()},
        "final": {k: round(v, 5) for k, v in avg.items()},
        "wall_time_s": round(time.time() - start, 1),
        "shift_factor": mean,
        "scaling_factor": 1.0 / std,
        "command": "python -m scripts.train_vae " + " ".join(sys.argv[1:]),
    }
    Path(out).mkdir(parents=True, exist_ok=True)
    vae.save_pretrained(out, safe_serialization=True)
    with open(Path(out) / "train_vae.json", "w") as f:
        json.dump(meta, f, indent=2)
    print(f"saved to {out}: shift {mean:.4f} scale {1 / std:.4f}, {meta['wall_time_s'] / 60:.1f} min")
    return meta


def main(argv: list[str] | None = None) -> None:
    d = VaeConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder to write the VAE to")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--resolution", type=int, default=d.resolution)
    p.add_argument("--channels", default=",".join(map(str, d.channels)), help="width per level")
    p.add_argument("--latent-channels", type=int, default=d.latent_channels)
    p.add_argument("--edge", type=float, default=d.edge, help="weight of the image-gradient L1")
    p.add_argument("--scenes", type=int, default=d.scenes, help="pre-rendered training scenes")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--shape", type=float, default=d.shape, help="weight of the training-only shape head")
    p.add_argument("--init", default=None, help="start from this trained VAE folder")
    p.add_argument("--warmup", type=int, default=d.warmup)
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)
    cfg = VaeConfig(
        resolution=a.resolution,
        channels=tuple(int(c) for c in a.channels.split(",")),
        latent_channels=a.latent_channels,
        steps=a.steps,
        batch_size=a.batch_size,
        lr=a.lr,
        edge=a.edge,
        scenes=a.scenes,
        seed=a.seed,
        shape=a.shape,
        init=a.init,
        warmup=a.warmup,
    )
    train_vae(a.out, cfg, threads=a.threads)


if __name__ == "__main__":
    main()

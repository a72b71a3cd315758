"""Train ``lava-shapes``: SD3's rectified-flow objective on procedurally generated shape scenes.

    python -m scripts.train --out lava/assets/lava-shapes --steps 1500 --seed 0

Each step renders a fresh batch of training scenes (seeds below ``HELDOUT_START``), words their
captions at random (``scenes.training_caption``), and trains the transformer and both text
encoders together through ``StableDiffusion3Pipeline.encode_prompt``, the embedding lava uses.

Objective (SD3, Esser et al. 2024): ``x_t = (1 - σ)·x_0 + σ·ε``, the model predicts the velocity
``v = ε - x_0`` from ``x_t`` at timestep ``t = 1000·σ``, with ``σ = sigmoid(u)``, ``u ~ N(0, 1)``
(logit-normal). Everything is seeded; the learning rate follows the step count (linear warm-up,
cosine decay), so a run is reproduced by its command line.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from lava.backends.base import vae_factor
from lava.reference.model import ASSET_DIR, ReferenceConfig, build_pipeline, save_pipeline, text_embeddings
from lava.reference.scenes import CAPTION_MIX, TRAIN_SEEDS, caption_words, make_scene
from scripts.grounding import grounding_loss, install, token_mass_check, word_targets


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings (defaults = the shipped run)."""

    steps: int = 3000
    batch_size: int = 32
    lr: float = 1e-3
    warmup: int = 200
    min_lr_ratio: float = 0.05  # cosine decays to lr · min_lr_ratio
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    # σ = sigmoid(N(logit_mean, logit_std)), SD3's default. A pilot with the mean shifted to 0.8
    # (more training at high noise) localised worse after 500 steps (docs/reference-model.md).
    logit_mean: float = 0.0
    logit_std: float = 1.0
    seed: int = 0
    same_colour: float = 0.35  # make_scene's chance of repeating a colour (held-out scenes: 0)
    caption_mix: tuple[float, float, float] = CAPTION_MIX  # English / colour+shape / shape-only
    big_scenes: float = 0.0  # share of scenes with 1-2 large objects (scenes.OBJECT_COUNTS["big"])
    grounding: float = 0.2  # weight of the token grounding loss (grounding.py); 0: SD3's loss alone
    ema_decay: float = 0.0  # > 0: save an exponential moving average of the weights
    bf16: bool = True  # bf16 autocast: ~20% faster steps on this CPU; weights stay fp32
    # A trained VAE folder (scripts/train_vae.py): the transformer then learns on its latents, and
    # the VAE (frozen here) ships with it. None: pixel space, as the first model.
    vae: str | None = None
    # Training-only auxiliary loss (REPA's idea, with labels instead of a teacher): a linear head
    # on block ``shape_block``'s image tokens predicts background/circle/square/triangle per token,
    # for samples noised below ``shape_sigma``. The head is not shipped; 0 turns it off.
    shape_head: float = 0.0
    shape_block: int = 1
    shape_sigma: float = 0.6
    # Share of samples whose caption is dropped (empty prompt, as classifier-free guidance trains
    # too); with the shape head, only these samples train it, so the image tokens must see shape
    # rather than read it from the caption's words.
    shape_drop: float = 0.0


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of ``step``: linear warm-up to ``lr``, then cosine to ``lr · min_lr_ratio``."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def training_batch(step: int, cfg: TrainConfig, size: int) -> tuple[torch.Tensor, list[str], list, list]:
    """Pixels ``[B, 3, size, size]`` in [-1, 1], captions, scenes and, per caption, the objects
    each word names (``scenes.caption_words``) of step ``step``.

    Scene seeds run consecutively through the training range, offset by the run seed.
    """
    first = cfg.seed * 7_919_000 + step * cfg.batch_size
    seeds = [(first + i) % len(TRAIN_SEEDS) for i in range(cfg.batch_size)]
    rng = np.random.default_rng([cfg.seed, step])
    big = rng.random(len(seeds)) < cfg.big_scenes
    scenes = [
        make_scene(s, same_colour=cfg.same_colour, counts="big" if b else "train") for s, b in zip(seeds, big)
    ]
    # 2x2 supersampling suffices for anti-aliasing at 64 px and renders 4x faster than the default 4x4.
    ss = 2 if size >= 64 else None
    pixels = np.stack([s.render(size, ss) for s in scenes]).astype(np.float32) / 127.5 - 1.0
    parts = [caption_words(s, rng, cfg.caption_mix) for s in scenes]
    captions = [" ".join(words) for words, _ in parts]
    refs = [r for _, r in parts]
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous(), captions, scenes, refs


def flow_matching_loss(
    pipe, model_config: ReferenceConfig, x0: torch.Tensor, captions: list[str], gen: torch.Generator, cfg
) -> torch.Tensor:
    """``(mean squared error of the predicted velocity, σ [B])`` for clean latents ``x0`` ``[B, C, h, w]``
    (pixels in [-1, 1] for a pixel-space model)."""
    b = x0.shape[0]
    sigma = torch.sigmoid(cfg.logit_mean + cfg.logit_std * torch.randn(b, generator=gen))
    eps = torch.randn(x0.shape, generator=gen)
    s = sigma.view(b, 1, 1, 1)
    xt = (1 - s) * x0 + s * eps
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
        embeds, pooled = text_embeddings(pipe, captions, model_config)
        pred = pipe.transformer(
            hidden_states=xt,
            encoder_hidden_states=embeds,
            pooled_projections=pooled,
            timestep=sigma * 1000.0,
            return_dict=False,
        )[0]
    return F.mse_loss(pred.float(), eps - x0), sigma


def encoder(vae):
    """Pixels ``[B, 3, H, W]`` in [-1, 1] -> the transformer's clean latents: ``(mean - shift) ·
    scale`` of the frozen VAE, as lava's ``Backend.encode_images`` computes them; identity without one."""
    if vae is None:
        return lambda pixels: pixels

    @torch.no_grad()
    def encode(pixels: torch.Tensor) -> torch.Tensor:
        z = vae.encode(pixels).latent_dist.mean
        return (z - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor

    return encode


class ShapeHead(torch.nn.Module):
    """The training-only per-token shape classifier on one block's image tokens (not shipped)."""

    def __init__(self, transformer, block: int, width: int, classes: int = 4):
        super().__init__()
        self.linear = torch.nn.Linear(width, classes)
        self.tokens: torch.Tensor | None = None
        transformer.transformer_blocks[block].register_forward_hook(self._keep)

    def _keep(self, _module, _inputs, output) -> None:
        self.tokens = output[1]  # SD3 joint blocks return (text tokens, image tokens)

    def loss(self, labels: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Cross-entropy over the tokens of the samples ``keep`` [B] selects; ``labels`` [B, N_img]."""
        if not keep.any():
            return torch.zeros(())
        logits = self.linear(self.tokens[keep].float())
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[keep].reshape(-1))


def shape_labels(scenes, grid: int) -> torch.Tensor:
    """``[B, grid²]`` int64: 0 background, 1 + shape id at each token's centre."""
    return torch.from_numpy(np.stack([s.labels(grid, "shape").ravel() for s in scenes]).astype(np.int64))


class EMA:
    """Exponential moving average of ``params`` (decay warmed up as ``(1 + step) / (10 + step)``)."""

    def __init__(self, params: list[torch.nn.Parameter], decay: float):
        self.params, self.decay = params, decay
        self.shadow = [p.detach().clone() for p in params]

    @torch.no_grad()
    def update(self, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1 - d)

    @contextmanager
    def swapped(self) -> Iterator[None]:
        """The averaged weights in the model for the duration (to save them)."""
        backup = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, s in zip(self.params, self.shadow):
                p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, b in zip(self.params, backup):
                    p.copy_(b)


def command_line(out: str, cfg: TrainConfig, model_config: ReferenceConfig) -> str:
    """The ``python -m scripts.train`` command that reproduces a run (every setting spelled out)."""
    return (
        f"python -m scripts.train --out {out} --steps {cfg.steps} --seed {cfg.seed} "
        f"--batch-size {cfg.batch_size} --lr {cfg.lr:g} --logit-mean {cfg.logit_mean:g} "
        f"--same-colour {cfg.same_colour:g} --big-scenes {cfg.big_scenes:g} --grounding {cfg.grounding:g} "
        f"--caption-mix {','.join(f'{m:g}' for m in cfg.caption_mix)} "
        f"--ema {cfg.ema_decay:g} --num-layers {model_config.num_layers} "
        f"--resolution {model_config.resolution} --patch-size {model_config.patch_size}"
        + (
            f" --dual-attention {','.join(map(str, model_config.dual_attention_layers))}"
            if model_config.dual_attention_layers
            else ""
        )
        + ("" if cfg.bf16 else " --no-bf16")
        + (f" --vae {cfg.vae}" if cfg.vae else "")
        + (f" --shape-drop {cfg.shape_drop:g}" if cfg.shape_drop > 0 else "")
        + (
            f" --shape-head {cfg.shape_head:g} --shape-block {cfg.shape_block}"
            f" --shape-sigma {cfg.shape_sigma:g}"
            if cfg.shape_head > 0
            else ""
        )
    )


def load_vae(path: str):
    """The frozen VAE of a ``scripts.train_vae`` folder and its factor (pixels per latent cell)."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(path).eval().requires_grad_(False)
    return vae, vae_factor(vae)


CHECKPOINT = "checkpoint.pt"


def train(
    out: str,
    cfg: TrainConfig,
    model_config: ReferenceConfig | None = None,
    *,
    save_every: int = 0,
    threads: int | None = None,
    resume: bool = False,
) -> dict:
    """Train from scratch (or, with ``resume``, from ``out``'s last checkpoint) and save to ``out``;
    returns the run's metadata (also in the config JSON)."""
    model_config = model_config or ReferenceConfig()
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(cfg.seed)
    vae = None
    if cfg.vae:
        vae, factor = load_vae(cfg.vae)
        model_config = replace(model_config, latent_channels=vae.config.latent_channels, vae_factor=factor)
    encode = encoder(vae)
    pipe = build_pipeline(model_config, seed=cfg.seed, vae=vae)
    modules = [pipe.transformer, pipe.text_encoder, pipe.text_encoder_2]
    for m in modules:
        m.train()  # build_pipeline already froze what must stay fixed (the zero pooled projections)
    head = (
        ShapeHead(pipe.transformer, cfg.shape_block, model_config.inner_dim) if cfg.shape_head > 0 else None
    )
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    trained = params + (list(head.parameters()) if head else [])
    # No weight decay on norms, biases and embeddings' 1-d parameters.
    groups = [
        {"params": [p for p in trained if p.ndim >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in trained if p.ndim < 2], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.99))
    gen = torch.Generator().manual_seed(cfg.seed)
    ema = EMA(params, cfg.ema_decay) if cfg.ema_decay > 0 else None
    first = 0
    checkpoint = os.path.join(out, CHECKPOINT)
    if resume and os.path.isfile(checkpoint):
        state = torch.load(checkpoint, weights_only=False)
        for m, sd in zip(modules, state["modules"]):
            m.load_state_dict(sd)
        if head:
            head.load_state_dict(state["head"])
        opt.load_state_dict(state["opt"])
        gen.set_state(state["gen"])
        if ema:
            ema.shadow = state["ema"]
        first = state["step"]
        print(f"resumed {out} at step {first}", flush=True)

    def save(extra: dict, step: int) -> None:
        with ema.swapped() if ema else nullcontext():
            save_pipeline(pipe, out, model_config, extra)
        state = {
            "modules": [m.state_dict() for m in modules],
            "head": head.state_dict() if head else None,
            "opt": opt.state_dict(),
            "gen": gen.get_state(),
            "ema": ema.shadow if ema else None,
            "step": step,
        }
        torch.save(state, checkpoint + ".tmp")
        os.replace(checkpoint + ".tmp", checkpoint)

    meta = {"train": asdict(cfg), "command": command_line(out, cfg, model_config)}
    store = install(pipe.transformer, range(model_config.num_layers)) if cfg.grounding > 0 else None
    start = time.time()
    ema_loss = ground_avg = shape_avg = None
    bar = tqdm(range(first, cfg.steps), desc="train", unit="step", mininterval=5)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        pixels, captions, scenes, refs = training_batch(step, cfg, model_config.resolution)
        dropped = np.random.default_rng([cfg.seed, step, 1]).random(len(captions)) < cfg.shape_drop
        captions = ["" if d else c for c, d in zip(captions, dropped)]
        refs = [[] if d else r for r, d in zip(refs, dropped)]
        loss, sigma = flow_matching_loss(pipe, model_config, encode(pixels), captions, gen, cfg)
        if store is not None:
            if step == 0:
                for caption in captions:
                    token_mass_check(caption.split(), pipe.tokenizer(caption)["input_ids"])
            targets = word_targets(
                scenes, refs, model_config.resolution, model_config.token_pixels, model_config.clip_max_length
            )
            ground = grounding_loss(store, targets)
            ground_avg = ground.item() if ground_avg is None else 0.98 * ground_avg + 0.02 * ground.item()
            loss = loss + cfg.grounding * ground
        if head is not None:
            seen = sigma < cfg.shape_sigma
            if cfg.shape_drop > 0:  # only where no caption could tell the shape
                seen &= torch.from_numpy(dropped)
            shape = head.loss(shape_labels(scenes, model_config.grid), seen)
            shape_avg = shape.item() if shape_avg is None else 0.98 * shape_avg + 0.02 * shape.item()
            loss = loss + cfg.shape_head * shape
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, cfg.grad_clip)
        opt.step()
        if ema:
            ema.update(step)
        ema_loss = loss.item() if ema_loss is None else 0.98 * ema_loss + 0.02 * loss.item()
        bar.set_postfix(loss=f"{ema_loss:.4f}", lr=f"{lr_at(step, cfg):.2e}", refresh=False)
        if step % 50 == 0 or step == cfg.steps - 1:
            grounding = "" if ground_avg is None else f" grounding {ground_avg:.4f}"
            shapes = "" if shape_avg is None else f" shape {shape_avg:.4f}"
            print(
                f"step {step} loss {ema_loss:.4f}{grounding}{shapes} wall {time.time() - start:.0f}s",
                flush=True,
            )
        if save_every and (step + 1) % save_every == 0 and step + 1 < cfg.steps:
            save({**meta, "steps_done": step + 1}, step + 1)
    wall = time.time() - start
    meta.update(steps_done=cfg.steps, wall_time_s=round(wall, 1), final_loss=round(float(ema_loss or 0.0), 5))
    save(meta, cfg.steps)
    print(f"trained {cfg.steps} steps in {wall / 60:.1f} min (final loss {ema_loss:.4f}); saved to {out}")
    return meta


def _passive_openmp(argv: list[str]) -> None:
    """Re-run this command with ``OMP_WAIT_POLICY=PASSIVE`` unless it is set.

    On a shared CPU, OpenMP threads that spin while waiting made a 2-thread step ~10x slower as
    soon as one other process competed for the cores (measured: 11.8 s vs 1.1 s). The policy is
    read when torch loads, so it has to be in the environment before the interpreter starts.
    """
    if "OMP_WAIT_POLICY" not in os.environ:
        env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
        os.execve(sys.executable, [sys.executable, "-m", "scripts.train", *argv], env)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if __name__ == "__main__":
        _passive_openmp(argv)
    d = TrainConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ASSET_DIR), help="folder to write the weights to")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--logit-mean", type=float, default=d.logit_mean, help="centre of logit-normal σ")
    p.add_argument("--same-colour", type=float, default=d.same_colour, help="see make_scene")
    p.add_argument(
        "--caption-mix",
        default=",".join(f"{m:g}" for m in d.caption_mix),
        help="probabilities of English captions, colour+shape lists and shape-only lists",
    )
    p.add_argument("--big-scenes", type=float, default=d.big_scenes, help="share of 1-2 large-object scenes")
    p.add_argument("--grounding", type=float, default=d.grounding, help="weight of the token grounding loss")
    p.add_argument("--ema", type=float, default=d.ema_decay, help="EMA decay of the saved weights (0: off)")
    m = ReferenceConfig()
    p.add_argument("--num-layers", type=int, default=m.num_layers, help="transformer blocks")
    p.add_argument("--resolution", type=int, default=m.resolution, help="image side in pixels")
    p.add_argument(
        "--dual-attention",
        default=",".join(map(str, m.dual_attention_layers)),
        help="comma-separated blocks with SD3.5's extra image self-attention (default: none)",
    )
    p.add_argument("--patch-size", type=int, default=m.patch_size, help="pixels per image token side")
    p.add_argument("--save-every", type=int, default=250, help="also save every N steps (0: only at the end)")
    p.add_argument("--no-bf16", action="store_true", help="train in plain fp32 (slower)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--vae", default=d.vae, help="train on the latents of this VAE folder (scripts.train_vae)")
    p.add_argument(
        "--shape-head", type=float, default=d.shape_head, help="weight of the per-token shape loss"
    )
    p.add_argument("--shape-block", type=int, default=d.shape_block, help="block the shape head reads")
    p.add_argument("--shape-sigma", type=float, default=d.shape_sigma, help="shape loss only below this σ")
    p.add_argument("--shape-drop", type=float, default=d.shape_drop, help="share of captions dropped")
    p.add_argument("--resume", action="store_true", help="continue from OUT's last checkpoint")
    a = p.parse_args(argv)
    cfg = TrainConfig(
        steps=a.steps,
        batch_size=a.batch_size,
        lr=a.lr,
        seed=a.seed,
        bf16=not a.no_bf16,
        logit_mean=a.logit_mean,
        same_colour=a.same_colour,
        ema_decay=a.ema,
        caption_mix=tuple(float(m) for m in a.caption_mix.split(",")),
        big_scenes=a.big_scenes,
        grounding=a.grounding,
        vae=a.vae,
        shape_head=a.shape_head,
        shape_block=a.shape_block,
        shape_sigma=a.shape_sigma,
        shape_drop=a.shape_drop,
    )
    model_config = ReferenceConfig(
        num_layers=a.num_layers,
        resolution=a.resolution,
        patch_size=a.patch_size,
        dual_attention_layers=tuple(int(b) for b in a.dual_attention.split(",") if b.strip()),
    )
    train(a.out, cfg, model_config, save_every=a.save_every, threads=a.threads, resume=a.resume)


if __name__ == "__main__":
    main()

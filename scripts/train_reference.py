"""Train ``lava-shapes`` v2 from nothing, in one command: VAE, shape-aligned VAE, then the MM-DiT.

    python -m scripts.train_reference --out runs/lava-shapes            # ~1.5 h on a 2-core CPU
    python -m scripts.train_reference --out runs/lava-shapes --resume   # after a stop: goes on

The three stages are the commands that made the shipped weights (docs/reference-model.md):

1. ``scripts.train_vae`` — a stock ``AutoencoderKL`` (4× down, 4 latent channels) for reconstruction;
2. ``scripts.train_vae --init`` — the same VAE fine-tuned with the training-only shape head, so its
   latents carry what a transformer needs to tell shapes apart (the probe: a supervised 4-block
   transformer reaches 0.93 per-token shape accuracy on these latents in 300 steps, 0.38 — chance —
   on stage 1's);
3. ``scripts.train`` — the SD3 transformer and both CLIP encoders on stage 2's latents, with the
   token grounding loss and the training-only shape head on captionless samples.

Each stage writes its own folder under ``--out`` (``vae``, ``vae-shape``, ``model``); ``--resume``
skips a stage whose folder is complete and continues the transformer from its last checkpoint.
The shipped folder is ``OUT/model`` (it holds the VAE it was trained on).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from lava.reference.model import ReferenceConfig
from scripts.train import TrainConfig, train
from scripts.train_vae import VaeConfig, train_vae

VAE = VaeConfig(steps=1500)
VAE_SHAPE = VaeConfig(steps=600, lr=5e-4, warmup=50, scenes=8000, shape=0.2)
TRANSFORMER = TrainConfig(steps=1800, shape_head=0.5, shape_block=2, shape_drop=0.25)
MODEL = ReferenceConfig(resolution=64, patch_size=1)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for the three stages")
    p.add_argument("--resume", action="store_true", help="skip finished stages, continue the last")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    a = p.parse_args(argv)
    out = Path(a.out)
    vae, vae_shape, model = out / "vae", out / "vae-shape", out / "model"
    if not (a.resume and (vae / "train_vae.json").is_file()):
        train_vae(str(vae), VAE, threads=a.threads)
    if not (a.resume and (vae_shape / "train_vae.json").is_file()):
        train_vae(str(vae_shape), VaeConfig(**{**VAE_SHAPE.__dict__, "init": str(vae)}), threads=a.threads)
    cfg = TrainConfig(**{**TRANSFORMER.__dict__, "vae": str(vae_shape)})
    train(str(model), cfg, MODEL, save_every=250, threads=a.threads, resume=a.resume)


if __name__ == "__main__":
    if "OMP_WAIT_POLICY" not in os.environ:  # see scripts.train._passive_openmp
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        os.execv(sys.executable, [sys.executable, "-m", "scripts.train_reference", *sys.argv[1:]])
    main()

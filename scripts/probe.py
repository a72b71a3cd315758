"""Linear shape probe: can a linear read-out tell circle / square / triangle from block-k image tokens?

    python -m scripts.probe --model lava/assets/lava-shapes --scenes 256
    python -m scripts.probe --model runs/pilot --init          # the same architecture, untrained transformer

The gate of every ``lava-shapes`` training pilot (issue #20): a model whose image tokens do not
carry the shape of the object under them cannot give "circle" and "square" different attention,
however lava reads it. For held-out ``standard`` scenes noised to ``σ`` (default 0.05, near clean)
and an empty prompt (so shape cannot come from the caption's words), the output of every joint
block is collected at each image token whose centre lies on an object; a multinomial logistic
regression is fitted on the first half of the scenes and scored on the second half. Tokens are
reported apart as *interior* (the token's pixels and a 1-pixel border around them all lie on one
object) and *edge* (every other object token), since edges are where a local front end sees
corners. Chance is the majority shape's share among the scored tokens.

``--init`` probes the same architecture with the transformer re-initialised (seeded), keeping the
VAE and text encoders: what the front end gives for free, the baseline a run must beat.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from lava.backends.base import vae_factor
from lava.reference.scenes import HELDOUT_START, SHAPES, make_scene


@dataclass(frozen=True)
class ProbeResult:
    """Held-out accuracy of the linear probe at one block (shares in [0, 1])."""

    block: int
    accuracy: float
    interior: float
    edge: float
    chance: float
    tokens: int
    interior_tokens: int


def load_model(path: str | Path, init: bool = False, seed: int = 0):
    """``(pipe, latent_encoder)`` of a saved ``lava-shapes`` folder; ``init`` re-initialises the
    transformer from its config (seeded). ``latent_encoder`` maps ``[B, 3, H, W]`` pixels in
    [-1, 1] to the transformer's clean latents (through the VAE where the model has one)."""
    from diffusers import SD3Transformer2DModel

    from lava.reference.model import load_pipeline

    pipe = load_pipeline(path)
    if init:
        state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        try:
            pipe.transformer = SD3Transformer2DModel.from_config(pipe.transformer.config)
        finally:
            torch.random.set_rng_state(state)
    pipe.transformer.eval().requires_grad_(False)
    vae = pipe.vae

    def encode(pixels: torch.Tensor) -> torch.Tensor:
        if vae is None:
            return pixels
        z = vae.encode(pixels).latent_dist.mean
        return (z - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor

    return pipe, encode


def interior_tokens(objects: np.ndarray, grid: int) -> np.ndarray:
    """``[grid, grid]`` bool: the token's pixel block, grown by one pixel (4-neighbours), lies on
    one object. ``objects``: ``[S, S]`` object ids (0 = background), ``S`` a multiple of ``grid``."""
    p = objects.shape[0] // grid
    pad = np.pad(objects.astype(np.int16), 1, constant_values=-1)
    out = np.zeros((grid, grid), bool)
    for i in range(grid):
        for j in range(grid):
            y, x = i * p + 1, j * p + 1  # the block's top-left in the padded map
            ref = pad[y, x]
            cross = np.concatenate(
                [
                    pad[y : y + p, x : x + p].ravel(),
                    pad[y - 1, x : x + p],
                    pad[y + p, x : x + p],
                    pad[y : y + p, x - 1],
                    pad[y : y + p, x + p],
                ]
            )
            out[i, j] = ref > 0 and bool((cross == ref).all())
    return out


@torch.no_grad()
def block_features(pipe, encode, seeds, sigma: float, resolution: int, batch: int = 32):
    """``(features {block: [N_tok, D]}, shape ids [N_tok], interior [N_tok], scene index [N_tok])``
    over the object tokens of scenes ``seeds``."""
    blocks = pipe.transformer.transformer_blocks
    outputs: dict[int, torch.Tensor] = {}
    hooks = [
        b.register_forward_hook(lambda _m, _i, out, k=k: outputs.__setitem__(k, out[1]))
        for k, b in enumerate(blocks)
    ]
    feats: dict[int, list[np.ndarray]] = {k: [] for k in range(len(blocks))}
    labels, inner, owner = [], [], []
    gen = torch.Generator().manual_seed(1234)
    try:
        for start in range(0, len(seeds), batch):
            scenes = [make_scene(s) for s in seeds[start : start + batch]]
            pixels = np.stack([s.render(resolution) for s in scenes]).astype(np.float32) / 127.5 - 1.0
            x0 = encode(torch.from_numpy(pixels).permute(0, 3, 1, 2))
            xt = (1 - sigma) * x0 + sigma * torch.randn(x0.shape, generator=gen)
            embeds, _, pooled, _ = pipe.encode_prompt(
                prompt=[""] * len(scenes),
                prompt_2=None,
                prompt_3=None,
                do_classifier_free_guidance=False,
                max_sequence_length=8,
            )
            pipe.transformer(
                hidden_states=xt,
                encoder_hidden_states=embeds,
                pooled_projections=pooled,
                timestep=torch.full((len(scenes),), 1000.0 * sigma),
                return_dict=False,
            )
            grid = xt.shape[-1] // pipe.transformer.config.patch_size
            for b, scene in enumerate(scenes):
                lab = scene.labels(grid, "shape").ravel().astype(np.int64) - 1  # -1: background
                keep = lab >= 0
                inside = interior_tokens(scene.object_map(resolution), grid).ravel()
                for k in feats:
                    feats[k].append(outputs[k][b].float().numpy()[keep])
                labels.append(lab[keep])
                inner.append(inside[keep])
                owner.append(np.full(int(keep.sum()), start + b))
    finally:
        for h in hooks:
            h.remove()
    return (
        {k: np.concatenate(v) for k, v in feats.items()},
        np.concatenate(labels),
        np.concatenate(inner),
        np.concatenate(owner),
    )


def fit_linear(x: np.ndarray, y: np.ndarray, classes: int, steps: int = 200, l2: float = 1e-3):
    """Multinomial logistic regression on standardised features (L-BFGS, seeded zero init)."""
    mean, std = x.mean(0), x.std(0) + 1e-6
    xt = torch.from_numpy((x - mean) / std).float()
    yt = torch.from_numpy(y)
    w = torch.zeros(x.shape[1], classes, requires_grad=True)
    b = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(xt @ w + b, yt) + l2 * w.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    return lambda z: (torch.from_numpy((z - mean) / std).float() @ w + b).argmax(-1).numpy()


def probe(
    pipe, encode, scenes: int = 256, sigma: float = 0.05, resolution: int | None = None
) -> list[ProbeResult]:
    """The probe at every joint block over ``scenes`` held-out scenes (half fitted, half scored)."""
    if resolution is None:
        resolution = pipe.transformer.config.sample_size * vae_factor(pipe.vae)
    seeds = list(range(HELDOUT_START, HELDOUT_START + scenes))
    feats, y, inner, owner = block_features(pipe, encode, seeds, sigma, resolution)
    fit, test = owner < scenes // 2, owner >= scenes // 2
    chance = float(np.bincount(y[test], minlength=len(SHAPES)).max() / max(1, test.sum()))
    results = []
    for k, x in feats.items():
        pred = fit_linear(x[fit], y[fit], len(SHAPES))(x[test])
        ok = pred == y[test]
        it = inner[test]
        results.append(
            ProbeResult(
                block=k,
                accuracy=float(ok.mean()),
                interior=float(ok[it].mean()) if it.any() else float("nan"),
                edge=float(ok[~it].mean()) if (~it).any() else float("nan"),
                chance=chance,
                tokens=int(test.sum()),
                interior_tokens=int(it.sum()),
            )
        )
    return results


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model", required=True, help="a lava-shapes folder (shipped or written by scripts.train)"
    )
    p.add_argument("--init", action="store_true", help="re-initialise the transformer (the baseline)")
    p.add_argument("--scenes", type=int, default=256, help="held-out scenes (half fitted, half scored)")
    p.add_argument("--sigma", type=float, default=0.05, help="noise level of the probed inputs")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, help="also write the results here")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    pipe, encode = load_model(a.model, init=a.init)
    results = probe(pipe, encode, a.scenes, a.sigma)
    print(f"{'block':>5} {'acc':>6} {'interior':>8} {'edge':>6} {'chance':>6}  ({results[0].tokens} tokens)")
    for r in results:
        print(f"{r.block:>5} {r.accuracy:6.3f} {r.interior:8.3f} {r.edge:6.3f} {r.chance:6.3f}")
    if a.json:
        Path(a.json).write_text(
            json.dumps(
                {
                    "model": a.model,
                    "init": a.init,
                    "sigma": a.sigma,
                    "scenes": a.scenes,
                    "command": "python -m scripts.probe " + " ".join(sys.argv[1:]),
                    "blocks": [asdict(r) for r in results],
                },
                indent=2,
            )
            + "\n"
        )


if __name__ == "__main__":
    main()

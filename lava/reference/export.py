"""Write held-out shape scenes as a ``folder`` dataset, for ``lava eval`` / ``lava sweep``.

    python -m lava.reference.export --out shapes_heldout --count 64 --vocab colour_shape
    lava eval --dataset folder --root shapes_heldout --out results/shapes
    python -m lava.reference.export --out shapes_hard --split hard --count 64
    lava sweep --dataset folder --root shapes_hard --timesteps 50,100,200,400,600,800 \
        --layers 0,1,2,3 --with-mean --out results/shapes-sweep

``--split standard`` scenes hold 1–3 objects, ``--split hard`` 3–5 smaller ones; either way
``lava eval`` names every class of the vocabulary by default (``--protocol all``).

The layout is the one ``lava.evaluation`` reads as ``--dataset folder``: ``classes.txt`` (label-id
order, ``background`` first), ``images/<id>.png``, ``labels/<id>.png``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image

from .. import io
from .scenes import SPLITS, VOCABS, class_names, heldout_seeds, make_scene


def export(
    out: Path, count: int, vocab: str = "colour_shape", size: int = 64, split: str = "standard"
) -> Path:
    """Render the first ``count`` scenes of a held-out split with ``[size, size]`` label maps into ``out``."""
    names = class_names(vocab)
    io.atomic_write(out / "classes.txt", lambda p: p.write_text("\n".join(names) + "\n"))
    for seed in heldout_seeds(count, split):
        scene = make_scene(seed)
        io.save_png(Image.fromarray(scene.render(size)), out / "images" / f"scene_{seed}.png")
        io.save_png(Image.fromarray(scene.labels(size, vocab)), out / "labels" / f"scene_{seed}.png")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--count", type=int, default=64)
    parser.add_argument("--vocab", choices=VOCABS, default="colour_shape")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--split", choices=sorted(SPLITS), default="standard", help="held-out split")
    args = parser.parse_args(argv)
    export(args.out, args.count, args.vocab, args.size, args.split)
    print(f"wrote {args.count} {args.split} held-out scenes ({args.vocab} classes) to {args.out}")


if __name__ == "__main__":
    main()

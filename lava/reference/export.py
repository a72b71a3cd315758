"""Write held-out shape scenes as a ``folder`` dataset, for ``lava eval`` / ``lava sweep``.

    python -m lava.reference.export --out shapes_heldout --count 64 --vocab colour_shape
    lava sweep --dataset folder --root shapes_heldout --model lava-shapes --protocol present \
        --timesteps 50,100,200,400,600,800 --layers 0,1,2,3 --with-mean --out results/shapes-sweep

The layout is the one ``lava.evaluation`` reads as ``--dataset folder``: ``classes.txt`` (label-id
order, ``background`` first), ``images/<id>.png``, ``labels/<id>.png``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image

from .. import io
from .scenes import VOCABS, class_names, heldout_seeds, make_scene


def export(out: Path, count: int, vocab: str = "colour_shape", size: int = 64) -> Path:
    """Render the first ``count`` held-out scenes with their ``[size, size]`` label maps into ``out``."""
    names = class_names(vocab)
    io.atomic_write(out / "classes.txt", lambda p: p.write_text("\n".join(names) + "\n"))
    for seed in heldout_seeds(count):
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
    args = parser.parse_args(argv)
    export(args.out, args.count, args.vocab, args.size)
    print(f"wrote {args.count} held-out scenes ({args.vocab} classes) to {args.out}")


if __name__ == "__main__":
    main()

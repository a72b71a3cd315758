"""The files ``lava segment`` writes for one image, written as a set (all appear, or none); the
explorer's downloads are the same files, written by the same code.

Nothing heavy is imported at module level: ``lava --help`` imports this module.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def write_set(files: dict[str, Path], seg, classes: Sequence[str]) -> None:
    """Write one image's files (``seg`` holds that image alone) as a set: all appear, or none."""
    import numpy as np

    from . import io

    with io.atomic_files(list(files.values())) as tmps:
        tmp = dict(zip(files, tmps))
        seg.label_image(0).save(tmp["labels"], format="PNG")
        seg.overlay(0).save(tmp["overlay"], format="PNG")
        tmp["classes"].write_text("\n".join(seg.classes) + "\n")
        if "scores" in tmp:
            with open(tmp["scores"], "wb") as fh:
                np.savez_compressed(fh, scores=seg.scores[0].numpy(), classes=np.array(list(classes)))
        if "heatmaps" in tmp:
            import matplotlib.pyplot as plt

            from .stages.aggregate import normalize_scores
            from .types import Heatmaps

            heat = Heatmaps(
                scores=normalize_scores(seg.scores[0][None], "minmax"),
                classes=tuple(classes),
                image_sizes=(tuple(seg.scores[0].shape[-2:]),),
                normalize="minmax",
            )
            fig = heat.plot(0, image=seg.images[0])
            try:
                fig.savefig(tmp["heatmaps"], format="png", dpi=100)
            finally:
                plt.close(fig)

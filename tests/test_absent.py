"""Absent classes: normalisation, presence and background on maps built by hand, and the model's
own denoising evidence checked against an explicit computation."""

from __future__ import annotations

import pytest
import torch

import lava
from lava.errors import LavaError
from lava.stages.aggregate import normalize_scores, peak_presence
from lava.stages.presence import ablated_texts, denoising_presence, with_presence
from lava.types import Heatmaps, MaskConfig


def _blob(h: int, w: int, top: int, left: int, size: int, value: float) -> torch.Tensor:
    m = torch.zeros(h, w)
    m[top : top + size, left : left + size] = value
    return m


@pytest.fixture
def absent_case() -> Heatmaps:
    """Class 0 is present (a strong square in the top-left); class 1 is absent: its map is weak
    everywhere, with a faint bump in the bottom-right where there is only background."""
    present = 0.01 + _blob(8, 8, 1, 1, 3, 0.5)
    absent = 0.01 + _blob(8, 8, 5, 5, 2, 0.03)
    scores = torch.stack([present, absent])[None]
    return Heatmaps(
        scores=scores,
        classes=("cat", "dog"),
        image_sizes=((8, 8),),
        normalize="none",
        presence=peak_presence(scores),
    )


def _normalized(heat: Heatmaps, how: str) -> Heatmaps:
    return Heatmaps(normalize_scores(heat.scores, how), heat.classes, heat.image_sizes, how, heat.presence)


def test_minmax_stretches_an_absent_class_global_does_not(absent_case):
    minmax = lava.to_mask(_normalized(absent_case, "minmax"), background_threshold=0.5)
    global_ = lava.to_mask(_normalized(absent_case, "global"), background_threshold=0.5)
    dog = minmax.classes.index("dog")
    assert (minmax.labels[0] == dog).sum() == 4  # the faint bump became a "dog"
    assert (global_.labels[0] == dog).sum() == 0
    assert (global_.labels[0] == global_.classes.index("cat")).sum() == 9


def test_global_keeps_relative_strength():
    scores = torch.tensor([[[[0.0, 2.0]], [[1.0, 4.0]]]])  # [B=1, C=2, 1, 2]
    out = normalize_scores(scores, "global")
    torch.testing.assert_close(out, scores / 4.0)
    per_class = normalize_scores(scores, "minmax")
    torch.testing.assert_close(per_class[0, :, 0, 1], torch.ones(2))


def test_peak_presence_is_relative_to_the_strongest_class(absent_case):
    torch.testing.assert_close(absent_case.presence, torch.tensor([[1.0, 0.04 / 0.51]]))


def test_min_presence_keeps_a_weak_class_from_taking_pixels(absent_case):
    heat = _normalized(absent_case, "minmax")
    seg = lava.to_mask(heat, config=MaskConfig(background_threshold=0.5, min_presence=0.2))
    assert (seg.labels[0] == seg.classes.index("dog")).sum() == 0
    assert (seg.labels[0] == seg.classes.index("cat")).sum() == 9
    # The strongest class of an image may always take pixels, whatever the floor.
    strict = lava.to_mask(heat, config=MaskConfig(min_presence=2.0))
    assert (strict.labels[0] == strict.classes.index("cat")).all()


def test_min_presence_needs_presence(absent_case):
    bare = Heatmaps(absent_case.scores, absent_case.classes, absent_case.image_sizes, "none")
    with pytest.raises(LavaError, match="presence"):
        lava.to_mask(bare, config=MaskConfig(min_presence=0.5))
    with pytest.raises(LavaError, match=r"\[B, C\]"):
        with_presence(bare, torch.ones(2, 2))


def test_aggregate_fills_presence(tiny, image):
    noisy = lava.noise(tiny, image, timestep=500)
    prompt = lava.encode_prompt(tiny, ["cat", "dog", "bus"])
    raw = lava.aggregate(lava.capture(tiny, noisy, prompt, layers=[1]), prompt, normalize="none")
    heat = lava.aggregate(lava.capture(tiny, noisy, prompt, layers=[1]), prompt, normalize="minmax")
    peaks = raw.scores.flatten(2).amax(-1)
    torch.testing.assert_close(heat.presence, peaks / peaks.amax(-1, keepdim=True))
    assert heat.presence.amax() == 1.0


def test_ablated_texts_drop_one_name_from_its_own_row(tiny):
    prompt = lava.encode_prompt(tiny, ["cat", "dog", "bus", "sofa", "tree"], max_classes_per_prompt=2)
    by_row = {n: prompt.texts[prompt.row(n)] for n in prompt.classes}
    for name, text in zip(prompt.classes, ablated_texts(prompt)):
        others = [c for c in prompt.classes_in_row(prompt.row(name)) if c != name]
        assert text == " ".join(others)
        assert name not in text.split() and set(text.split()) < set(by_row[name].split()) | {""}


def test_denoising_presence_equals_explicit_errors(tiny, image):
    classes = ["cat", "dog", "bus"]
    noisy = [lava.noise(tiny, image, sigma=s, seed=1) for s in (0.4, 0.8)]
    prompt = lava.encode_prompt(tiny, classes)
    got = denoising_presence(tiny, noisy, prompt, batch=2)

    def error(run, text):
        embeds, pooled, _ = tiny.encode_text(text)
        with torch.no_grad():
            pred = tiny.transformer(
                hidden_states=run.latents,
                encoder_hidden_states=embeds,
                pooled_projections=pooled,
                timestep=torch.full((1,), run.timestep),
                return_dict=False,
            )[0]
        return float((pred - (run.noise - run.clean)).pow(2).mean())

    delta = torch.tensor(
        [
            sum(error(r, " ".join(c for c in classes if c != name)) - error(r, prompt.text) for r in noisy)
            / 2
            for name in classes
        ]
    ).clamp_min(0)
    torch.testing.assert_close(got[0], delta / delta.max(), rtol=1e-4, atol=1e-5)
    assert got.shape == (1, 3)


def test_to_mask_keywords_override_the_config(absent_case):
    heat = _normalized(absent_case, "minmax")
    config = MaskConfig(background_threshold=0.5, min_presence=0.5)
    by_config = lava.to_mask(heat, config=config)
    assert (by_config.labels[0] == by_config.classes.index("dog")).sum() == 0  # presence drops it
    freed = lava.to_mask(heat, config=config, min_presence=0)
    assert (freed.labels[0] == freed.classes.index("dog")).sum() == 4
    no_bg = lava.to_mask(heat, config=config, background_threshold=0)
    assert no_bg.classes == ("cat", "dog")


def test_to_mask_refuses_a_background_class_next_to_a_threshold(absent_case):
    heat = Heatmaps(
        absent_case.scores, ("cat", "background"), absent_case.image_sizes, "none", absent_case.presence
    )
    with pytest.raises(lava.ClassNameError, match="background"):
        lava.to_mask(heat, background_threshold=0.3)
    assert lava.to_mask(heat).classes == ("cat", "background")


def test_null_presence_compares_each_class_with_its_rows_filler_tokens(tiny, image):
    from lava.stages.presence import null_presence, text_keys

    noisy = lava.noise(tiny, image, timestep=500)
    prompt = lava.encode_prompt(tiny, ["cat", "dog", "bus", "sofa", "tree"], max_classes_per_prompt=2)
    slices = lava.capture(tiny, noisy, prompt, layers=[1, 2], columns=text_keys(prompt))
    assert slices.columns == tuple(range(prompt.num_prompts * prompt.text_len))
    got = null_presence(slices, prompt)
    # Explicitly, class by class: its tokens' mean map against the mean of its row's other keys.
    t, named = prompt.text_len, set(prompt.columns())
    want = []
    for name in prompt.classes:
        row = prompt.row(name)
        filler = [k for k in range(row * t, (row + 1) * t) if k not in named]
        own = list(prompt.positions(name))
        a = torch.stack([slices.maps[b][0].mean(0)[:, own].mean(-1) for b in (1, 2)]).mean(0)
        a0 = torch.stack([slices.maps[b][0].mean(0)[:, filler].mean(-1) for b in (1, 2)]).mean(0)
        want.append(float((a - a0).max() > 0))
    assert got.tolist() == [want]
    heat = with_presence(lava.aggregate(slices, prompt), got)  # extra columns leave the maps as they were
    plain = lava.aggregate(lava.capture(tiny, noisy, prompt, layers=[1, 2]), prompt)
    torch.testing.assert_close(heat.scores, plain.scores)
    with pytest.raises(LavaError, match="columns=text_keys"):
        null_presence(lava.capture(tiny, noisy, prompt, layers=[1]), prompt)


def test_null_presence_on_maps_built_by_hand():
    from conftest import hand_slices

    from lava.stages.presence import null_presence
    from lava.types import PromptEncoding

    # One prompt of 6 keys: "cat" at 1, "dog" at 2-3, filler at 0, 4, 5; four image tokens.
    prompt = PromptEncoding(
        classes=("cat", "dog"),
        texts=("cat dog",),
        embeds=torch.zeros(1, 6, 4),
        pooled=torch.zeros(1, 4),
        clip_spans={"cat": (1,), "dog": (2, 3)},
        t5_spans={},
        clip_len=6,
        text_len=6,
    )
    maps = torch.full((1, 1, 4, 6), 0.10)
    maps[0, 0, 2, 1] = 0.30  # cat beats the filler at one image token
    maps[0, 0, :, 2:4] = 0.05  # dog never does
    slices = hand_slices({0: maps}, range(6), (2, 2), ((2, 2),))
    assert null_presence(slices, prompt).tolist() == [[1.0, 0.0]]

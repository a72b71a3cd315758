"""Vocabularies of any length: split into prompts that fit, run as one batch, merged exactly."""

from __future__ import annotations

import pytest
import torch

import lava
from lava.errors import ClassNameError, LavaError
from lava.evaluation.datasets import dataset_info
from lava.stages.prompts import split_classes

CLASSES = ["cat", "potted plant", "hydrant", "dog", "traffic light", "sofa", "bus"]


def _decode(tokenizer, text, positions):
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    return tokenizer.decode([ids[p] for p in positions]).replace("▁", " ").strip()


def _clip_tokens(backend, names) -> int:
    return len(backend.pipe.tokenizer(" ".join(names), add_special_tokens=False)["input_ids"])


def test_split_is_fewest_prompts_with_the_shortest_longest_prompt(tiny):
    import itertools

    names = ["cat", "potted plant", "hydrant", "dog", "traffic light", "sofa", "bus", "zebra crossing"]
    groups = split_classes(tiny, names, max_classes_per_prompt=3)
    # Brute force over every cut of the list into consecutive groups of at most 3 names.
    cuts = []
    for k in range(1, len(names)):
        for points in itertools.combinations(range(1, len(names)), k):
            bounds = [0, *points, len(names)]
            parts = [names[a:b] for a, b in itertools.pairwise(bounds)]
            if all(len(p) <= 3 for p in parts):
                cuts.append(parts)
    fewest = min(len(c) for c in cuts)
    shortest = min(max(_clip_tokens(tiny, p) for p in c) for c in cuts if len(c) == fewest)
    assert len(groups) == fewest
    assert max(_clip_tokens(tiny, g) for g in groups) == shortest


def test_short_list_is_one_prompt(tiny):
    prompt = lava.encode_prompt(tiny, CLASSES)
    assert prompt.num_prompts == 1 and prompt.rows == dict.fromkeys(CLASSES, 0)
    assert prompt.text == " ".join(CLASSES)
    assert prompt.embeds.shape[0] == 1


def test_ade150_is_split_into_prompts_that_fit(tiny):
    names = list(dataset_info("ade20k").prompt_names)
    groups = split_classes(tiny, names)
    assert len(groups) > 1
    assert [n for g in groups for n in g] == names  # every name once, in order
    loads = [_clip_tokens(tiny, g) for g in groups]
    assert max(loads) <= tiny.clip_len - 2
    assert max(loads) - min(loads) < max(_clip_tokens(tiny, [n]) for n in names)  # alike in length
    prompt = lava.encode_prompt(tiny, names)
    assert prompt.num_prompts == len(groups)
    assert prompt.embeds.shape[:2] == (len(groups), tiny.text_len)
    for name in names:
        text = prompt.texts[prompt.row(name)]
        assert _decode(tiny.pipe.tokenizer, text, prompt.clip_spans[name]) == name
        assert max(prompt.clip_spans[name]) < tiny.clip_len - 1  # inside the CLIP window
        t5_local = [p - prompt.clip_len for p in prompt.t5_spans[name]]
        assert _decode(tiny.pipe.tokenizer_3, text, t5_local) == name
        assert max(t5_local) < tiny.max_sequence_length - 1  # inside the T5 window
    keys = [k for n in names for k in prompt.positions(n)]
    assert len(keys) == len(set(keys))  # keys of different rows never collide
    assert all(k // prompt.text_len == prompt.row(n) for n in names for k in prompt.positions(n))


def test_text_of_several_prompts_asks_for_texts(tiny):
    prompt = lava.encode_prompt(tiny, CLASSES, max_classes_per_prompt=3)
    assert sorted(len(prompt.classes_in_row(r)) for r in range(prompt.num_prompts)) == [2, 2, 3]
    with pytest.raises(ValueError, match="3 prompts"):
        _ = prompt.text


def test_rows_embed_exactly_like_single_prompts(tiny):
    prompt = lava.encode_prompt(tiny, CLASSES, max_classes_per_prompt=3)
    for row, text in enumerate(prompt.texts):
        alone = lava.encode_prompt(tiny, list(prompt.classes_in_row(row)))
        assert alone.text == text
        torch.testing.assert_close(prompt.embeds[row : row + 1], alone.embeds, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(prompt.pooled[row : row + 1], alone.pooled, rtol=1e-6, atol=1e-6)


def test_bad_max_classes_per_prompt(tiny):
    with pytest.raises(ClassNameError, match="positive number of classes"):
        lava.encode_prompt(tiny, CLASSES, max_classes_per_prompt=-1)
    # 0: as many names per prompt as fit
    assert (
        lava.encode_prompt(tiny, CLASSES, max_classes_per_prompt=0).texts
        == lava.encode_prompt(tiny, CLASSES).texts
    )


def test_window_is_respected_with_a_template(tiny):
    names = [f"object {i}" for i in range(40)]
    groups = split_classes(tiny, names, template="a photo of {}.", separator=", ")
    for group in groups:
        prompt = lava.encode_prompt(tiny, list(group), template="a photo of {}.", separator=", ")
        assert prompt.num_prompts == 1


@pytest.mark.parametrize("direction", ["image_to_text", "text_to_image"])
@pytest.mark.parametrize("softmax", ["joint", "cross"])
def test_merged_maps_equal_each_prompt_captured_alone(tiny35, image, direction, softmax):
    """The merge adds nothing: each class's columns are exactly those of its own prompt's forward."""
    noisy = lava.noise(tiny35, [image, image.transpose(0)], timestep=400, seed=2)
    prompt = lava.encode_prompt(tiny35, CLASSES, max_classes_per_prompt=3)
    merged = lava.capture(
        tiny35, noisy, prompt, layers=[0, 3], direction=direction, softmax=softmax, heads="none"
    )
    for row in range(prompt.num_prompts):
        names = list(prompt.classes_in_row(row))
        alone = lava.encode_prompt(tiny35, names)
        single = lava.capture(
            tiny35, noisy, alone, layers=[0, 3], direction=direction, softmax=softmax, heads="none"
        )
        for name in names:
            got = merged.column_indices(prompt.positions(name))
            want = single.column_indices(alone.positions(name))
            for block in (0, 3):
                torch.testing.assert_close(
                    merged.maps[block][..., got], single.maps[block][..., want], rtol=1e-5, atol=1e-6
                )


def test_prompt_batch_only_changes_how_many_rows_share_a_forward(tiny, image):
    noisy = lava.noise(tiny, image, timestep=500)
    prompt = lava.encode_prompt(tiny, CLASSES, max_classes_per_prompt=2)
    assert prompt.num_prompts == 4
    together = lava.capture(tiny, noisy, prompt, layers=[1, 2])
    apart = lava.capture(tiny, noisy, prompt, layers=[1, 2], prompt_batch=1)
    assert together.columns == apart.columns == prompt.columns()
    for block in (1, 2):
        torch.testing.assert_close(together.maps[block], apart.maps[block], rtol=1e-5, atol=1e-7)
    with pytest.raises(LavaError, match="prompt_batch"):
        lava.capture(tiny, noisy, prompt, layers=[1], prompt_batch=0)


def test_capture_of_chosen_keys_in_given_order(tiny, image):
    noisy = lava.noise(tiny, image, timestep=500)
    prompt = lava.encode_prompt(tiny, CLASSES, max_classes_per_prompt=3)
    keys = [*prompt.positions("bus"), *prompt.positions("cat")]  # last row first
    some = lava.capture(tiny, noisy, prompt, layers=[1], columns=keys)
    every = lava.capture(tiny, noisy, prompt, layers=[1])
    assert some.columns == tuple(keys)
    torch.testing.assert_close(some.maps[1], every.maps[1][..., every.column_indices(tuple(keys))])
    with pytest.raises(LavaError, match="out of range"):
        lava.capture(tiny, noisy, prompt, layers=[1], columns=[prompt.num_prompts * prompt.text_len])


def test_segment_with_split_prompts(tiny, image):
    whole = lava.segment(image, CLASSES, backend=tiny, background_threshold=0)
    same = lava.segment(image, CLASSES, backend=tiny, background_threshold=0, max_classes_per_prompt=7)
    split = lava.segment(image, CLASSES, backend=tiny, background_threshold=0, max_classes_per_prompt=2)
    assert whole.classes == same.classes == split.classes == tuple(CLASSES)
    torch.testing.assert_close(whole.scores[0], same.scores[0])
    assert split.scores[0].shape == whole.scores[0].shape

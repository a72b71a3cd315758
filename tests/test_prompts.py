"""Token spans locate each class exactly; bad class lists are refused by name."""

from __future__ import annotations

import pytest

import lava
from lava.errors import ClassNameError

CLASSES = ["cat", "potted plant", "traffic light", "hydrant", "dining table"]


def _decode(tokenizer, text, positions):
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    return tokenizer.decode([ids[p] for p in positions]).replace("▁", " ").strip()


def test_spans_decode_to_class_text_in_clip_and_t5(tiny):
    prompt = lava.encode_prompt(tiny, CLASSES)
    assert any(len(prompt.clip_spans[c]) > 1 for c in CLASSES)  # multi-token names are exercised
    assert len(prompt.clip_spans["hydrant"]) > 1  # a single word split into several tokens
    for name in CLASSES:
        assert _decode(tiny.pipe.tokenizer, prompt.text, prompt.clip_spans[name]) == name
        t5_local = [p - prompt.clip_len for p in prompt.t5_spans[name]]
        assert all(p >= prompt.clip_len for p in prompt.t5_spans[name])
        assert _decode(tiny.pipe.tokenizer_3, prompt.text, t5_local) == name
        assert prompt.spans[name] == prompt.clip_spans[name] + prompt.t5_spans[name]


def test_spans_are_in_text_sequence_and_disjoint(tiny):
    prompt = lava.encode_prompt(tiny, CLASSES)
    assert prompt.text_len == tiny.text_len == prompt.embeds.shape[1]
    every = [p for c in CLASSES for p in prompt.spans[c]]
    assert len(every) == len(set(every))
    assert all(0 < p < prompt.text_len for p in every)
    assert prompt.columns() == tuple(sorted(every))


def test_template_shifts_spans(tiny):
    prompt = lava.encode_prompt(tiny, ["cat", "dog"], template="a photo of {}.", separator=" and ")
    assert prompt.text == "a photo of cat and dog."
    assert _decode(tiny.pipe.tokenizer, prompt.text, prompt.clip_spans["dog"]) == "dog"


def test_punctuation_class_matches_in_both_clip_tokenizers(tiny):
    prompt = lava.encode_prompt(tiny, ["cat", "!!!"])  # "!" is the second CLIP tokenizer's pad token
    assert _decode(tiny.pipe.tokenizer, prompt.text, prompt.clip_spans["!!!"]) == "!!!"


def test_comma_string_is_split(tiny):
    assert lava.encode_prompt(tiny, "cat, dog").classes == ("cat", "dog")


def test_drop_t5_leaves_no_t5_spans():
    backend = lava.load_backend("tiny-sd3", drop_t5=True)
    prompt = lava.encode_prompt(backend, ["cat", "dog"])
    assert prompt.t5_spans == {}
    assert prompt.embeds.shape[1] == backend.text_len
    assert float(prompt.embeds[0, prompt.clip_len :].abs().sum()) == 0.0  # T5 part is zeros


@pytest.mark.parametrize(
    ("classes", "match"),
    [
        ([], "no classes"),
        (["cat", "  "], "#2 is blank"),
        (["cat", "Cat"], "duplicate class name 'Cat'"),
    ],
)
def test_bad_class_lists(tiny, classes, match):
    with pytest.raises(ClassNameError, match=match):
        lava.encode_prompt(tiny, classes)


def test_class_too_long_for_any_prompt_is_named(tiny):
    long_name = " ".join(["striped"] * 90) + " zebra"
    with pytest.raises(
        ClassNameError, match=r"class 'striped striped.* zebra' does not fit one prompt on its own"
    ):
        lava.encode_prompt(tiny, ["cat", long_name])


def test_bad_template(tiny):
    with pytest.raises(ClassNameError, match="exactly once"):
        lava.encode_prompt(tiny, ["cat"], template="no slot")


def test_tiny_tokenizers_are_identical_across_processes():
    import subprocess
    import sys

    code = (
        "import json, hashlib; from lava.backends.tiny import _clip_vocab, _t5_vocab;"
        "v, m = _clip_vocab(); blob = json.dumps([sorted(v.items()), m, _t5_vocab()]);"
        "print(hashlib.md5(blob.encode()).hexdigest())"
    )
    digests = {
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        for _ in range(2)
    }
    assert len(digests) == 1

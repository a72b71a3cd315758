"""Stage 2: class names → ``PromptEncoding`` (prompt text, embeddings, token span per class).

A class's span is found from the tokenizers' character offsets, so multi-word ("potted plant")
and multi-token ("hydrant" → "hy", "dr", "ant") names get exactly the tokens they occupy, in
the CLIP part of the text sequence and in the T5 part.
"""

from __future__ import annotations

from collections.abc import Sequence

from .backends.base import Backend
from .errors import ClassNameError
from .types import PromptEncoding

# Seg4Diff joins the class names with spaces and no template; that is our default too.
DEFAULT_TEMPLATE = "{}"
DEFAULT_SEPARATOR = " "


def parse_classes(classes: str | Sequence[str]) -> tuple[str, ...]:
    """Validated class names: a list, or one comma-separated string.

    Rejects an empty list, blank names and duplicates (compared case-insensitively).
    """
    if isinstance(classes, str):
        classes = classes.split(",")
    names = [str(c) for c in classes]
    if not names:
        raise ClassNameError("no classes given: expected at least one class name")
    cleaned = []
    for i, name in enumerate(names):
        name = " ".join(name.split())
        if not name:
            raise ClassNameError(f"class name #{i + 1} is blank: every class needs a name")
        cleaned.append(name)
    seen: dict[str, str] = {}
    for name in cleaned:
        key = name.lower()
        if key in seen:
            raise ClassNameError(
                f"duplicate class name {name!r} (same as {seen[key]!r}): names must be unique"
            )
        seen[key] = name
    return tuple(cleaned)


def build_prompt(
    classes: Sequence[str], template: str = DEFAULT_TEMPLATE, separator: str = DEFAULT_SEPARATOR
) -> tuple[str, dict[str, tuple[int, int]]]:
    """The prompt text and each class's character range ``[start, end)`` in it."""
    if template.count("{}") != 1:
        raise ClassNameError(
            f"template must contain '{{}}' exactly once (where the classes go), got {template!r}"
        )
    prefix, suffix = template.split("{}")
    text, chars = prefix, {}
    for i, name in enumerate(classes):
        if i:
            text += separator
        chars[name] = (len(text), len(text) + len(name))
        text += name
    return text + suffix, chars


def token_spans(tokenizer, text: str, chars: dict[str, tuple[int, int]]) -> dict[str, tuple[int, ...]]:
    """Token positions (special tokens counted) whose characters overlap each class's characters.

    Added special tokens (begin/end) have empty offsets and never match. Token ids are not
    consulted, since SD3's second CLIP tokenizer uses "!" as its pad token.
    """
    offsets = tokenizer(text, return_offsets_mapping=True, add_special_tokens=True)["offset_mapping"]
    return {
        name: tuple(i for i, (s, e) in enumerate(offsets) if e > s and s < b and e > a)
        for name, (a, b) in chars.items()
    }


def _check_fits(spans: dict[str, tuple[int, ...]], limit: int, part: str) -> None:
    for name, pos in spans.items():
        if not pos:
            raise ClassNameError(f"class {name!r} produced no {part} tokens; use a name made of words")
        if max(pos) >= limit:
            raise ClassNameError(
                f"class {name!r} falls beyond the {part} token limit ({limit} content tokens): "
                "use fewer or shorter class names"
            )


def encode_prompt(
    backend: Backend,
    classes: str | Sequence[str],
    *,
    template: str = DEFAULT_TEMPLATE,
    separator: str = DEFAULT_SEPARATOR,
) -> PromptEncoding:
    """Encode a prompt naming ``classes`` and locate each class in the text sequence.

    The text sequence is ``clip_len`` CLIP tokens (both CLIP encoders share positions) followed
    by ``max_sequence_length`` T5 tokens; spans count positions in that sequence. With T5
    dropped its part holds zeros and classes have no T5 positions.
    """
    names = parse_classes(classes)
    text, chars = build_prompt(names, template, separator)
    pipe = backend.pipe
    clip_len = backend.clip_len

    clip_spans = token_spans(pipe.tokenizer, text, chars)
    if (
        getattr(pipe, "tokenizer_2", None) is not None
        and token_spans(pipe.tokenizer_2, text, chars) != clip_spans
    ):
        raise ClassNameError(
            "the two CLIP tokenizers place the classes differently; lava expects them to match"
        )
    _check_fits(clip_spans, clip_len - 1, "CLIP")  # the last slot holds the end token

    t5_spans: dict[str, tuple[int, ...]] = {}
    if backend.has_t5:
        raw = token_spans(pipe.tokenizer_3, text, chars)
        _check_fits(raw, backend.max_sequence_length - 1, "T5")
        t5_spans = {n: tuple(clip_len + p for p in pos) for n, pos in raw.items()}

    embeds, pooled = backend.encode_text(text)
    return PromptEncoding(
        classes=names,
        text=text,
        embeds=embeds,
        pooled=pooled,
        clip_spans=clip_spans,
        t5_spans=t5_spans,
        clip_len=clip_len,
        text_len=int(embeds.shape[1]),
    )

"""Stage 2: class names → ``PromptEncoding`` (prompt texts, embeddings, token span per class).

A class's span is found from the tokenizers' character offsets, so multi-word ("potted plant")
and multi-token ("hydrant" → "hy", "dr", "ant") names get exactly the tokens they occupy, in
the CLIP part of the text sequence and in the T5 part. A vocabulary longer than one prompt
window (SD3's CLIP window holds 75 content tokens; Flux's sequence is T5 only, 511 content
tokens by default) is split over several prompts.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..backends.base import Backend
from ..backends.tokens import token_spans
from ..errors import ClassNameError
from ..types import PromptEncoding

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


def _overflow(spans: dict[str, tuple[int, ...]], limit: int, part: str) -> list[str]:
    """Names whose tokens reach past ``limit``; raises for a name with no tokens at all."""
    for name, pos in spans.items():
        if not pos:
            raise ClassNameError(f"class {name!r} produced no {part} tokens; use a name made of words")
    return [name for name, pos in spans.items() if max(pos) >= limit]


def locate(backend: Backend, text: str, chars: dict[str, tuple[int, int]]):
    """``(clip_spans, t5_spans, overflow)`` of one prompt text: each class's positions in the
    text sequence, and the classes that fall beyond a token window (CLIP's last slot holds the
    end token, T5's its end-of-sequence token)."""
    pipe = backend.pipe
    clip_len = backend.clip_len
    if clip_len:
        clip_spans = token_spans(pipe.tokenizer, text, chars)
        if (
            getattr(pipe, "tokenizer_2", None) is not None
            and token_spans(pipe.tokenizer_2, text, chars) != clip_spans
        ):
            raise ClassNameError(
                "the two CLIP tokenizers place the classes differently; lava expects them to match"
            )
        overflow = _overflow(clip_spans, clip_len - 1, "CLIP")
    else:
        # Flux: CLIP only gives the pooled vector, so classes live in the T5 tokens alone.
        clip_spans, overflow = dict.fromkeys(chars, ()), []
    t5_spans: dict[str, tuple[int, ...]] = {}
    if backend.has_t5:
        raw = backend.family.sequence_spans(backend, text, chars)
        window = backend.family.sequence_window(backend)
        overflow += [n for n in _overflow(raw, window, backend.sequence_encoder) if n not in overflow]
        t5_spans = {n: tuple(clip_len + p for p in pos) for n, pos in raw.items()}
    return clip_spans, t5_spans, overflow


def _fits(backend: Backend, names: Sequence[str], template: str, separator: str) -> bool:
    text, chars = build_prompt(names, template, separator)
    return not locate(backend, text, chars)[2]


def split_classes(
    backend: Backend,
    classes: Sequence[str],
    *,
    template: str = DEFAULT_TEMPLATE,
    separator: str = DEFAULT_SEPARATOR,
    max_classes_per_prompt: int | None = None,
) -> list[tuple[str, ...]]:
    """The class names cut into consecutive groups that each fit one prompt window.

    Every group fits the CLIP window (77 tokens in SD3) and, with T5, ``max_sequence_length``
    (Flux: the T5 window alone, 512 tokens by default), and holds at most
    ``max_classes_per_prompt`` names (``None`` or ``0``: no cap). The number of groups is the
    fewest that fit; among cuts into that many groups, the one whose longest prompt is shortest
    (in CLIP tokens; Flux: T5 tokens) is taken, so the prompts are alike in length and each class
    shares its prompt with about as many others.
    """
    names = list(classes)
    if max_classes_per_prompt is not None and max_classes_per_prompt < 0:
        raise ClassNameError(
            "max_classes_per_prompt must be a positive number of classes (0: as many as fit), got "
            f"{max_classes_per_prompt}"
        )
    cap = max_classes_per_prompt or len(names)
    tokenizer = backend.span_tokenizer
    if tokenizer is None:
        raise ClassNameError(f"{backend.name} has no tokenizer for its text sequence (was T5 dropped?)")
    window = (
        f"the CLIP window holds {backend.clip_len - 2} content tokens"
        + (f", T5 {backend.max_sequence_length - 1}" if backend.has_t5 else "")
        if backend.clip_len
        else f"the {backend.sequence_encoder} window holds {backend.family.sequence_window(backend)} "
        "content tokens"
    )
    cost = {}
    for name in names:
        if not _fits(backend, [name], template, separator):
            raise ClassNameError(
                f"class {name!r} does not fit one prompt on its own ({window}): use a shorter name"
            )
        cost[name] = len(tokenizer(separator + name, add_special_tokens=False, verbose=False)["input_ids"])

    def greedy(budget: float) -> list[list[str]]:
        groups: list[list[str]] = []
        load = 0
        for name in names:
            if (
                groups
                and len(groups[-1]) < cap
                and load + cost[name] <= budget
                and _fits(backend, [*groups[-1], name], template, separator)
            ):
                groups[-1].append(name)
                load += cost[name]
            else:
                groups.append([name])
                load = cost[name]
        return groups

    # Greedy filling gives the fewest consecutive groups; the smallest per-prompt token budget
    # that keeps that count balances them (bisection over the budget).
    best = greedy(float("inf"))
    lo, hi = max(cost.values()), sum(cost.values())
    while lo < hi:
        mid = (lo + hi) // 2
        if len(greedy(mid)) <= len(best):
            hi = mid
        else:
            lo = mid + 1
    balanced = greedy(lo)
    if len(balanced) == len(best):
        best = balanced
    return [tuple(g) for g in best]


def encode_prompt(
    backend: Backend,
    classes: str | Sequence[str],
    *,
    template: str = DEFAULT_TEMPLATE,
    separator: str = DEFAULT_SEPARATOR,
    max_classes_per_prompt: int | None = None,
) -> PromptEncoding:
    """Encode prompts naming ``classes`` and locate each class in its prompt's text sequence.

    Names that do not fit one prompt window are split over several prompts
    (``split_classes``), encoded as one batch: ``embeds`` is ``[P, T, D]``. Each text sequence is
    ``clip_len`` CLIP tokens (both CLIP encoders share positions) followed by
    ``max_sequence_length`` T5 tokens; spans count positions in that sequence. With T5 dropped
    its part holds zeros and classes have no T5 positions. Flux: ``clip_len`` is 0 (CLIP only
    gives ``pooled``), so the sequence is T5 alone and every class has T5 positions only.

    ``max_classes_per_prompt``: at most that many names per prompt; ``None``, the model's own
    layout (``VariantDefaults.max_classes_per_prompt``: one class per prompt for ``lava-shapes``,
    as many as fit elsewhere), as ``lava.segment`` reads it; ``0``, as many as fit.
    """
    names = parse_classes(classes)
    if max_classes_per_prompt is None:
        max_classes_per_prompt = getattr(getattr(backend, "defaults", None), "max_classes_per_prompt", None)
    groups = split_classes(
        backend, names, template=template, separator=separator, max_classes_per_prompt=max_classes_per_prompt
    )
    texts: list[str] = []
    clip_spans: dict[str, tuple[int, ...]] = {}
    t5_spans: dict[str, tuple[int, ...]] = {}
    rows: dict[str, int] = {}
    for row, group in enumerate(groups):
        text, chars = build_prompt(group, template, separator)
        clip, t5, _ = locate(backend, text, chars)
        texts.append(text)
        clip_spans.update(clip)
        t5_spans.update(t5)
        rows.update(dict.fromkeys(group, row))

    embeds, pooled, mask = backend.encode_text(texts)
    return PromptEncoding(
        classes=names,
        texts=tuple(texts),
        embeds=embeds,
        pooled=pooled,
        clip_spans=clip_spans,
        t5_spans=t5_spans,
        clip_len=backend.clip_len,
        text_len=int(embeds.shape[1]),
        rows=rows,
        template=template,
        separator=separator,
        text_mask=mask,
    )


# ---- words of a free prompt (lava.trace) ------------------------------------------------------------


def prompt_words(text: str) -> list[str]:
    """The words of a prompt, in order and without repeats (what an error lists)."""
    import re

    return list(dict.fromkeys(re.findall(r"\w+(?:['-]\w+)*", text)))


def word_ranges(text: str, word: str) -> list[tuple[int, int]]:
    """Character ranges ``[start, end)`` of every whole-word, case-insensitive occurrence of
    ``word`` (one word or several, e.g. ``"traffic light"``) in ``text``."""
    import re

    pattern = r"(?<!\w)" + r"\s+".join(map(re.escape, word.split())) + r"(?!\w)"
    return [m.span() for m in re.finditer(pattern, text, flags=re.IGNORECASE)]


def word_spans(
    backend: Backend,
    words: Sequence[str],
    clip_text: str,
    t5_text: str,
    max_sequence_length: int,
) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
    """``(clip_spans, t5_spans)``: the text positions of each of ``words`` in a prompt the pipeline
    encoded itself, every occurrence, as ``encode_prompt`` lays them out.

    CLIP positions come from ``clip_text`` (SD3's ``prompt``; Flux has none) and are kept inside
    the CLIP window (``clip_len - 2`` content tokens after the start token); T5 positions come from
    ``t5_text`` (SD3's ``prompt_3``, Flux's ``prompt_2``; by default the prompt itself), offset by
    ``clip_len`` and kept inside ``max_sequence_length - 1`` tokens (the last is the end token). So
    a word past CLIP's 77 tokens still has its T5 positions. A word that is not in the prompt, or
    whose tokens all lie past both windows, raises ``ClassNameError`` naming the prompt's words.
    """
    clip_len = backend.clip_len
    texts = {"clip": clip_text if clip_len else None, "t5": t5_text if backend.has_t5 else None}
    clip_spans: dict[str, tuple[int, ...]] = {}
    t5_spans: dict[str, tuple[int, ...]] = {}
    for word in words:
        found = {part: word_ranges(text, word) for part, text in texts.items() if text is not None}
        if not any(found.values()):
            text = clip_text if clip_len else t5_text
            listed = ", ".join(prompt_words(text))
            raise ClassNameError(f"{word!r} is not a word of the prompt {text!r}; its words are: {listed}")
        clip: tuple[int, ...] = ()
        if found.get("clip"):
            clip = _positions(backend, backend.pipe.tokenizer, clip_text, found["clip"], clip_len - 1)
        t5: tuple[int, ...] = ()
        if found.get("t5"):
            local = _positions(backend, None, t5_text, found["t5"], max_sequence_length - 1)
            t5 = tuple(clip_len + p for p in local)
        if not clip and not t5:
            raise ClassNameError(
                f"{word!r} lies past the text the model read (CLIP's {max(clip_len - 2, 0)} and T5's "
                f"{max_sequence_length - 1} content tokens): move it forward or raise max_sequence_length"
            )
        clip_spans[word], t5_spans[word] = clip, t5
    return clip_spans, t5_spans


def _positions(
    backend: Backend, tokenizer, text: str, ranges: Sequence[tuple[int, int]], limit: int
) -> tuple[int, ...]:
    """Sorted token positions (special tokens counted) overlapping any of ``ranges``, below ``limit``;
    ``tokenizer=None``: positions in the encoder part, as the family lays it out."""
    chars = {i: r for i, r in enumerate(ranges)}
    spans = (
        token_spans(tokenizer, text, chars)
        if tokenizer is not None
        else backend.family.sequence_spans(backend, text, chars)
    )
    return tuple(sorted({p for pos in spans.values() for p in pos if p < limit}))

"""Where a character range of a text lands among a tokenizer's tokens (used by the prompt stage
and by family adapters whose encoders wrap the text in a template)."""

from __future__ import annotations


def token_spans(tokenizer, text: str, chars: dict[str, tuple[int, int]]) -> dict[str, tuple[int, ...]]:
    """Token positions (special tokens counted) whose characters overlap each class's characters.

    Added special tokens (begin/end) have empty offsets and never match. Token ids are not
    consulted, since SD3's second CLIP tokenizer uses "!" as its pad token.
    """
    # verbose=False: a text past the window is expected here (that is what is being checked).
    offsets = tokenizer(text, return_offsets_mapping=True, add_special_tokens=True, verbose=False)[
        "offset_mapping"
    ]
    return {
        name: tuple(i for i, (s, e) in enumerate(offsets) if e > s and s < b and e > a)
        for name, (a, b) in chars.items()
    }

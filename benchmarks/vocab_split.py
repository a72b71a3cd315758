"""How each benchmark's class list splits into prompts: prompts (= batch rows per image) per dataset.

    python benchmarks/vocab_split.py                                   # tiny-sd3's tokenizers
    python benchmarks/vocab_split.py --tokenizer ~/sd3/tokenizer       # SD3's own CLIP tokenizer folder
    python benchmarks/vocab_split.py --tokenizer ~/sd3/tokenizer --t5-tokenizer ~/sd3/tokenizer_3

Prints, for every dataset of ``lava.evaluation``, the number of class names, their CLIP tokens,
and the prompts ``lava.stages.prompts.split_classes`` makes (the number of batch rows each image runs
with under ``--protocol all``). ``--tokenizer`` takes any folder ``CLIPTokenizer.from_pretrained``
reads, such as the ``tokenizer`` subfolder of an SD3 snapshot; T5's window (256 tokens in SD3)
is checked only when ``--t5-tokenizer`` is given.
"""

from __future__ import annotations

import argparse
from types import SimpleNamespace

from lava.evaluation.datasets import DATASET_NAMES, dataset_info
from lava.stages.prompts import split_classes


def backend_like(tokenizer, t5_tokenizer=None, clip_len: int = 77, max_sequence_length: int = 256):
    """The parts of a ``Backend`` that ``split_classes`` reads, around bare tokenizers."""
    pipe = SimpleNamespace(tokenizer=tokenizer, tokenizer_2=None, tokenizer_3=t5_tokenizer)
    return SimpleNamespace(
        pipe=pipe, clip_len=clip_len, has_t5=t5_tokenizer is not None, max_sequence_length=max_sequence_length
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", default=None, help="CLIP tokenizer folder (default: tiny-sd3's)")
    p.add_argument("--t5-tokenizer", default=None, help="T5 tokenizer folder, to check its window too")
    p.add_argument("--max-sequence-length", type=int, default=256)
    a = p.parse_args(argv)
    if a.tokenizer:
        from transformers import AutoTokenizer, CLIPTokenizer

        clip = CLIPTokenizer.from_pretrained(a.tokenizer)
        t5 = AutoTokenizer.from_pretrained(a.t5_tokenizer) if a.t5_tokenizer else None
    else:
        from lava.backends.tiny import build_tokenizers

        clip, _, t5 = build_tokenizers()
        t5 = t5 if a.t5_tokenizer else None
    backend = backend_like(clip, t5, int(clip.model_max_length), a.max_sequence_length)
    print("| dataset | classes | CLIP tokens | prompts | classes per prompt |")
    print("|---|---:|---:|---:|---|")
    for name in DATASET_NAMES:
        if name in ("folder", "voc"):  # a user's own classes; voc is voc21
            continue
        names = list(dataset_info(name).prompt_names)
        tokens = sum(len(clip(n, add_special_tokens=False, verbose=False)["input_ids"]) for n in names)
        groups = split_classes(backend, names)
        sizes = ", ".join(str(len(g)) for g in groups)
        print(f"| {name} | {len(names)} | {tokens} | {len(groups)} | {sizes} |")


if __name__ == "__main__":
    main()

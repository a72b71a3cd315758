"""What the README and docs/api.md show from Python exists: every ``lava.<name>`` their code uses,
every ``from lava... import ...``, every name ``lava.__all__`` promises, and the options table
of docs/api.md is the one ``docs/make_options_table.py`` writes from ``lava.options``. Only the
last test runs a model (tiny-sd3), for a claim of the "Stage by stage" section."""

from __future__ import annotations

import importlib
import importlib.util
import re
from pathlib import Path

import pytest
import torch
from conftest import scene

import lava

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "docs" / "api.md"]

FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
ANY_FENCE = re.compile(r"^```.*?^```", re.S | re.M)
INLINE = re.compile(r"`([^`\n]+)`")
# ``lava.a.b.c`` where ``lava`` is a name of its own (not ``flava.x``, ``obj.lava.x``, ``"lava.x"``)
DOTTED = re.compile(r"(?<![\w.\"'/])lava(?:\.[A-Za-z_]\w*)+")
FROM_IMPORT = re.compile(r"^\s*from\s+(lava(?:\.\w+)*)\s+import\s+\(?([\w\s,]+?)\)?\s*(?:#.*)?$", re.M)


def python_blocks(path: Path) -> list[str]:
    """The code of each ```python block, and the inline code of the prose around the blocks."""
    text = path.read_text()
    prose = ANY_FENCE.sub("", text)
    return FENCE.findall(text) + INLINE.findall(prose)


def resolve(dotted: str):
    """The object ``dotted`` names: attributes of ``lava``, importing submodules on the way as
    ``import lava.x.y`` would."""
    parts = dotted.split(".")
    obj = importlib.import_module(parts[0])
    for i, part in enumerate(parts[1:], start=1):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            module = ".".join(parts[: i + 1])
            if importlib.util.find_spec(module) is None:
                raise AttributeError(f"{'.'.join(parts[:i])} has no attribute {part!r}") from None
            obj = importlib.import_module(module)
    return obj


def referenced(path: Path) -> tuple[set[str], set[tuple[str, str]]]:
    names, imports = set(), set()
    for block in python_blocks(path):
        names |= set(DOTTED.findall(block))
        for module, listed in FROM_IMPORT.findall(block):
            for item in listed.split(","):
                item = item.strip().split(" as ")[0].strip()
                if item:
                    imports.add((module, item))
    return names, imports


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_every_lava_name_in_the_python_snippets_exists(path):
    names, imports = referenced(path)
    assert names, f"no lava.<name> found in {path.name}'s python blocks"
    missing = []
    for dotted in sorted(names):
        try:
            resolve(dotted)
        except (AttributeError, ImportError) as err:
            missing.append(f"{dotted}: {err}")
    for module, name in sorted(imports):
        try:
            resolve(f"{module}.{name}")
        except (AttributeError, ImportError) as err:
            missing.append(f"from {module} import {name}: {err}")
    assert not missing, f"{path.name} uses names lava does not have:\n" + "\n".join(missing)


def test_top_level_names_used_in_the_docs_are_exported():
    # ``lava.X`` in the docs is public API: in __all__ (not reachable by accident), or a submodule
    # named by its path (``lava.stages.presence.null_presence``).
    exported = set(lava.__all__)
    for path in DOCS:
        names, _ = referenced(path)
        top = {n.split(".")[1] for n in names} - {"__all__", "__version__"}
        loose = sorted(n for n in top - exported if importlib.util.find_spec(f"lava.{n}") is None)
        assert not loose, f"{path.name}: {loose} are not in lava.__all__"


def test_all_names_resolve():
    assert len(lava.__all__) == len(set(lava.__all__))
    for name in lava.__all__:
        assert getattr(lava, name) is not None, name
    assert set(dir(lava)) >= set(lava.__all__)
    assert set(lava._EXPORTS) | {"kernels"} == set(lava.__all__)  # every lazy export is public


def test_options_table_is_generated_from_the_declarations():
    spec = importlib.util.spec_from_file_location(
        "make_options_table", ROOT / "docs" / "make_options_table.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    table = module.options_table()
    text = (ROOT / "docs" / "api.md").read_text()
    begin, end = module.BEGIN, module.END
    assert begin in text and end in text, "docs/api.md has no generated options table"
    pasted = text.split(begin, 1)[1].split(end, 1)[0].strip("\n")
    stale = "docs/api.md's options table is stale: run python docs/make_options_table.py --write"
    assert pasted == table.strip("\n"), stale


def test_stage_options_are_the_segment_keywords_of_the_same_name(tiny):
    # docs/api.md, "Stage by stage": the stages given options == lava.segment given the same ones
    # (tiny-sd3 refines nothing by default, as the SD3 models do; blocks 1, 2 of its 4).
    image, classes = scene(32, 48, seed=4), ["person", "car", "traffic light"]
    noisy = lava.noise(tiny, image, timestep=515, seed=0)
    prompt = lava.encode_prompt(tiny, classes)
    slices = lava.capture(tiny, noisy, prompt, layers=[1, 2], direction="image_to_text", softmax="joint")
    heat = lava.aggregate(slices, prompt, tokens="clip", normalize="minmax")
    by_hand = lava.to_mask(heat, background_threshold=0.4)
    seg = lava.segment(
        image,
        classes,
        backend=tiny,
        timestep=515,
        layers=[1, 2],
        tokens="clip",
        normalize="minmax",
        background_threshold=0.4,
    )
    assert by_hand.classes == seg.classes and seg.classes[0] == "background"
    # segment runs these very stages with these options (lava.compose): the same computation, bitwise
    assert torch.equal(by_hand.labels[0], seg.labels[0]) and torch.equal(by_hand.scores[0], seg.scores[0])

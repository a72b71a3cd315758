"""The concept view (lava.stages.concept) is exact, leaves the model untouched, and stays memory-flat."""

from __future__ import annotations

import copy

import pytest
import torch
from meta_memory import meta_peak

import lava
from lava.errors import LavaError
from lava.stages.capture import capture_views, run_until_captured, transformer_inputs
from lava.stages.concept import capturing_concepts, concept_attention, concept_dots
from lava.types import CapturePlan

CLASSES = ["cat", "potted plant", "hydrant"]


@pytest.fixture(params=["tiny", "tiny35"])
def backend(request):
    return request.getfixturevalue(request.param)


@pytest.fixture
def inputs(backend, image):
    return lava.noise(backend, image, timestep=400, seed=3), lava.encode_prompt(backend, CLASSES)


def _heads(x: torch.Tensor, h: int) -> torch.Tensor:
    b, n, c = x.shape
    return x.view(b, n, h, c // h).transpose(1, 2)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Explicit softmax attention ``[B, H, M, D]``: the reference, not lava's fused call."""
    return torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1) @ v


def _project(x, h, to_q, to_k, to_v, norm_q, norm_k):
    q, k, v = _heads(to_q(x), h), _heads(to_k(x), h), _heads(to_v(x), h)
    return (norm_q(q) if norm_q else q), (norm_k(k) if norm_k else k), v


def reference_concept_maps(backend, noisy, prompt, layers) -> dict[int, torch.Tensor]:
    """``{block: [B, H, N_img, K]}`` concept dot products in float64, walking the model's blocks by
    hand from their own weights: the model's streams through each block's own forward, the concept
    tokens (copies of the class tokens after ``context_embedder``) through the text branch with
    explicit-softmax attention over the image tokens and each other."""
    model = copy.deepcopy(backend.transformer).double()
    inp = {k: v.double() for k, v in transformer_inputs(backend, noisy, prompt).items()}
    hidden = model.pos_embed(inp["hidden_states"])
    temb = model.time_text_embed(inp["timestep"], inp["pooled_projections"])
    context = model.context_embedder(inp["encoder_hidden_states"])
    concepts = context[:, list(prompt.columns())]
    out = {}
    for i, block in enumerate(model.transformer_blocks[: max(layers) + 1]):
        attn, h = block.attn, block.attn.heads
        normed_image = block.norm1(hidden, emb=temb)[0]
        if block.context_pre_only:
            normed_context = block.norm1_context(context, temb)
            normed_concepts, mods = block.norm1_context(concepts, temb), None
        else:
            normed_context = block.norm1_context(context, emb=temb)[0]
            normed_concepts, *mods = block.norm1_context(concepts, emb=temb)

        image_side = (attn.to_q, attn.to_k, attn.to_v, attn.norm_q, attn.norm_k)
        text_side = (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj, attn.norm_added_q, attn.norm_added_k)
        iq, ik, iv = _project(normed_image, h, *image_side)
        tq, tk, tv = _project(normed_context, h, *text_side)
        cq, ck, cv = _project(normed_concepts, h, *text_side)
        n_img = iq.shape[2]
        joint = _attend(torch.cat([iq, tq], 2), torch.cat([ik, tk], 2), torch.cat([iv, tv], 2))
        image_out = joint[:, :, :n_img]
        concept_out = _attend(cq, torch.cat([ik, ck], 2), torch.cat([iv, cv], 2))
        if i in layers:
            out[i] = torch.einsum("bhnd,bhkd->bhnk", image_out, concept_out)
        context, hidden = block(hidden, context, temb)
        if mods:
            gate_msa, shift, scale, gate_mlp = mods
            c = concepts + gate_msa[:, None] * attn.to_add_out(concept_out.transpose(1, 2).flatten(2))
            ff_in = block.norm2_context(c) * (1 + scale[:, None]) + shift[:, None]
            concepts = c + gate_mlp[:, None] * block.ff_context(ff_in)
    return out


@pytest.mark.parametrize("heads", ["mean", "none"])
def test_concept_view_equals_float64_reference(backend, inputs, heads):
    noisy, prompt = inputs
    layers = (0, backend.num_blocks - 1)  # the last block is context_pre_only
    got = lava.capture(backend, noisy, prompt, layers=layers, heads=heads, source="concept")
    want = reference_concept_maps(backend, noisy, prompt, layers)
    assert got.source == "concept" and got.columns == prompt.columns()
    for i in layers:
        w = want[i].mean(1, keepdim=True) if heads == "mean" else want[i]
        assert got.maps[i].shape == w.shape
        torch.testing.assert_close(got.maps[i].double(), w, atol=1e-4 * w.abs().max().item(), rtol=1e-4)


def test_model_output_bitwise_unchanged_with_concepts(backend, inputs):
    noisy, prompt = inputs
    kwargs = transformer_inputs(backend, noisy, prompt)
    plain = backend.transformer(**kwargs, return_dict=False)[0]
    plan = CapturePlan(
        layers=tuple(range(backend.num_blocks)), columns=prompt.columns(), early_exit=False, source="concept"
    )
    with capturing_concepts(backend.transformer, plan, noisy.batch_size) as store:
        out = run_until_captured(backend.transformer, **kwargs)
    assert set(store) == set(range(backend.num_blocks))
    assert torch.equal(out, plain)
    # and everything is restored: no processor or hook is left behind
    assert all(type(b.attn.processor).__name__ != "ConceptProcessor" for b in backend.blocks)
    assert all(not b._forward_pre_hooks and not b._forward_hooks for b in backend.blocks)


def test_hooks_removed_after_error(tiny, image):
    noisy, prompt = lava.noise(tiny, image), lava.encode_prompt(tiny, CLASSES)
    plan = CapturePlan(layers=(1,), columns=prompt.columns(), source="concept")
    installed = capturing_concepts(tiny.transformer, plan, noisy.batch_size)
    with pytest.raises(RuntimeError, match="boom"), installed:
        raise RuntimeError("boom")
    assert all(not b._forward_pre_hooks and not b._forward_hooks for b in tiny.blocks)
    assert all(type(b.attn.processor).__name__ != "ConceptProcessor" for b in tiny.blocks)


def test_prompt_rows_see_only_their_own_concepts(tiny, image):
    """Split over two prompt rows in one batch, each class's map equals the map of its own row's
    prompt run alone: concept tokens of the other row are masked out."""
    classes = ["cat", "dog", "potted plant", "hydrant"]
    noisy = lava.noise(tiny, image, timestep=300)
    split = lava.encode_prompt(tiny, classes, max_classes_per_prompt=2)
    assert split.num_prompts == 2
    both = lava.capture(tiny, noisy, split, layers=(1,), source="concept")
    one_by_one = lava.capture(tiny, noisy, split, layers=(1,), source="concept", prompt_batch=1)
    torch.testing.assert_close(both.maps[1], one_by_one.maps[1], atol=1e-5, rtol=1e-4)
    for group in (classes[:2], classes[2:]):
        alone = lava.encode_prompt(tiny, group)
        single = lava.capture(tiny, noisy, alone, layers=(1,), source="concept")
        for name in group:
            got = both.maps[1][..., both.column_indices(split.positions(name))]
            want = single.maps[1][..., single.column_indices(alone.positions(name))]
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_concept_heatmaps_are_a_softmax_over_classes(tiny, image):
    noisy, prompt = lava.noise(tiny, image), lava.encode_prompt(tiny, CLASSES)
    slices = lava.capture(tiny, noisy, prompt, layers=(0, 1), source="concept")
    heat = lava.aggregate(slices, prompt, normalize="none")
    sums = heat.scores.sum(1)
    torch.testing.assert_close(sums, torch.ones_like(sums))
    with pytest.raises(LavaError, match="different sources"):
        lava.aggregate([slices, lava.capture(tiny, noisy, prompt, layers=(0, 1))], prompt)


def test_segment_and_cli_with_concept_source(tiny, image, tmp_path, capsys):
    seg = lava.segment(image, CLASSES, backend=tiny, source="concept")
    assert seg.labels[0].shape == (image.height, image.width)
    with pytest.raises(LavaError, match="concept source"):
        lava.segment(image, CLASSES, backend=tiny, source="concept", softmax="cross")
    with pytest.raises(LavaError, match="concept source"):
        capture_views(
            tiny,
            lava.noise(tiny, image),
            lava.encode_prompt(tiny, CLASSES),
            views=[("image_to_text", "joint"), ("text_to_image", "joint")],
            source="concept",
        )
    from lava.cli import main

    path = tmp_path / "in.png"
    image.save(path)
    out = tmp_path / "out"
    base = ["segment", str(path), "--classes", "cat,dog", "--model", "tiny-sd3", "--out", str(out)]
    assert main([*base, "--source", "concept", "--verbose"]) == 0
    assert "concept view" in capsys.readouterr().err
    assert (out / "in_labels.png").exists()
    assert main([*base, "--source", "concept", "--direction", "text_to_image"]) != 0
    assert "--source concept" in capsys.readouterr().err


def test_concept_ops_allocate_nothing_n_by_n_at_2048px():
    """The concept attention and the dot products at SD3 2048 px sizes (16384 image tokens, 24
    heads × 64, 20 concept tokens), accounted on meta tensors: the largest things are the
    image keys/values joined with the concepts and the ``[N_img, K]`` maps, never ``N × N``."""
    b, h, n, d, u = 1, 24, 16384, 64, 20
    meta = dict(device="meta")
    cq, ck, cv = (torch.empty(b, h, u, d, **meta) for _ in range(3))
    ik, iv, image_out = (torch.empty(b, h, n, d, **meta) for _ in range(3))
    visible = torch.ones(b, u, dtype=torch.bool, **meta)

    def run():
        out = concept_attention(cq, ck, cv, ik, iv, visible)
        return concept_dots(image_out, out, "none")

    peak = meta_peak(run)
    joined = 2 * 4 * b * h * (n + u) * d  # keys and values with the concepts appended
    scores = 4 * b * h * u * (n + u) * 2  # scores and probabilities, concept queries only
    maps = 4 * b * h * n * u * 2  # per-head dots and their float32 inputs' cast
    nn = 4 * b * h * n * n
    assert peak <= joined + scores + maps + 4 * b * h * n * d * 2 + 2**20, peak / 2**20
    assert peak < nn / 50


def test_eval_records_the_source_and_refuses_a_mixed_resume(tmp_path, capsys):
    import json

    from eval_fixtures import make_voc

    from lava.cli import main

    voc = make_voc(tmp_path / "voc", n=2)
    out = tmp_path / "run"
    args = ["eval", "--dataset", "voc", "--root", str(voc.root), "--model", "tiny-sd3", "--out", str(out)]
    assert main([*args, "--limit", "1", "--source", "concept"]) == 0
    header = json.loads((out / "journal.rank0.jsonl").read_text().splitlines()[0])
    assert header["config"]["source"] == "concept"
    capsys.readouterr()
    assert main([*args, "--limit", "2"]) == 1  # resumed with the attention source: refused, and named
    assert 'source: "concept" -> "attention"' in capsys.readouterr().err


def test_concept_capture_keeps_the_same_image_qk_for_propagation(tiny, image):
    """Propagation reads the block's image q/k; the concept capture keeps exactly those the
    attention capture keeps (the model's own streams are the same)."""
    noisy, prompt = lava.noise(tiny, image), lava.encode_prompt(tiny, CLASSES)
    concept = lava.capture(tiny, noisy, prompt, layers=(0, 1), source="concept", keep_image_qk=True)
    attention = lava.capture(tiny, noisy, prompt, layers=(0, 1), keep_image_qk=True)
    for block in (0, 1):
        for got, want in zip(concept.image_qk[block], attention.image_qk[block], strict=True):
            assert torch.equal(got, want)
    seg = lava.segment(image, CLASSES, backend=tiny, source="concept", refine="propagate,pamr")
    assert seg.labels[0].shape == (image.height, image.width)


def test_segment_summary_names_the_concept_view(tmp_path, capsys, image):
    from lava.cli import main

    path = tmp_path / "in.png"
    image.save(path)
    out = tmp_path / "out"
    assert (
        main(
            [
                "segment",
                str(path),
                "--classes",
                "a,b",
                "--model",
                "tiny-sd3",
                "--source",
                "concept",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert "concept view" in capsys.readouterr().err.split("running", 1)[1].splitlines()[0]

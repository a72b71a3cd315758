"""Propagation of class maps by the image→image attention (lava.propagate, refine "propagate"):
the fused op against the explicit N×N product, its memory at 2048 px sizes, the captured image
queries/keys, and the refine chain."""

from __future__ import annotations

import pytest
import torch
from conftest import hand_slices, scene

import lava
from lava.errors import LavaError
from lava.stages.aggregate import normalize_scores
from lava.stages.capture import capturing, run_until_captured, transformer_inputs
from lava.stages.propagate import propagate, propagate_reference
from lava.stages.refine import PAMR, Propagate, refine, refine_name, refine_steps
from lava.types import CapturePlan

CLASSES = ["cat", "potted plant", "hydrant"]


def _explicit(q, k, maps, iterations=1, temperature=1.0):
    """Independent reference, one head and one image at a time, in float64: the image→image
    attention matrix written out and multiplied ``iterations`` times."""
    b, h, _, d = q.shape
    out = maps.double().clone()
    for _ in range(iterations):
        nxt = torch.zeros_like(out)
        for bi in range(b):
            for hi in range(h):
                logits = q[bi, hi].double() @ k[bi, hi].double().T / (d**0.5 * temperature)
                attn = torch.exp(logits - logits.amax(-1, keepdim=True))
                attn = attn / attn.sum(-1, keepdim=True)  # rows over the image keys only
                nxt[bi] += attn @ out[bi] / h
        out = nxt
    return out


@pytest.mark.parametrize(("heads", "n", "d", "k_cols"), [(1, 23, 8, 3), (3, 37, 16, 21), (4, 30, 8, 20)])
@pytest.mark.parametrize("iterations", [0, 1, 3])
@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_propagate_matches_the_explicit_product(heads, n, d, k_cols, iterations, temperature):
    # k_cols > d: the maps go through SDPA in several zero-padded groups of d columns.
    torch.manual_seed(heads * n)
    q, k = torch.randn(2, heads, n, d), torch.randn(2, heads, n, d)
    maps = torch.rand(2, n, k_cols)
    got = propagate(q, k, maps, iterations=iterations, temperature=temperature)
    want = _explicit(q, k, maps, iterations, temperature)
    assert got.dtype == torch.float32 and got.shape == (2, n, k_cols)
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-5)
    ref = propagate_reference(q, k, maps, iterations=iterations, temperature=temperature)
    torch.testing.assert_close(ref, want, atol=1e-12, rtol=1e-10)


def test_several_sources_are_averaged_like_heads():
    torch.manual_seed(1)
    q1, k1 = torch.randn(1, 2, 19, 8), torch.randn(1, 2, 19, 8)
    q2, k2 = torch.randn(1, 2, 19, 8), torch.randn(1, 2, 19, 8)
    maps = torch.rand(1, 19, 4)
    got = propagate([q1, q2], [k1, k2], maps, iterations=2)
    # equal head counts: the mean over both sources is the mean over their 4 heads together
    joined = _explicit(torch.cat([q1, q2], 1), torch.cat([k1, k2], 1), maps, iterations=2)
    torch.testing.assert_close(got.double(), joined, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(propagate_reference([q1, q2], [k1, k2], maps, iterations=2), joined)


def test_a_step_is_a_convex_combination():
    torch.manual_seed(2)
    q, k = torch.randn(2, 3, 25, 8) * 3, torch.randn(2, 3, 25, 8) * 3
    raw = torch.rand(2, 25, 5) * 4 - 1
    out = propagate(q, k, raw, iterations=2)
    assert (out >= raw.amin(1, keepdim=True) - 1e-6).all() and (out <= raw.amax(1, keepdim=True) + 1e-6).all()
    per_token = raw.softmax(-1)  # sums to 1 over classes: still does
    torch.testing.assert_close(propagate(q, k, per_token).sum(-1), torch.ones(2, 25))
    flat = torch.full((2, 25, 3), 0.3)
    torch.testing.assert_close(propagate(q, k, flat), flat)


def test_half_precision_queries_and_keys():
    torch.manual_seed(3)
    q, k = torch.randn(1, 2, 40, 16).bfloat16(), torch.randn(1, 2, 40, 16).bfloat16()
    maps = torch.rand(1, 40, 3)
    got = propagate(q, k, maps)
    assert got.dtype == torch.float32  # computed in float32 from the bf16 q/k
    torch.testing.assert_close(got.double(), _explicit(q.float(), k.float(), maps), atol=1e-5, rtol=1e-4)


def test_bad_arguments_are_named():
    q = torch.randn(1, 2, 10, 8)
    with pytest.raises(LavaError, match=r"maps must be \[B, N_img, K\] = \[1, 10, K\]"):
        propagate(q, q, torch.rand(1, 9, 3))
    with pytest.raises(LavaError, match=r"same shape \[B, H, N_img, D\]"):
        propagate(q, q[:, :1], torch.rand(1, 10, 3))
    with pytest.raises(LavaError, match="temperature > 0"):
        propagate(q, q, torch.rand(1, 10, 3), temperature=0)
    with pytest.raises(LavaError, match="iterations >= 0"):
        propagate(q, q, torch.rand(1, 10, 3), iterations=-1)
    with pytest.raises(LavaError, match="as many query as key"):
        propagate([q, q], [q], torch.rand(1, 10, 3))


def _profile(fn):
    """``(largest single allocation, peak of live bytes)`` while ``fn`` runs, from the profiler's
    memory events (every allocation, also those an op makes and frees inside itself, is one
    ``[memory]`` event; the peak replays them in time order, as benchmarks/memprobe.py does)."""
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
    ) as prof:
        fn()
    events = list(prof.events())
    largest = max((e.cpu_memory_usage for e in events if e.cpu_memory_usage > 0), default=0)

    def delta(e):
        return e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage

    live = peak = 0
    for _, dd in sorted((e.time_range.start, delta(e)) for e in events if delta(e)):
        live += dd
        peak = max(peak, live)
    return largest, peak


def test_the_profiler_sees_an_n_by_n_matrix_when_there_is_one():
    q, k, maps = torch.randn(1, 2, 300, 16), torch.randn(1, 2, 300, 16), torch.rand(1, 300, 4)
    largest, _ = _profile(lambda: propagate_reference(q, k, maps))
    assert largest >= 300 * 300 * 8  # the float64 reference builds [B, H, N, N]: the probe sees it
    fused, _ = _profile(lambda: propagate(q, k, maps))
    assert fused < 300 * 300 * 4


@pytest.mark.slow
def test_propagation_allocates_nothing_n_by_n_at_2048px():
    """SD3 at 2048 px: 16384 image tokens, 24 heads of 64, 20 class maps, float32 on the CPU.

    One head's N×N attention would be 1 GiB (all 24: 24 GiB); the fused path's largest
    allocation is the SDPA output ``[B, H, N, D]`` (96 MiB) and its peak about the same.
    """
    b, h, n, d, k_cols = 1, 24, 16384, 64, 20
    torch.manual_seed(4)
    q, k, maps = torch.randn(b, h, n, d), torch.randn(b, h, n, d), torch.rand(b, n, k_cols)
    out = {}
    largest, peak = _profile(lambda: out.setdefault("maps", propagate(q, k, maps)))
    nn_bytes = n * n * 4
    qk_bytes = b * h * n * d * 4
    assert largest < nn_bytes / 8, f"largest allocation {largest / 2**20:.0f} MiB, one N×N is 1024 MiB"
    assert peak <= qk_bytes + 16 * 2**20, f"peak {peak / 2**20:.0f} MiB"
    assert out["maps"].shape == (b, n, k_cols) and torch.isfinite(out["maps"]).all()
    # a few rows against the explicit rows of the attention (float64), so the flat path is also right
    rows = torch.tensor([0, 4097, n - 1])
    logits = q[0, :, rows].double() @ k[0].double().transpose(-1, -2) / d**0.5  # [H, 3, N]
    want = (logits.softmax(-1) @ maps[0].double()).mean(0)
    torch.testing.assert_close(out["maps"][0, rows].double(), want, atol=1e-5, rtol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_propagation_on_cuda_is_flat_at_2048px():
    """The same sizes on a GPU, float32 (SDPA's memory-efficient kernel): the allocator's peak
    stays far below one head's N×N (1 GiB)."""
    b, h, n, d, k_cols = 1, 24, 16384, 64, 20
    gen = torch.Generator(device="cuda").manual_seed(4)
    q, k = (torch.randn(b, h, n, d, device="cuda", generator=gen) for _ in range(2))
    maps = torch.rand(b, n, k_cols, device="cuda", generator=gen)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = propagate(q, k, maps)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    assert peak < n * n * 4 / 2, f"peak {peak / 2**20:.0f} MiB, one N×N is 1024 MiB"
    rows = torch.tensor([0, 4097, n - 1], device="cuda")
    logits = q[0, :, rows].double() @ k[0].double().transpose(-1, -2) / d**0.5
    want = (logits.softmax(-1) @ maps[0].double()).mean(0)
    torch.testing.assert_close(out[0, rows].double(), want, atol=1e-4, rtol=1e-3)


# ---- the captured image queries and keys --------------------------------------------------------


@pytest.fixture(params=["tiny", "tiny35"])
def backend(request):
    return request.getfixturevalue(request.param)


def _image_qk(attn, hidden, context):
    """Image q, k ``[B, H, N_img, D]`` of one joint attention, from the module's weights (the
    text stream only matters through nothing here: image rows use the image projections)."""
    h = attn.heads

    def split(x):
        b, n, c = x.shape
        return x.view(b, n, h, c // h).transpose(1, 2)

    q, k = split(attn.to_q(hidden)), split(attn.to_k(hidden))
    if attn.norm_q is not None:
        q, k = attn.norm_q(q), attn.norm_k(k)
    return q, k


def test_keep_image_qk_leaves_outputs_unchanged_and_keeps_the_right_tensors(backend, image):
    noisy = lava.noise(backend, image, timestep=400, seed=3)
    prompt = lava.encode_prompt(backend, CLASSES)
    inputs = transformer_inputs(backend, noisy, prompt)
    plain = backend.transformer(**inputs, return_dict=False)[0]
    layers = tuple(range(backend.num_blocks))
    seen = {}

    def grab(index):
        def hook(module, args, kwargs):
            seen[index] = (kwargs["hidden_states"], kwargs["encoder_hidden_states"])

        return hook

    plan = CapturePlan(
        layers=layers, columns=prompt.columns(), impl="torch", early_exit=False, keep_image_qk=True
    )
    handles = [backend.blocks[i].attn.register_forward_pre_hook(grab(i), with_kwargs=True) for i in layers]
    try:
        with capturing(backend.transformer, plan) as store:
            captured = run_until_captured(backend.transformer, **inputs)
    finally:
        for hd in handles:
            hd.remove()
    assert torch.equal(captured, plain)  # keeping q/k changes nothing the model computes
    assert set(store.image_qk) == set(layers)
    for i in layers:
        attn = backend.blocks[i].attn
        q, k = _image_qk(attn, *seen[i])
        n_img = seen[i][0].shape[1]
        assert store.image_qk[i][0].shape == (1, attn.heads, n_img, q.shape[-1])
        torch.testing.assert_close(store.image_qk[i][0], q)
        torch.testing.assert_close(store.image_qk[i][1], k)


def test_image_qk_only_when_asked_and_one_per_prompt_row(tiny, image):
    noisy = lava.noise(tiny, image, timestep=400, seed=3)
    prompt = lava.encode_prompt(tiny, CLASSES, max_classes_per_prompt=1)  # three prompt rows
    assert lava.capture(tiny, noisy, prompt, layers=(1,)).image_qk is None
    kept = lava.capture(tiny, noisy, prompt, layers=(0, 1), keep_image_qk=True)
    split = lava.capture(tiny, noisy, prompt, layers=(0, 1), keep_image_qk=True, prompt_batch=1)
    n_img = noisy.grid[0] * noisy.grid[1]
    attn = tiny.blocks[1].attn
    for block in (0, 1):
        q, k = kept.image_qk[block]
        assert q.shape == k.shape == (1, 3, attn.heads, n_img, q.shape[-1])
        # one forward for all rows or one per row: the same tensors
        torch.testing.assert_close(split.image_qk[block][0], q)
        torch.testing.assert_close(split.image_qk[block][1], k)
    # block 1's image q/k depend on the text each row's image tokens attended to in block 0
    assert not torch.allclose(kept.image_qk[1][0][:, 0], kept.image_qk[1][0][:, 1])


# ---- the refine stage ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def read(tiny):
    """Raw (unnormalised) and min-max heatmaps of one capture that kept q/k, and the capture."""
    img = scene()
    noisy = lava.noise(tiny, img, timestep=400, seed=0)
    prompt = lava.encode_prompt(tiny, CLASSES)
    slices = lava.capture(tiny, noisy, prompt, layers=(0, 1), keep_image_qk=True)
    raw = lava.aggregate(slices, prompt, normalize="none")
    heat = lava.aggregate(slices, prompt, normalize="minmax")
    return img, slices, raw, heat


def _reference_on_grid(slices, scores, blocks, **kw):
    b, c, h, w = scores.shape
    qs = [slices.image_qk[blk][0].flatten(1, 2) for blk in blocks]
    ks = [slices.image_qk[blk][1].flatten(1, 2) for blk in blocks]
    out = propagate_reference(qs, ks, scores.flatten(2).transpose(1, 2), **kw)
    return out.transpose(1, 2).reshape(b, c, h, w)


def _synthetic(normalize: str, seed: int = 5):
    """Slices with image q/k of two blocks (two prompt rows, two heads each) on a 5×6 grid, and
    heatmaps of random raw maps normalised as asked: sharper attention than the tiny random
    model's, whose nearly uniform rows flatten the maps to float32 noise in one step."""
    gen = torch.Generator().manual_seed(seed)
    qk = {blk: tuple(torch.randn(1, 2, 2, 30, 8, generator=gen) * 1.5 for _ in range(2)) for blk in (3, 7)}
    slices = hand_slices(
        {blk: torch.zeros(1, 1, 30, 3) for blk in qk},
        (0, 1, 2),
        (5, 6),
        ((40, 48),),
        image_qk=qk,
        timestep=400.0,
        sigma=0.4,
    )
    raw = torch.rand(1, 3, 5, 6, generator=gen) * 0.01
    heat = lava.Heatmaps(
        scores=normalize_scores(raw, normalize),
        classes=("a", "b", "c"),
        image_sizes=((40, 48),),
        normalize=normalize,
        presence=torch.tensor([[1.0, 0.5, 0.2]]),
    )
    return slices, raw, heat


@pytest.mark.parametrize("normalize", ["minmax", "global", "classes", "none"])
def test_refine_propagate_equals_propagating_the_raw_maps(normalize):
    """Rows of the attention sum to 1, so a step commutes with the affine min-max / global
    rescalings: propagating the normalised maps and normalising again equals normalising the
    propagated raw maps. Class-sum maps stay sums of 1 (renormalising them is a no-op)."""
    slices, raw, heat = _synthetic(normalize)
    got = refine(heat, None, method=Propagate(iterations=2, temperature=0.7), slices=slices)
    start = normalize_scores(raw, "classes") if normalize == "classes" else raw
    want = normalize_scores(
        _reference_on_grid(slices, start, (3, 7), iterations=2, temperature=0.7), normalize
    )
    assert got.scores.shape == heat.scores.shape and got.scores.dtype == torch.float32  # token grid
    torch.testing.assert_close(got.scores.double(), want, atol=1e-5, rtol=1e-4)
    assert torch.equal(got.presence, heat.presence)  # from the maps as aggregated
    assert float(got.scores.std()) > 1e-3 * float(heat.scores.std())  # not flattened away
    # one block only
    one = refine(heat, None, method="propagate", slices=slices, layers=(7,))
    want1 = normalize_scores(_reference_on_grid(slices, start, (7,)), normalize)
    torch.testing.assert_close(one.scores.double(), want1, atol=1e-5, rtol=1e-4)


def test_refine_chain_runs_in_order(read):
    img, slices, _, heat = read
    chained = refine(heat, [img], method=("propagate", "pamr"), slices=slices)
    by_hand = refine(refine(heat, None, method="propagate", slices=slices), [img], method="pamr")
    assert torch.equal(chained.scores, by_hand.scores)
    assert torch.equal(refine(heat, [img], method="propagate,pamr", slices=slices).scores, chained.scores)
    assert chained.scores.shape[-2:] == (4 * heat.scores.shape[-2], 4 * heat.scores.shape[-1])
    steps = (Propagate(iterations=2), PAMR(iterations=3))
    assert (
        refine_name(steps) == "propagate,pamr" and refine_name("pamr") == "pamr" and refine_name(None) is None
    )
    with_params = refine(heat, [img], method=steps, slices=slices)
    want = refine(refine(heat, None, Propagate(iterations=2), slices=slices), [img], "pamr", iterations=3)
    assert torch.equal(with_params.scores, want.scores)
    assert refine_steps(" propagate , pamr") == (Propagate(), PAMR())


def test_refine_refusals_name_what_is_wrong(read, tiny):
    img, slices, _, heat = read
    with pytest.raises(LavaError, match="'propagate' must come before 'pamr'"):
        refine(heat, [img], method="pamr,propagate", slices=slices)
    noisy = lava.noise(tiny, img, timestep=400)
    plain = lava.capture(tiny, noisy, lava.encode_prompt(tiny, CLASSES), layers=(0,))
    for missing in (None, plain):
        with pytest.raises(LavaError, match="keep_image_qk=True"):
            refine(heat, [img], method="propagate", slices=missing)
    with pytest.raises(LavaError, match=r"no image q/k for blocks \[5\]"):
        refine(heat, None, method="propagate", slices=slices, layers=(5,))
    pamred = refine(heat, [img], method="pamr")
    with pytest.raises(LavaError, match="propagate works on the token grid"):
        refine(pamred, None, method="propagate", slices=slices)
    with pytest.raises(LavaError, match="unknown refine method 'crf'"):
        refine(heat, [img], method="propagate,crf", slices=slices)
    with pytest.raises(LavaError, match=r"arguments \(iterations\) set a PAMR step named by a string"):
        refine(heat, None, method="propagate", slices=slices, iterations=3)  # not silently ignored


@pytest.mark.parametrize("which", ["tiny", "tiny35"])
def test_segment_with_propagation(which, request):
    backend = request.getfixturevalue(which)
    img = scene(40, 56)
    plain = lava.segment(img, ["cat", "dog"], backend=backend)
    for method in ("propagate", "propagate,pamr", (Propagate(temperature=0.5), "pamr")):
        seg = lava.segment(img, ["cat", "dog"], backend=backend, refine=method)
        assert seg.scores[0].shape == (2, 40, 56) and torch.isfinite(seg.scores[0]).all()
        assert float(seg.scores[0].min()) >= 0.0 and float(seg.scores[0].max()) <= 1.0 + 1e-6
        assert not torch.equal(seg.scores[0], plain.scores[0])
    # several prompt rows, one forward per row: rows' attention averaged, still runs
    seg = lava.segment(
        img, ["cat", "dog"], backend=backend, refine="propagate", max_classes_per_prompt=1, prompt_batch=1
    )
    assert seg.scores[0].shape == (2, 40, 56)

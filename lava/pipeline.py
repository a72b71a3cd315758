"""``segment``: the five stages composed, over any number of images of any sizes.

``segment_iter`` yields each image's result as soon as it is done, so a caller that writes and
drops each one (the ``lava segment`` command) holds one image at a time however many there are;
``segment`` collects them into one ``Segmentation``.
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from collections.abc import Iterator, Sequence

from PIL import Image
from tqdm.auto import tqdm

from .backends import Backend, load_backend
from .errors import LavaError
from .images import ImageInput, as_image_list, image_size, load_image, load_images
from .methods.base import Segmenter, is_segmenter
from .stages.aggregate import aggregate, check_presence, mean_heatmaps
from .stages.capture import capture
from .stages.mask import check_background_class, to_mask
from .stages.noise import noise
from .stages.presence import capture_columns
from .stages.prompts import DEFAULT_SEPARATOR, DEFAULT_TEMPLATE, encode_prompt
from .stages.refine import RefineSpec, resolve_refine, split_refine
from .stages.refine import refine as refine_heatmaps
from .types import AggregateConfig, MaskConfig, Segmentation


def _batches(images: Sequence[ImageInput], batch_size: int) -> list[list[int]]:
    """Indices grouped by image size (one forward needs one token grid), then chunked.

    With ``batch_size == 1`` this is simply the input order and no image is opened."""
    if batch_size == 1:
        return [[i] for i in range(len(images))]
    by_size: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, im in enumerate(images):
        by_size[image_size(im)].append(i)
    return [idx[s : s + batch_size] for idx in by_size.values() for s in range(0, len(idx), batch_size)]


def _is_rgb(image) -> bool:
    return isinstance(image, Image.Image) and image.mode == "RGB"


def _check_unit(name: str, value: float | None) -> None:
    if value is not None and (math.isnan(value) or not 0.0 <= value <= 1.0):
        raise LavaError(f"{name} must be between 0 and 1 (scores are normalised to [0, 1]), got {value!r}")


def ensemble(
    timestep: float | None,
    timesteps: Sequence[float] | None,
    seed: int | None,
    seeds: Sequence[int] | None,
    sigma: float | None = None,
) -> list[tuple[float | None, int]]:
    """The ``(timestep, seed)`` runs of one call: every timestep with every seed, timestep-major.

    ``timesteps``/``seeds`` are the ensemble forms of ``timestep``/``seed``; a call gives one form
    of each, not both (nor ``timesteps`` with ``sigma``). No timestep means the backend's (``None``),
    no seed means 0.
    """
    if timesteps is not None and (timestep is not None or sigma is not None):
        which = "timestep" if timestep is not None else "sigma"
        raise LavaError(f"give timesteps=[...] or {which}=..., not both (timestep=t is timesteps=[t])")
    if seeds is not None and seed is not None:
        raise LavaError("give seeds=[...] or seed=..., not both (seed=s is seeds=[s])")
    times = [float(t) for t in timesteps] if timesteps is not None else [timestep]
    noise_seeds = [int(x) for x in seeds] if seeds is not None else [seed if seed is not None else 0]
    if not times or not noise_seeds:
        raise LavaError(
            f"timesteps and seeds need at least one value each, got timesteps={timesteps} seeds={seeds}"
        )
    return [(t, x) for t in times for x in noise_seeds]


def resolve_configs(
    backend: Backend,
    aggregate_config: AggregateConfig | None = None,
    mask_config: MaskConfig | None = None,
    *,
    normalize: str | None = None,
    background_threshold: float | None = None,
    min_presence: float | None = None,
    presence: str | None = None,
    classes: Sequence[str] | None = None,
) -> tuple[AggregateConfig, MaskConfig]:
    """The aggregate and mask settings of a call: keywords given, else the configs given, else the
    backend's defaults (``backend.defaults``). A background threshold or presence floor of ``0``
    means none; both must lie in [0, 1].

    With ``classes``, a class named like the background label (``MaskConfig.background_name``,
    ``"background"``) and a background threshold cannot both label pixels "background": a
    threshold the caller asked for is refused (``ClassNameError``), a threshold that is only the
    backend's default gives way to the named class.
    """
    _check_unit("background_threshold", background_threshold)
    _check_unit("min_presence", min_presence)
    d = backend.defaults
    agg = aggregate_config or AggregateConfig(normalize=d.normalize, presence=d.presence)
    if normalize is not None:
        agg = dataclasses.replace(agg, normalize=normalize)
    if presence is not None:
        agg = dataclasses.replace(agg, presence=presence)
    check_presence(agg.presence)
    mask = mask_config or MaskConfig(background_threshold=d.background_threshold, min_presence=d.min_presence)
    if background_threshold is not None:
        mask = dataclasses.replace(mask, background_threshold=background_threshold or None)
    if min_presence is not None:
        mask = dataclasses.replace(mask, min_presence=min_presence or None)
    _check_unit("background_threshold", mask.background_threshold)
    _check_unit("min_presence", mask.min_presence)
    if classes is not None and mask.background_threshold is not None and mask.background_name in classes:
        if mask_config is not None or background_threshold is not None:
            check_background_class(classes, mask.background_threshold, mask.background_name)
        mask = dataclasses.replace(mask, background_threshold=None)
    return agg, mask


def segment(
    images: ImageInput | Sequence[ImageInput],
    classes: str | Sequence[str],
    *,
    backend: Backend | Segmenter | str = "lava-shapes",
    timestep: float | None = None,
    sigma: float | None = None,
    layers: Sequence[int] | None = None,
    seed: int | None = None,
    timesteps: Sequence[float] | None = None,
    seeds: Sequence[int] | None = None,
    resolution: int | str | None = None,
    direction: str = "image_to_text",
    softmax: str = "joint",
    heads: str = "mean",
    impl: str = "auto",
    source: str = "attention",
    template: str = DEFAULT_TEMPLATE,
    separator: str = DEFAULT_SEPARATOR,
    max_classes_per_prompt: int | None = None,
    prompt_batch: int | None = None,
    normalize: str | None = None,
    background_threshold: float | None = None,
    min_presence: float | None = None,
    presence: str | None = None,
    aggregate_config: AggregateConfig | None = None,
    mask_config: MaskConfig | None = None,
    refine: RefineSpec = None,
    batch_size: int = 1,
    progress: bool = False,
) -> Segmentation:
    """Segment ``images`` into ``classes``: noise → forward+capture → aggregate → mask.

    Args:
        images: paths, PIL images or uint8 arrays (any mode; converted to RGB).
        classes: class names, or one comma-separated string.
        backend: a loaded ``Backend`` or a name for ``load_backend``, or a comparison method's
            segmenter (``lava.methods.load_segmenter``: MaskCLIP, StableSeg-style UNet), which
            replaces the noise/capture/aggregate stages and shares the mask stage.
        timestep / sigma: when to read the attention (default: the backend's).
        seed: the noise seed (default 0).
        timesteps / seeds: an ensemble instead: the maps of every timestep with every seed,
            each run aggregated and normalised, are averaged before the mask stage
            (``lava.stages.aggregate.mean_heatmaps``). One noise + forward per run, run one after the
            other (memory of one run, time of all). Not together with ``timestep`` / ``sigma``
            / ``seed``.
        layers: transformer blocks to read and average (default: the backend's; negative
            indices count from the last block).
        max_classes_per_prompt: split the classes into prompts of at most this many names
            (default: as many as fit one prompt window; longer lists are always split).
        prompt_batch: prompts per forward pass when the classes span several prompts
            (default: all of them in one batch; lower it to bound memory).
        normalize: how class maps are normalised (``AggregateConfig.normalize``; default: the
            backend's, see ``lava models``).
        background_threshold: pixels whose best score is below it (in [0, 1]) are labelled
            background (default: the backend's; ``0`` labels no pixel background). Refused
            together with a class named ``"background"``; a backend's default threshold gives
            way to such a class.
        min_presence: a class whose presence in an image (``Heatmaps.presence``) is below it takes
            no pixels there (default: the backend's; ``0`` lets every class compete).
        presence: how presence is judged (``AggregateConfig.presence``): ``"peak"`` (its map's
            peak over the strongest class's) or ``"null"`` (its tokens against the prompt's filler
            tokens, ``lava.stages.presence.null_presence``; default: the backend's, ``"null"`` for
            ``lava-shapes``).
        aggregate_config / mask_config: full configs instead of the keywords above (a keyword
            given as well overrides that field).
        source: ``"attention"`` (default) reads the attention probabilities (the seed method);
            ``"concept"`` reads the concept view (``lava.concept``: image attention outputs ·
            concept-token attention outputs, softmaxed over the classes), which needs the default
            ``direction`` and ``softmax``.
        refine: refinements applied to the class maps before the mask stage, in order
            (``lava.refine``): ``"pamr"`` (the image colours, on a grid 4× the token grid,
            longer side ≤ 256 px), ``"propagate"`` (the captured blocks' own image→image
            attention, ``lava.propagate``; the capture then keeps their image queries and keys),
            a chain ``"propagate,pamr"`` / ``("propagate", "pamr")``, or ``Propagate(...)`` /
            ``PAMR(...)`` objects with their parameters. In an ensemble, propagation uses each
            run's own attention before the mean, PAMR runs once after it. ``None`` (default): the
            backend's default (``backend.defaults.refine``: PAMR for ``lava-shapes``, none for
            the SD3 and Flux models); ``"none"`` uses the maps as aggregated.

    Every image is read before any work starts. Returns a ``Segmentation`` with one label map
    per image, in input order, at original size. To handle each image as soon as it is done
    (and hold only one in memory), use ``segment_iter`` with the same arguments.
    """
    pil = load_images(images)
    labels: list = [None] * len(pil)
    scores: list = [None] * len(pil)
    seg_classes: tuple[str, ...] = ()
    for i, one in segment_iter(
        pil,
        classes,
        backend=backend,
        timestep=timestep,
        sigma=sigma,
        layers=layers,
        seed=seed,
        timesteps=timesteps,
        seeds=seeds,
        resolution=resolution,
        direction=direction,
        softmax=softmax,
        heads=heads,
        impl=impl,
        source=source,
        template=template,
        separator=separator,
        max_classes_per_prompt=max_classes_per_prompt,
        prompt_batch=prompt_batch,
        normalize=normalize,
        background_threshold=background_threshold,
        min_presence=min_presence,
        presence=presence,
        aggregate_config=aggregate_config,
        mask_config=mask_config,
        refine=refine,
        batch_size=batch_size,
        progress=progress,
    ):
        labels[i], scores[i], seg_classes = one.labels[0], one.scores[0], one.classes
    return Segmentation(labels=tuple(labels), scores=tuple(scores), classes=seg_classes, images=tuple(pil))


def segment_iter(
    images: ImageInput | Sequence[ImageInput],
    classes: str | Sequence[str],
    *,
    backend: Backend | Segmenter | str = "lava-shapes",
    timestep: float | None = None,
    sigma: float | None = None,
    layers: Sequence[int] | None = None,
    seed: int | None = None,
    timesteps: Sequence[float] | None = None,
    seeds: Sequence[int] | None = None,
    resolution: int | str | None = None,
    direction: str = "image_to_text",
    softmax: str = "joint",
    heads: str = "mean",
    impl: str = "auto",
    source: str = "attention",
    template: str = DEFAULT_TEMPLATE,
    separator: str = DEFAULT_SEPARATOR,
    max_classes_per_prompt: int | None = None,
    prompt_batch: int | None = None,
    normalize: str | None = None,
    background_threshold: float | None = None,
    min_presence: float | None = None,
    presence: str | None = None,
    aggregate_config: AggregateConfig | None = None,
    mask_config: MaskConfig | None = None,
    refine: RefineSpec = None,
    batch_size: int = 1,
    progress: bool = False,
) -> Iterator[tuple[int, Segmentation]]:
    """``segment`` one batch at a time: yields ``(index into images, Segmentation of that image)``.

    Arguments as for ``segment``. Each image is read when its batch is run (paths are opened
    only then), and each result is yielded as soon as it exists and not kept, so memory stays
    that of one batch however many images there are. With ``batch_size=1`` (the default) results
    come in input order; larger batches group images by size, so indices may come out of order.
    Each yielded ``Segmentation`` holds one image (``labels[0]`` ``[H, W]``, ``scores[0]``
    ``[C, H, W]``, ``images[0]``).
    """
    if isinstance(backend, str):
        backend = load_backend(backend)
    inputs = as_image_list(images)
    refine = resolve_refine(refine, backend.defaults.refine)
    if is_segmenter(backend):  # a comparison method (lava.methods): its heatmaps, lava's mask stage
        from .methods.segment import segment_with

        lava_only = {
            "sigma": (sigma, None),
            "direction": (direction, "image_to_text"),
            "softmax": (softmax, "joint"),
            "heads": (heads, "mean"),
            "impl": (impl, "auto"),
            "source": (source, "attention"),
            "prompt_batch": (prompt_batch, None),
            "timesteps": (timesteps, None),
            "seeds": (seeds, None),
            "presence": (presence, None),
        }
        yield from segment_with(
            backend,
            inputs,
            classes,
            timestep=timestep,
            layers=layers,
            seed=0 if seed is None else seed,
            resolution=resolution,
            template=template,
            separator=separator,
            max_classes_per_prompt=max_classes_per_prompt,
            normalize=normalize,
            background_threshold=background_threshold,
            min_presence=min_presence,
            aggregate_config=aggregate_config,
            mask_config=mask_config,
            refine=refine,
            progress=progress,
            lava_only=lava_only,
        )
        return
    prompt = encode_prompt(
        backend,
        classes,
        template=template,
        separator=separator,
        max_classes_per_prompt=max_classes_per_prompt,
    )
    layers = backend.check_layers(layers if layers is not None else backend.defaults.layers)
    aggregate_config, mask_config = resolve_configs(
        backend,
        aggregate_config,
        mask_config,
        normalize=normalize,
        background_threshold=background_threshold,
        min_presence=min_presence,
        presence=presence,
        classes=prompt.classes,
    )
    columns = capture_columns(prompt, aggregate_config.presence, source)
    runs = ensemble(timestep, timesteps, seed, seeds, sigma)
    per_run, after = split_refine(refine)
    batches = _batches(inputs, max(1, batch_size))
    for idx in tqdm(batches, desc="segment", unit="batch", disable=not progress):
        # An RGB PIL image (as ``segment`` passes) is used as is: converting would copy it.
        batch = [inputs[i] if _is_rgb(inputs[i]) else load_image(inputs[i]) for i in idx]
        heats = []
        for run_timestep, run_seed in runs:
            noisy = noise(
                backend, batch, timestep=run_timestep, sigma=sigma, seed=run_seed, resolution=resolution
            )
            slices = capture(
                backend,
                noisy,
                prompt,
                layers=layers,
                direction=direction,
                softmax=softmax,
                heads=heads,
                impl=impl,
                prompt_batch=prompt_batch,
                keep_image_qk=bool(per_run),
                source=source,
                columns=columns,
            )
            heat = aggregate(slices, prompt, aggregate_config)
            if per_run:
                # Each run's maps are propagated by that run's own attention; its q/k go with it.
                heat = refine_heatmaps(
                    heat, batch, method=per_run, slices=slices, layers=aggregate_config.layers
                )
            heats.append(heat)
            del noisy, slices
        heat = mean_heatmaps(heats)
        if after:
            # The RGB images of this batch are at hand: the colour edges the maps are pulled to.
            heat = refine_heatmaps(heat, batch, method=after)
        seg = to_mask(heat, config=mask_config)
        del heats, heat
        for j, i in enumerate(idx):
            one = Segmentation(
                labels=(seg.labels[j],), scores=(seg.scores[j],), classes=seg.classes, images=(batch[j],)
            )
            yield i, one
            del one
        # Drop this batch before the next is read: the caller may be keeping nothing.
        del seg, batch

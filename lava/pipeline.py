"""``segment``: the five stages composed, over any number of images of any sizes.

``segment_iter`` yields each image's result as soon as it is done, so a caller that writes and
drops each one (the ``lava segment`` command) holds one image at a time however many there are;
``segment`` collects them into one ``Segmentation``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence

from PIL import Image
from tqdm.auto import tqdm

from .backends import Backend, load_backend
from .compose import prepare_prompt, read_heatmaps, segmentation
from .config import Reading, Recipe
from .config import recipe as make_recipe
from .errors import LavaError
from .images import ImageInput, as_image_list, image_size, load_image, load_images
from .methods.base import Segmenter
from .options import OPTIONS
from .stages.prompts import parse_classes
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


def segment(
    images: ImageInput | Sequence[ImageInput],
    classes: str | Sequence[str],
    *,
    backend: Backend | Segmenter | str = "lava-shapes",
    recipe: Recipe | None = None,
    reading: Reading | None = None,
    aggregate_config: AggregateConfig | None = None,
    mask_config: MaskConfig | None = None,
    batch_size: int = 1,
    progress: bool = False,
    **options,
) -> Segmentation:
    """Segment ``images`` into ``classes``: noise → forward+capture → aggregate → refine → mask.

    Args:
        images: paths, PIL images or uint8 arrays (any mode; converted to RGB).
        classes: class names, or one comma-separated string.
        backend: a loaded ``Backend`` or a name for ``load_backend``, or a comparison method's
            segmenter (``lava.methods.load_segmenter``: MaskCLIP, StableSeg-style UNet), which
            replaces the noise/capture/aggregate stages and shares the rest.
        recipe: a complete ``lava.config.Recipe`` (e.g. from ``lava.config.recipe``) instead of
            the options below; not together with them.
        reading / aggregate_config / mask_config: configs to start from instead of the model's
            defaults (an option given as well overrides that field).
        batch_size: images per forward pass (images are grouped by size).
        **options: any of ``lava.options.OPTIONS`` (listed below), each ``None`` by default:
            the model's own value (``lava models``); ``0`` turns a background threshold or
            presence floor off. ``timesteps``/``seeds`` ask for an ensemble (one forward per
            timestep and seed, maps averaged before the mask stage).

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
        recipe=recipe,
        reading=reading,
        aggregate_config=aggregate_config,
        mask_config=mask_config,
        batch_size=batch_size,
        progress=progress,
        **options,
    ):
        labels[i], scores[i], seg_classes = one.labels[0], one.scores[0], one.classes
    return Segmentation(labels=tuple(labels), scores=tuple(scores), classes=seg_classes, images=tuple(pil))


def segment_iter(
    images: ImageInput | Sequence[ImageInput],
    classes: str | Sequence[str],
    *,
    backend: Backend | Segmenter | str = "lava-shapes",
    recipe: Recipe | None = None,
    reading: Reading | None = None,
    aggregate_config: AggregateConfig | None = None,
    mask_config: MaskConfig | None = None,
    batch_size: int = 1,
    progress: bool = False,
    **options,
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
    names = parse_classes(classes)
    if recipe is None:
        recipe = make_recipe(
            backend,
            reading=reading,
            aggregate_config=aggregate_config,
            mask_config=mask_config,
            classes=names,
            **options,
        )
    elif any(v is not None for v in options.values()) or reading or aggregate_config or mask_config:
        raise LavaError("give recipe= or options and configs, not both (recipe.replace(...) changes one)")
    prompt = prepare_prompt(backend, names, recipe.prompt)
    batches = _batches(inputs, max(1, batch_size))
    for idx in tqdm(batches, desc="segment", unit="batch", disable=not progress):
        # An RGB PIL image (as ``segment`` passes) is used as is: converting would copy it.
        batch = [inputs[i] if _is_rgb(inputs[i]) else load_image(inputs[i]) for i in idx]
        (heat,) = read_heatmaps(backend, batch, prompt, [recipe])
        seg = segmentation(heat, recipe)
        del heat
        for j, i in enumerate(idx):
            one = Segmentation(
                labels=(seg.labels[j],), scores=(seg.scores[j],), classes=seg.classes, images=(batch[j],)
            )
            yield i, one
            del one
        # Drop this batch before the next is read: the caller may be keeping nothing.
        del seg, batch


def _options_doc() -> str:
    """The options section of ``segment``'s docstring, from their one declaration."""
    import textwrap

    lines = ["", "    Options:"]
    for o in OPTIONS.values():
        text = f"{o.name}: {o.help}" + (f" (one of {', '.join(o.choices)})" if o.choices else "")
        lines += textwrap.wrap(text, 96, initial_indent=" " * 8, subsequent_indent=" " * 12)
    return "\n".join(lines) + "\n"


segment.__doc__ = (segment.__doc__ or "") + _options_doc()

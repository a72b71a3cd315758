"""Reading images of any common mode into RGB, and sizing them to the model's token grid."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import ImageError

ImageInput = str | os.PathLike | Image.Image | np.ndarray


def _to_rgb(img: Image.Image, source: str) -> Image.Image:
    """RGB from any PIL mode: alpha is composited on white, 16-bit and float are rescaled."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        # 16-bit/float files use their own range; map it onto 8 bits instead of clipping.
        scaled = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        img = Image.fromarray(scaled.round().astype(np.uint8), mode="L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    try:
        return img.convert("RGB")
    except (ValueError, OSError) as err:
        raise ImageError(f"cannot convert image {source} (mode {img.mode}) to RGB: {err}") from err


def load_image(image: ImageInput) -> Image.Image:
    """An RGB PIL image from a path, a PIL image or an ``[H, W]``/``[H, W, 3|4]`` uint8 array."""
    if isinstance(image, Image.Image):
        return _to_rgb(image, "<PIL image>")
    if isinstance(image, np.ndarray):
        if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3, 4)):
            raise ImageError(f"array images must be [H, W] or [H, W, 1|3|4], got shape {image.shape}")
        if image.dtype != np.uint8:
            raise ImageError(f"array images must be uint8, got {image.dtype}")
        return _to_rgb(
            Image.fromarray(image.squeeze(-1) if image.ndim == 3 and image.shape[2] == 1 else image),
            "<array>",
        )
    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        _check_path(path)
        try:
            with Image.open(path) as img:
                img.load()
                return _to_rgb(img, path)
        except (UnidentifiedImageError, OSError, SyntaxError) as err:
            raise ImageError(f"cannot read {path} as an image (PNG, JPEG, ...): {err}") from err
    if isinstance(image, (bytes, bytearray, memoryview)):
        raise ImageError(
            "got raw bytes: pass a file path, or decode them first with PIL.Image.open(io.BytesIO(data))"
        )
    raise ImageError(f"expected an image path, a PIL image or a uint8 array, got {type(image).__name__}")


def _check_path(path: str) -> None:
    if not os.path.exists(path):
        raise ImageError(f"image file not found: {path}")
    if os.path.isdir(path):
        raise ImageError(f"expected an image file, got a directory: {path}")


def as_image_list(images) -> list[ImageInput]:
    """One input or a list of them as a list, without reading anything; refuses what is no image."""
    if images is None:
        raise ImageError("no images given (got None): expected an image path, a PIL image or a uint8 array")
    if isinstance(images, (bytes, bytearray, memoryview)):
        raise ImageError(
            "got raw bytes: pass a file path, or decode them first with PIL.Image.open(io.BytesIO(data))"
        )
    if isinstance(images, (str, os.PathLike, Image.Image, np.ndarray)):
        return [images]
    try:
        items = list(images)
    except TypeError:
        raise ImageError(
            f"expected an image path, a PIL image, a uint8 array or a list of them, "
            f"got {type(images).__name__}"
        ) from None
    if not items:
        raise ImageError("no images given: expected at least one image")
    return items


def load_images(images: ImageInput | Sequence[ImageInput]) -> list[Image.Image]:
    """``load_image`` over one input or a list of them."""
    return [load_image(im) for im in as_image_list(images)]


def image_size(image: ImageInput) -> tuple[int, int]:
    """``(H, W)`` of an input without decoding its pixels (a file's header is read and checked)."""
    if isinstance(image, Image.Image):
        return image.height, image.width
    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        _check_path(path)
        try:
            with Image.open(path) as img:
                return img.height, img.width
        except (UnidentifiedImageError, OSError, SyntaxError) as err:
            raise ImageError(f"cannot read {path} as an image (PNG, JPEG, ...): {err}") from err
    loaded = load_image(image)  # an array (already in memory), or the usual error for anything else
    return loaded.height, loaded.width


def fit_to_grid(size: tuple[int, int], resolution: int, unit: int) -> tuple[int, int]:
    """Pixel size ``(H', W')`` for an image of ``size = (H, W)``: long side ≈ ``resolution``.

    Aspect ratio is kept; each side is rounded to a multiple of ``unit`` (VAE factor × patch
    size) and is at least one unit. Heatmaps are later resized back to ``(H, W)``.
    """
    h, w = size
    scale = resolution / max(h, w)
    return (max(unit, round(h * scale / unit) * unit), max(unit, round(w * scale / unit) * unit))

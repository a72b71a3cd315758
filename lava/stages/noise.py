"""Stage 1: images → ``NoisyLatents`` (resize to the token grid, VAE encode, flow-matching noise)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers.image_processor import VaeImageProcessor

from ..backends.base import Backend
from ..errors import ImageError, LavaError
from ..images import ImageInput, fit_to_grid, load_images
from ..options import stretch_size
from ..types import NoisyLatents


def resolve_time(backend: Backend, timestep: float | None, sigma: float | None) -> tuple[float, float]:
    """``(timestep, sigma)`` from whichever one is given (the backend default when neither)."""
    if timestep is not None and sigma is not None:
        raise LavaError("give either timestep or sigma, not both")
    if sigma is not None:
        timestep = backend.timestep_for_sigma(sigma)
    elif timestep is None:
        timestep = backend.defaults.timestep
    return float(timestep), backend.sigma_for_timestep(timestep)


def input_size(backend: Backend, size: tuple[int, int], resolution: int | str | None) -> tuple[int, int]:
    """Pixel size ``(H', W')`` fed to the VAE for an image of ``size = (H, W)``.

    ``resolution``: long side in pixels; ``None`` → the backend's native resolution;
    ``"original"`` → the image's own size; ``"WxH"`` (e.g. ``"1024x1024"``) → that size whatever
    the image's aspect ratio (stretched; sides rounded to the token grid). Raises if it exceeds
    the position embedding.
    """
    return pixel_size(
        size,
        resolution,
        unit=backend.grid_unit,
        native=backend.defaults.resolution,
        limit=backend.max_resolution,
        name=backend.name,
    )


def pixel_size(
    size: tuple[int, int],
    resolution: int | str | None,
    *,
    unit: int,
    native: int,
    limit: int | None = None,
    name: str = "the model",
) -> tuple[int, int]:
    """``input_size`` from a model's numbers instead of a loaded backend (the memory planner
    sizes a model before loading it): token-grid ``unit`` in px, ``native`` long side, ``limit``
    the position embedding's side in px (``None``: none)."""
    stretched = stretch_size(resolution)
    if stretched is not None:
        out = tuple(max(unit, round(side / unit) * unit) for side in stretched)
    else:
        if resolution is None:
            resolution = native
        elif resolution == "original":
            resolution = max(size)
        elif not isinstance(resolution, int) or resolution <= 0:
            raise LavaError(
                "resolution must be a positive number of pixels, None, 'original' or 'WxH' (e.g. "
                f"'1024x1024'), got {resolution!r}"
            )
        out = fit_to_grid(size, int(resolution), unit)
    if limit is not None and max(out) > limit:
        raise ImageError(
            f"an image of {size[1]}x{size[0]} px at resolution {resolution} needs {out[1]}x{out[0]} px, but "
            f"{name}'s position embedding covers at most {limit} px per side; use a resolution <= {limit}"
        )
    return out


@torch.no_grad()
def noise(
    backend: Backend,
    images: ImageInput | Sequence[ImageInput],
    *,
    timestep: float | None = None,
    sigma: float | None = None,
    seed: int = 0,
    resolution: int | str | None = None,
) -> NoisyLatents:
    """Encode ``images`` and noise them to one time: ``x_t = (1 - σ)·x_0 + σ·ε``.

    Images of any mode are converted to RGB and resized (aspect kept) so each side is a multiple
    of the token size; all images in one call must share one size (``lava.segment`` groups them).
    ``ε`` is drawn on the CPU from ``seed`` so results match across devices, and every image
    gets the same ``ε`` so an image's result does not depend on what it is batched with.

    Returns ``NoisyLatents`` with latents ``[B, C, h, w]``.
    """
    pil = load_images(images)
    sizes = tuple((im.height, im.width) for im in pil)
    if len(set(sizes)) != 1:
        raise ImageError(
            f"images in one noise() call must share one size, got {sorted(set(sizes))}; "
            "call it per size, or use lava.segment() which groups them"
        )
    t, s = resolve_time(backend, timestep, sigma)
    h, w = input_size(backend, sizes[0], resolution)
    pixels = VaeImageProcessor(vae_scale_factor=backend.vae_scale_factor).preprocess(pil, height=h, width=w)
    clean = backend.encode_images(pixels).to(backend.dtype)
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    eps = torch.randn(clean.shape[1:], generator=gen, dtype=torch.float32).to(clean.device, clean.dtype)
    eps = eps.expand_as(clean)
    latents = (1.0 - s) * clean + s * eps
    p = backend.patch_size
    return NoisyLatents(
        latents=latents,
        clean=clean,
        noise=eps,
        sigma=s,
        timestep=t,
        seed=int(seed),
        image_sizes=sizes,
        input_size=(h, w),
        grid=(clean.shape[-2] // p, clean.shape[-1] // p),
    )

"""Backends found by name: a registry name, a hub id, a local folder, or a loaded pipeline."""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable
from typing import Any

import torch

from ..errors import ModelError
from . import flux, sd3
from .base import Backend, VariantDefaults, resolve_device, resolve_dtype
from .family import FLUX, family_of
from .sd3 import DEFAULTS, HUB_IDS, detect_variant
from .tiny import TINY_MAX_SEQUENCE_LENGTH, build_tiny_flux_pipeline, build_tiny_pipeline

__all__ = [
    "REGISTRY",
    "Backend",
    "VariantDefaults",
    "from_pipeline",
    "list_backends",
    "load_backend",
    "place",
]


def _place(pipe, device: torch.device, dtype: torch.dtype, offload_text_encoders: bool) -> torch.device:
    """Move modules; text encoders stay on CPU when offloaded. Returns the text device."""
    text_device = torch.device("cpu") if offload_text_encoders else device

    def move(module, dev: torch.device, dt: torch.dtype) -> None:
        # Casting only when needed keeps diffusers' fp32-module bookkeeping out of the way.
        if module.dtype != dt:
            module.to(dtype=dt)
        module.to(dev)

    move(pipe.transformer, device, dtype)
    if pipe.vae is not None:
        move(pipe.vae, device, dtype)
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        module = getattr(pipe, name, None)
        if module is not None:
            move(module, text_device, text_dtype(text_device, dtype))
    return text_device


def text_dtype(text_device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The dtype text encoders run in: CPU matmuls in half precision are slow or unsupported, so on
    the CPU (offloaded, or everything on the CPU) they stay float32."""
    return torch.float32 if text_device.type == "cpu" else dtype


def from_pipeline(
    pipe: Any,
    *,
    name: str | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    offload_text_encoders: bool = False,
    max_sequence_length: int | None = None,
    defaults: VariantDefaults | None = None,
    guidance: float | None = None,
) -> Backend:
    """Wrap an already-loaded ``StableDiffusion3Pipeline`` or ``FluxPipeline`` (its modules are
    used, not copied).

    ``device``/``dtype`` default to where the transformer already is. ``max_sequence_length``
    (T5 tokens) defaults to 256 for SD3, 512 for FLUX.1-dev and 256 for schnell; ``guidance``
    (guidance-distilled Flux only) to 3.5, Seg4Diff's value.
    """
    for part in ("transformer", "scheduler", "tokenizer", "text_encoder", "encode_prompt"):
        if not hasattr(pipe, part) or getattr(pipe, part) is None:
            raise ModelError(
                f"expected a StableDiffusion3Pipeline- or FluxPipeline-like object with .{part}, "
                f"got {type(pipe).__name__}"
            )
    family = family_of(pipe.transformer)
    if family is FLUX and getattr(pipe, "text_encoder_2", None) is None:
        raise ModelError(
            "a Flux pipeline needs its T5 encoder (text_encoder_2): Flux's text sequence is T5 only"
        )
    param = next(pipe.transformer.parameters())
    dev = resolve_device(device) if device is not None else param.device
    dt = resolve_dtype(dtype, dev) if dtype is not None else param.dtype
    text_device = _place(pipe, dev, dt, offload_text_encoders)
    hint = name or str(getattr(pipe, "name_or_path", "") or pipe.transformer.config.get("_name_or_path", ""))
    if family is FLUX:
        variant = flux.detect_variant(pipe.transformer.config, hint)
        table, seq_len = flux.DEFAULTS, flux.MAX_SEQUENCE_LENGTH[variant]
        if guidance is None and pipe.transformer.config.get("guidance_embeds"):
            guidance = flux.SEG4DIFF_FLUX_GUIDANCE
    else:
        variant = detect_variant(pipe.transformer.config, hint)
        table, seq_len = DEFAULTS, 256
        if defaults is None and variant in sd3.BLOCKS:  # a model of another size reads as its family
            vae = getattr(pipe, "vae", None)
            factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
            defaults = sd3.fitted_defaults(
                variant, pipe.transformer.config, pipe.transformer.config.sample_size * factor
            )
    if guidance is not None and not pipe.transformer.config.get("guidance_embeds"):
        raise ModelError(f"guidance={guidance} given, but {variant} has no guidance embedding")
    return Backend(
        name=name or variant,
        variant=variant,
        pipe=pipe,
        defaults=defaults or table[variant],
        device=dev,
        dtype=dt,
        text_device=text_device,
        max_sequence_length=max_sequence_length or seq_len,
        family=family,
        guidance=guidance,
    )


def place(
    backend: Backend,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    offload_text_encoders: bool | None = None,
) -> Backend:
    """The same backend (same modules, name, defaults) moved to another device/dtype/offload."""
    dev = resolve_device(device) if device is not None else backend.device
    dt = resolve_dtype(dtype, dev) if dtype is not None else backend.dtype
    offload = (
        backend.text_device != backend.device if offload_text_encoders is None else offload_text_encoders
    )
    text_device = _place(backend.pipe, dev, dt, offload)
    return dataclasses.replace(
        backend, device=dev, dtype=dt, text_device=text_device, info=dict(backend.info)
    )


def _tiny_backend(
    pipe,
    *,
    name: str,
    variant: str,
    defaults: VariantDefaults,
    device,
    dtype,
    offload_text_encoders: bool,
    max_sequence_length: int | None,
) -> Backend:
    """A tiny pipeline built in code as a backend: CPU and float32 unless told otherwise."""
    dev = resolve_device(device if device is not None else "cpu")
    backend = from_pipeline(
        pipe,
        name=name,
        device=dev,
        dtype=resolve_dtype(dtype or "float32", dev),
        offload_text_encoders=offload_text_encoders,
        max_sequence_length=max_sequence_length,
        defaults=defaults,
    )
    backend.variant = variant
    backend.info["random_weights"] = True
    return backend


def _load_tiny(
    *,
    device=None,
    dtype=None,
    drop_t5: bool = False,
    offload_text_encoders: bool = False,
    variant: str = "sd3",
    seed: int = 0,
    max_sequence_length: int = TINY_MAX_SEQUENCE_LENGTH,
    **kw,
) -> Backend:
    return _tiny_backend(
        build_tiny_pipeline(variant, seed=seed, t5=not drop_t5, **kw),
        name="tiny-sd3",
        variant=f"tiny-{variant}",
        defaults=DEFAULTS["tiny-sd3"],
        device=device,
        dtype=dtype,
        offload_text_encoders=offload_text_encoders,
        max_sequence_length=max_sequence_length,
    )


def _load_tiny_flux(
    *,
    device=None,
    dtype=None,
    drop_t5: bool = False,
    offload_text_encoders: bool = False,
    seed: int = 0,
    max_sequence_length: int = TINY_MAX_SEQUENCE_LENGTH,
    **kw,
) -> Backend:
    _refuse_drop_t5("tiny-flux", drop_t5)
    return _tiny_backend(
        build_tiny_flux_pipeline(seed=seed, **kw),
        name="tiny-flux",
        variant="tiny-flux",
        defaults=flux.DEFAULTS["tiny-flux"],
        device=device,
        dtype=dtype,
        offload_text_encoders=offload_text_encoders,
        max_sequence_length=max_sequence_length,
    )


def _refuse_drop_t5(source: str, drop_t5: bool) -> None:
    if drop_t5:
        raise ModelError(
            f"{source} is a Flux model: its text sequence is T5 alone (CLIP only gives the pooled vector), "
            "so T5 cannot be dropped; leave out --drop-t5 / drop_t5"
        )


def _load_flux(
    source: str,
    *,
    device=None,
    dtype=None,
    drop_t5: bool = False,
    offload_text_encoders: bool = False,
    max_sequence_length: int | None = None,
    guidance: float | None = None,
    **kw,
) -> Backend:
    from diffusers import FluxPipeline

    _refuse_drop_t5(source, drop_t5)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    try:
        pipe = FluxPipeline.from_pretrained(source, dtype=dt, **kw)
    except (OSError, ValueError) as err:
        raise ModelError(load_error_message(source, err)) from err
    return from_pipeline(
        pipe,
        name=source,
        device=dev,
        dtype=dt,
        offload_text_encoders=offload_text_encoders,
        max_sequence_length=max_sequence_length,
        guidance=guidance,
    )


def _is_flux(source: str, index: dict | None) -> bool:
    """Whether a folder or hub id holds a Flux pipeline: its ``model_index.json`` (``index``) says so,
    or (when that could not be read here) its name does."""
    if isinstance(index, dict):
        return str(index.get("_class_name", "")).startswith("Flux")
    return "flux" in os.path.basename(os.path.normpath(source)).lower()


def _load_pretrained(source: str, **opts) -> Backend:
    """A hub id or a local folder, through the pipeline class its ``model_index.json`` names."""
    index = model_index(source, opts.get("revision"))  # read once, here
    if _is_flux(source, index):
        return _load_flux(source, **opts)
    return _load_sd3(source, index=index, **opts)


def _load_sd3(
    source: str,
    *,
    device=None,
    dtype=None,
    drop_t5: bool = False,
    offload_text_encoders: bool = False,
    max_sequence_length: int | None = None,
    index: dict | None = None,
    **kw,
) -> Backend:
    """``index``: the source's ``model_index.json`` when the caller has read it already."""
    from diffusers import StableDiffusion3Pipeline

    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if index is None:
        index = model_index(source, kw.get("revision"))
    # A folder saved without T5 says so in its model_index.json; read it before any weights load.
    no_t5 = not drop_t5 and lacks_t5(index)
    extra = {"text_encoder_3": None, "tokenizer_3": None} if drop_t5 or no_t5 else {}
    try:
        folder = source if os.path.isdir(os.path.expanduser(source)) else _download(source, extra, kw)
        # The heavy modules go straight to their dtype and device, one tensor at a time; diffusers
        # loads only what is left (tokenizers, scheduler).
        # The index read above is the folder's own; only when it could not be read is the folder asked.
        folder_index = index if index is not None else model_index(folder)
        modules = _load_modules(folder, folder_index, dev, dt, offload_text_encoders, skip=set(extra))
        pipe = StableDiffusion3Pipeline.from_pretrained(folder, dtype=dt, **extra, **modules, **kw)
    except (OSError, ValueError) as err:
        raise ModelError(load_error_message(source, err)) from err
    backend = from_pipeline(
        pipe,
        name=source,
        device=dev,
        dtype=dt,
        offload_text_encoders=offload_text_encoders,
        max_sequence_length=max_sequence_length,
    )
    if no_t5:
        backend.info["no_t5"] = f"{source} has no T5 text encoder (its model_index.json lists none)"
    return backend


HEAVY_MODULES = ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")


def _download(source: str, extra: dict, kw: dict) -> str:
    """The local snapshot folder of a hub id (downloaded once, as ``from_pretrained`` would)."""
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline.download(source, **extra, **kw)


def _load_modules(
    folder: str,
    index: dict | None,
    device: torch.device,
    dtype: torch.dtype,
    offload_text_encoders: bool,
    skip: set[str],
) -> dict:
    """Transformer, VAE and text encoders of a pipeline folder, each loaded into the dtype and onto
    the device it will run on (see ``loading.load_module``); components ``skip`` names or
    ``model_index.json`` (``index``, the folder's) lists as null are left out."""
    from .loading import load_module, module_class

    index = index or {}
    text_device = torch.device("cpu") if offload_text_encoders else device
    wanted = [
        name
        for name in HEAVY_MODULES
        if name not in skip and isinstance(index.get(name), (list, tuple)) and index[name] and index[name][0]
    ]
    # What the folder holds is checked before anything loads: a missing component fails in a
    # second, not after gigabytes of the others have been read.
    missing = [n for n in wanted if not _has_weights(os.path.join(folder, n))]
    if missing:
        raise ModelError(
            f"{folder}: model_index.json lists {', '.join(missing)} but "
            f"{'that folder holds' if len(missing) == 1 else 'those folders hold'} no weights "
            "(*.safetensors or *.bin); expected a complete folder saved with save_pretrained()"
        )
    out = {}
    for name in wanted:
        on_text = name.startswith("text_encoder")
        dev = text_device if on_text else device
        dt = text_dtype(dev, dtype) if on_text else dtype
        out[name] = load_module(module_class(index, name), os.path.join(folder, name), dtype=dt, device=dev)
    return out


def _has_weights(component: str) -> bool:
    from .loading import weight_files

    return os.path.isdir(component) and (
        bool(weight_files(component)) or any(f.endswith(".bin") for f in os.listdir(component))
    )


def model_index(source: str, revision: str | None = None) -> dict | None:
    """The ``model_index.json`` of a local folder or hub repository, or ``None`` when it cannot be
    read (no such file, no network): then ``from_pretrained`` reports the problem itself.

    For a hub id this fetches that one small file (diffusers fetches it first anyway) and nothing
    else.
    """
    import json

    path = os.path.join(os.path.expanduser(source), "model_index.json")
    try:
        if os.path.isdir(os.path.expanduser(source)):
            with open(path) as fh:
                return json.load(fh)
        from huggingface_hub import hf_hub_download

        with open(hf_hub_download(source, "model_index.json", revision=revision)) as fh:
            return json.load(fh)
    except Exception:  # unreadable here: let from_pretrained say why, in its own words
        return None


def lacks_t5(index: dict | None) -> bool:
    """Whether a pipeline's ``model_index.json`` lists no T5 encoder or tokenizer (a folder saved with
    ``save_pretrained`` after dropping T5 writes ``[null, null]`` for both, or omits them)."""
    if not isinstance(index, dict):
        return False

    def missing(name: str) -> bool:
        entry = index.get(name)
        return entry is None or (isinstance(entry, (list, tuple)) and (not entry or entry[0] is None))

    return missing("text_encoder_3") or missing("tokenizer_3")


def _causes(err: BaseException):
    """``err`` and every exception it was raised from or during, outermost first."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def load_error_message(source: str, err: BaseException) -> str:
    """Why ``from_pretrained(source)`` failed, in plain words, with what to do about it.

    diffusers reports every hub failure as one ``OSError`` that points at "the stacktrace above"
    (which the command line never shows); the hub's own exception is further down the chain.
    """
    from huggingface_hub import errors as hub

    causes = list(_causes(err))
    folder = "a local folder saved with save_pretrained()"
    local = f"pass {folder} instead of the hub id"
    if os.path.isdir(os.path.expanduser(source)):
        return f"could not load model weights from the folder {source}: {err}"
    if any(isinstance(c, hub.GatedRepoError) for c in causes):
        return (
            f"{source} is a gated repository on the Hugging Face hub: accept its licence at "
            f"https://huggingface.co/{source} and log in (`hf auth login`, or set HF_TOKEN), or {local}"
        )
    if any(isinstance(c, hub.RepositoryNotFoundError) for c in causes):
        return (
            f"{source} was not found on the Hugging Face hub (check the spelling; a private repository "
            f"needs `hf auth login`), or {local}"
        )
    offline = any(isinstance(c, hub.OfflineModeIsEnabled) for c in causes) or os.environ.get(
        "HF_HUB_OFFLINE", ""
    ).lower() in ("1", "true", "yes", "on")
    unreachable = offline or any(
        isinstance(c, (hub.LocalEntryNotFoundError, ConnectionError, TimeoutError))
        or type(c).__name__ in ("ConnectError", "ConnectTimeout", "ReadTimeout", "NetworkError")
        for c in causes
    )
    if unreachable or "not fully cached" in str(err) or "connect" in str(err).lower():
        why = "offline mode is on (HF_HUB_OFFLINE)" if offline else "the hub cannot be reached (no network?)"
        return (
            f"{source} is not in the local Hugging Face cache and {why}: download it once with network "
            f"(`hf download {source}`; gated models need their licence accepted and a login first), "
            f"or {local}"
        )
    return (
        f"could not load model weights from {source!r}: {err}. Expected a hub id you have access to, "
        f"or {folder}"
    )


def _load_reference(**kw) -> Backend:
    from ..reference import load_reference_backend

    return load_reference_backend(**kw)


REGISTRY: dict[str, Callable[..., Backend]] = {
    "tiny-sd3": _load_tiny,
    "tiny-flux": _load_tiny_flux,
    "lava-shapes": _load_reference,
}
for _short, _hub in HUB_IDS.items():
    REGISTRY[_short] = lambda _hub=_hub, **kw: _load_sd3(_hub, **kw)
for _short, _hub in flux.HUB_IDS.items():
    REGISTRY[_short] = lambda _hub=_hub, **kw: _load_flux(_hub, **kw)


def list_backends() -> list[tuple[str, str, VariantDefaults]]:
    """``(name, what it loads, defaults)`` for every registered backend."""
    rows = []
    try:
        from ..reference import REFERENCE_DEFAULTS

        rows.append(
            (
                "lava-shapes",
                "small SD3-architecture model trained on synthetic shapes, shipped (offline)",
                REFERENCE_DEFAULTS,
            )
        )
    except ImportError:  # the reference model is not part of this build
        pass
    rows.append(("tiny-sd3", "toy SD3 built in code, random weights (offline)", DEFAULTS["tiny-sd3"]))
    rows.append(
        (
            "tiny-flux",
            "toy FLUX.1-dev built in code, random weights (offline); blocks 0-1 double-stream, 2-3 single",
            flux.DEFAULTS["tiny-flux"],
        )
    )
    rows += [(short, hub, DEFAULTS[short]) for short, hub in HUB_IDS.items()]
    rows += [
        (short, f"{hub}; blocks 0-18 double-stream, 19-56 single-stream", flux.DEFAULTS[short])
        for short, hub in flux.HUB_IDS.items()
    ]
    return rows


def load_backend(
    name_or_path: str,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    drop_t5: bool = False,
    offload_text_encoders: bool = False,
    verbose: bool | None = None,
    **kw: Any,
) -> Backend:
    """A backend from a registry name (``"tiny-sd3"``, ``"sd3-medium"``, ``"flux-dev"``, ``"tiny-flux"``,
    ...), a hub id, or a folder (SD3 or Flux, as its ``model_index.json`` says).

    Args:
        device: ``"cuda"``, ``"cpu"``...; default CUDA when available.
        dtype: default bf16 on CUDA, fp32 on CPU.
        drop_t5: skip the T5 encoder (its part of the text sequence is then zeros).
        offload_text_encoders: keep the text encoders on the CPU; only their outputs move.
        verbose: let diffusers and transformers print while loading (their warnings and
            "Loading weights" bars), as configured. By default they are quiet for the load (and
            restored after it), as under the ``lava`` command without ``--verbose``; hub download
            bars are shown either way.
    """
    from .loading import VERBOSE_LOADING, library_output

    opts = dict(
        device=device, dtype=dtype, drop_t5=drop_t5, offload_text_encoders=offload_text_encoders, **kw
    )
    if name_or_path in REGISTRY:
        load = functools.partial(REGISTRY[name_or_path], **opts)
    else:
        path = os.path.expanduser(name_or_path)
        if os.path.isdir(path):
            load = functools.partial(_load_pretrained, path, **opts)
        elif name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
            raise ModelError(f"model folder not found: {name_or_path}")
        elif name_or_path.count("/") == 1:  # a hub id: org/name
            load = functools.partial(_load_pretrained, name_or_path, **opts)
        else:
            raise ModelError(
                f"unknown model {name_or_path!r}: expected one of {sorted(REGISTRY)}, a hub id such as "
                f"{HUB_IDS['sd3-medium']!r}, or a local folder"
            )
    if VERBOSE_LOADING.get() if verbose is None else verbose:
        return load()
    with library_output(verbose=False):
        return load()

"""Loading a pretrained SD3, FLUX.1, Chroma, FLUX.2, Qwen-Image or Z-Image pipeline from a hub id or
a local folder, and saying in plain words why it could not be loaded."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..errors import ModelError
from . import loading
from .base import Backend, resolve_device, resolve_dtype
from .wrap import from_pipeline, text_dtype


def refuse_drop_t5(source: str, drop_t5: bool) -> None:
    if drop_t5:
        raise ModelError(
            f"{source} is a Flux model: its text sequence is T5 alone (CLIP only gives the pooled vector), "
            "so T5 cannot be dropped; leave out --drop-t5 / drop_t5"
        )


@dataclass(frozen=True)
class Placement:
    """Where a loaded pipeline goes: device and dtype (resolved), text encoders on the CPU or
    not, and the T5 window (``None``: the model's)."""

    device: torch.device
    dtype: torch.dtype
    offload_text_encoders: bool = False
    max_sequence_length: int | None = None


def placement(opts: dict) -> tuple[Placement, dict]:
    """The ``Placement`` a loader's keyword options ask for, and the rest of them (passed on to
    ``from_pretrained``: ``revision``, ``variant``, ...)."""
    kw = dict(opts)
    dev = resolve_device(kw.pop("device", None))
    dt = resolve_dtype(kw.pop("dtype", None), dev)
    offload = kw.pop("offload_text_encoders", False)
    return Placement(dev, dt, offload, kw.pop("max_sequence_length", None)), kw


def _as_backend(source: str, where: Placement, build, guidance: float | None = None) -> Backend:
    """``build()``'s pipeline as a backend placed ``where``; its failures to load explained in plain
    words (``load_error_message``)."""
    try:
        pipe = build()
    except (OSError, ValueError) as err:
        raise ModelError(load_error_message(source, err)) from err
    return from_pipeline(
        pipe,
        name=source,
        device=where.device,
        dtype=where.dtype,
        offload_text_encoders=where.offload_text_encoders,
        max_sequence_length=where.max_sequence_length,
        guidance=guidance,
    )


def load_flux(source: str, *, drop_t5: bool = False, guidance: float | None = None, **opts) -> Backend:
    """A Flux pipeline from a hub id or a folder (``opts``: ``placement``'s, then ``from_pretrained``'s)."""
    from diffusers import FluxPipeline

    refuse_drop_t5(source, drop_t5)
    where, kw = placement(opts)
    return _as_backend(
        source, where, lambda: FluxPipeline.from_pretrained(source, dtype=where.dtype, **kw), guidance
    )


def load_chroma(source: str, *, drop_t5: bool = False, **opts) -> Backend:
    """A Chroma pipeline from a hub id or a folder (``opts``: ``placement``'s, then ``from_pretrained``'s)."""
    from diffusers import ChromaPipeline

    if drop_t5:
        raise ModelError(
            f"{source} is a Chroma model: T5 is its only text encoder, so it cannot be dropped; leave out "
            "--drop-t5 / drop_t5"
        )
    where, kw = placement(opts)
    return _as_backend(source, where, lambda: ChromaPipeline.from_pretrained(source, dtype=where.dtype, **kw))


def _is_chroma(index: dict | None) -> bool:
    """Whether a ``model_index.json`` (``index``) names a Chroma pipeline (text-to-image, img2img,
    inpaint)."""
    return isinstance(index, dict) and str(index.get("_class_name", "")).startswith("Chroma")


FLUX2_PIPELINES = ("Flux2Pipeline", "Flux2KleinPipeline")


def load_flux2(source: str, *, drop_t5: bool = False, guidance: float | None = None, **opts) -> Backend:
    """A FLUX.2 pipeline (dev or klein, as its ``model_index.json`` names it) from a hub id or a folder."""
    import diffusers

    if drop_t5:
        raise ModelError(f"{source} is a FLUX.2 model: it has no T5 to drop; leave out --drop-t5 / drop_t5")
    where, kw = placement(opts)
    index = model_index(source, kw.get("revision"))
    name = str(index.get("_class_name", "")) if isinstance(index, dict) else ""
    if name not in FLUX2_PIPELINES:  # unreadable here: klein by name, else dev
        name = "Flux2KleinPipeline" if "klein" in source.lower() else "Flux2Pipeline"
    cls = getattr(diffusers, name)
    return _as_backend(source, where, lambda: cls.from_pretrained(source, dtype=where.dtype, **kw), guidance)


def _is_flux2(source: str, index: dict | None) -> bool:
    if isinstance(index, dict):
        return str(index.get("_class_name", "")) in FLUX2_PIPELINES
    return "flux.2" in os.path.basename(os.path.normpath(source)).lower()


def load_zimage(source: str, *, drop_t5: bool = False, guidance: float | None = None, **opts) -> Backend:
    """A Z-Image pipeline from a hub id or a folder (``opts``: ``placement``'s, then
    ``from_pretrained``'s)."""
    from diffusers import ZImagePipeline

    if drop_t5:
        raise ModelError(
            f"{source} is a Z-Image model: its text sequence is its Qwen3 encoder's alone, which cannot be "
            "dropped; leave out --drop-t5 / drop_t5"
        )
    where, kw = placement(opts)
    return _as_backend(
        source, where, lambda: ZImagePipeline.from_pretrained(source, dtype=where.dtype, **kw), guidance
    )


def _is_zimage(source: str, index: dict | None) -> bool:
    """Whether a folder or hub id holds a Z-Image pipeline (``model_index.json``'s ``_class_name``,
    or, when that could not be read here, its name)."""
    if isinstance(index, dict):
        return str(index.get("_class_name", "")).startswith("ZImage")
    name = os.path.basename(os.path.normpath(source)).lower()
    return "z-image" in name or "zimage" in name


def _is_flux(source: str, index: dict | None) -> bool:
    """Whether a folder or hub id holds a Flux pipeline: its ``model_index.json`` (``index``) says so,
    or (when that could not be read here) its name does."""
    if isinstance(index, dict):
        return str(index.get("_class_name", "")).startswith("Flux")
    return "flux" in os.path.basename(os.path.normpath(source)).lower()


def load_qwen_image(source: str, *, drop_t5: bool = False, index: dict | None = None, **opts) -> Backend:
    """A Qwen-Image pipeline from a hub id or a folder (``opts``: ``placement``'s, then
    ``from_pretrained``'s). Its text sequence is the Qwen2.5-VL encoder's alone: nothing to drop.
    The transformer (20 B parameters), VAE and text encoder load as ``load_sd3``'s do: straight into
    their dtype and device, one tensor at a time."""
    from diffusers import QwenImagePipeline

    refuse_drop_qwen(source, drop_t5)
    where, kw = placement(opts)

    def build():
        local = os.path.isdir(os.path.expanduser(source))
        folder = source if local else QwenImagePipeline.download(source, **kw)
        folder_index = index if index is not None and local else model_index(folder)
        modules = _load_modules(
            folder, folder_index, where.device, where.dtype, where.offload_text_encoders, skip=set()
        )
        return QwenImagePipeline.from_pretrained(folder, dtype=where.dtype, **modules, **kw)

    return _as_backend(source, where, build)


def refuse_drop_qwen(source: str, drop_t5: bool) -> None:
    if drop_t5:
        raise ModelError(
            f"{source} is a Qwen-Image model: its text sequence is its Qwen2.5-VL encoder alone (there is "
            "no T5), so nothing can be dropped; leave out --drop-t5 / drop_t5"
        )


def _is_qwen_image(source: str, index: dict | None) -> bool:
    """Whether a folder or hub id holds a Qwen-Image pipeline (its ``model_index.json``, else its name)."""
    if isinstance(index, dict):
        return str(index.get("_class_name", "")).startswith("QwenImage")
    return "qwen-image" in os.path.basename(os.path.normpath(source)).lower()


def load_pretrained(source: str, **opts) -> Backend:
    """A hub id or a local folder, through the pipeline class its ``model_index.json`` names."""
    index = model_index(source, opts.get("revision"))  # read once, here
    if _is_chroma(index):
        return load_chroma(source, **opts)
    if _is_flux2(source, index):
        return load_flux2(source, **opts)
    if _is_zimage(source, index):
        return load_zimage(source, **opts)
    if _is_flux(source, index):
        return load_flux(source, **opts)
    if _is_qwen_image(source, index):
        return load_qwen_image(source, index=index, **opts)
    return load_sd3(source, index=index, **opts)


def load_sd3(source: str, *, drop_t5: bool = False, index: dict | None = None, **opts) -> Backend:
    """An SD3-family pipeline from a hub id or a folder (``opts``: ``placement``'s, then
    ``from_pretrained``'s); ``index``: the source's ``model_index.json`` when the caller has read
    it already."""
    from diffusers import StableDiffusion3Pipeline

    where, kw = placement(opts)
    if index is None:
        index = model_index(source, kw.get("revision"))
    # A folder saved without T5 says so in its model_index.json; read it before any weights load.
    no_t5 = not drop_t5 and lacks_t5(index)
    extra = {"text_encoder_3": None, "tokenizer_3": None} if drop_t5 or no_t5 else {}

    def build():
        folder = source if os.path.isdir(os.path.expanduser(source)) else _download(source, extra, kw)
        # The heavy modules go straight to their dtype and device, one tensor at a time; diffusers
        # loads only what is left (tokenizers, scheduler).
        # The index read above is the folder's own; only when it could not be read is the folder asked.
        folder_index = index if index is not None else model_index(folder)
        modules = _load_modules(
            folder, folder_index, where.device, where.dtype, where.offload_text_encoders, skip=set(extra)
        )
        return StableDiffusion3Pipeline.from_pretrained(folder, dtype=where.dtype, **extra, **modules, **kw)

    backend = _as_backend(source, where, build)
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
        out[name] = loading.load_module(
            loading.module_class(index, name), os.path.join(folder, name), dtype=dt, device=dev
        )
    return out


def _has_weights(component: str) -> bool:
    return os.path.isdir(component) and (
        bool(loading.weight_files(component)) or any(f.endswith(".bin") for f in os.listdir(component))
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

"""Loading a pipeline's modules straight into their target dtype and device, one tensor at a time.

``from_pretrained`` reads a whole safetensors file into memory and then converts it into the
module's dtype, so for a moment a module exists twice: an fp16 file loaded as fp32 peaks at
1.5× its final size (measured on the full-size SD3-medium transformer: 15.8 GiB of process
memory for 7.6 GiB of weights plus the 3.9 GiB of modules already loaded). Here each module is
built without storage (accelerate's ``init_empty_weights``) and each tensor is read with one
``pread`` (no memory map, whose touched pages would count as resident too), converted, moved to
its device and assigned; the loading overhead is then one tensor, not one file.

Anything this does not handle (no safetensors files, ``.bin`` weights, keys that do not match)
falls back to the class's own ``from_pretrained``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

# safetensors dtype names → torch dtypes (the ones diffusers/transformers checkpoints use).
_ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def safetensors_header(path: str | Path) -> dict:
    """The JSON header of a safetensors file: ``{name: {dtype, shape, data_offsets}}`` (8 + n bytes read)."""
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(n))
    header.pop("__metadata__", None)
    header["__data_start__"] = 8 + n
    return header


def weight_files(folder: str | Path) -> list[Path]:
    """The safetensors files of one component folder: those its ``*.index.json`` names, or else every
    ``*.safetensors`` that is not a variant (``model.fp16.safetensors``) unless only variants exist."""
    folder = Path(folder)
    for index in sorted(folder.glob("*.safetensors.index.json")):
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / n for n in names if (folder / n).exists()]
    files = sorted(folder.glob("*.safetensors"))
    plain = [f for f in files if not re.search(r"\.[a-z0-9]+\.safetensors$", f.name)]
    return plain or files


def stored_tensors(folder: str | Path) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """``{name: (stored dtype, shape)}`` for every tensor of a component folder, from headers only."""
    out = {}
    for path in weight_files(folder):
        for name, meta in safetensors_header(path).items():
            if name != "__data_start__":
                out[name] = (_ST_DTYPES.get(meta["dtype"], torch.float32), tuple(meta["shape"]))
    return out


def _read_tensors(path: Path):
    """``(name, tensor)`` for every tensor of one safetensors file, each read on its own."""
    header = safetensors_header(path)
    start = header.pop("__data_start__")
    fd = os.open(path, os.O_RDONLY)
    try:
        for name, meta in header.items():
            begin, end = meta["data_offsets"]
            dtype = _ST_DTYPES[meta["dtype"]]
            buf = bytearray(end - begin)
            view, done = memoryview(buf), 0
            while done < len(buf):  # pread may return less than asked for on large reads
                got = os.preadv(fd, [view[done:]], start + begin + done)
                if got <= 0:
                    raise OSError(f"{path} ends before tensor {name}")
                done += got
            flat = torch.frombuffer(buf, dtype=dtype) if buf else torch.empty(0, dtype=dtype)
            yield name, flat.reshape(meta["shape"])
    finally:
        os.close(fd)


def load_module(cls, folder: str | Path, *, dtype: torch.dtype, device: torch.device):
    """``cls`` (a diffusers ``ModelMixin`` or transformers ``PreTrainedModel``) from one component
    folder, built without storage and filled tensor by tensor in ``dtype`` on ``device``.

    Floating-point tensors are converted to ``dtype``; others keep theirs. Falls back to
    ``cls.from_pretrained`` when the folder has no safetensors or the keys do not match.
    """
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device

    folder = Path(folder)
    files = weight_files(folder)
    if not files:
        return _from_pretrained(cls, folder, dtype, device)
    with init_empty_weights():
        # Storage-less, so the cast is free; a transformers config may carry its saved dtype.
        module = empty_module(cls, folder).to(dtype)
    expected = set(module.state_dict())
    stored = set(stored_tensors(folder))
    if not expected <= stored:
        return _from_pretrained(cls, folder, dtype, device)
    for path in files:
        for name, tensor in _read_tensors(path):
            if name not in expected:
                continue
            value = tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else tensor.dtype)
            del tensor
            set_module_tensor_to_device(module, name, device, value=value, dtype=value.dtype)
    # Buffers that are not in the checkpoint (created by __init__, e.g. CLIP's position ids).
    for name, buf in list(module.named_buffers()):
        if buf.device != device:
            set_module_tensor_to_device(module, name, device, value=buf.to(device))
    return module.eval().requires_grad_(False)


def empty_module(cls, folder: str | Path):
    """``cls`` built from the config in ``folder`` (diffusers or transformers), its weights not
    filled: under ``init_empty_weights`` it holds no storage."""
    if hasattr(cls, "load_config") and hasattr(cls, "from_config"):  # diffusers
        return cls.from_config(cls.load_config(folder))
    from transformers import AutoConfig

    return cls(AutoConfig.from_pretrained(folder))


def _from_pretrained(cls, folder: Path, dtype: torch.dtype, device: torch.device):
    key = "torch_dtype" if hasattr(cls, "load_config") else "dtype"
    module = cls.from_pretrained(folder, **{key: dtype})
    return module.to(device).eval().requires_grad_(False)


def module_class(index: dict, name: str):
    """The class ``model_index.json`` names for component ``name`` (``["diffusers", "AutoencoderKL"]``)."""
    import importlib

    library, class_name = index[name]
    return getattr(importlib.import_module(library), class_name)


# ---- library output ------------------------------------------------------------------------------

# Python warnings raised from inside these packages are theirs to report, not lava's.
CHATTY_MODULES = r"(diffusers|transformers|huggingface_hub|accelerate|tokenizers)(\.|$)"


def set_library_output(verbose: bool) -> Callable[[], None]:
    """Switch the chatter of diffusers and transformers off, or (``verbose=True``) back to their
    own defaults; returns a function that puts back what was in force before.

    Off: their log messages below errors, their own progress bars ("Loading weights") and the
    Python warnings raised inside them (and inside huggingface_hub, accelerate, tokenizers) are not
    shown. Hub download bars stay as they were: a first download of real weights takes minutes and
    the user should see it move.
    """
    import diffusers.utils.logging as diffusers_logging
    import huggingface_hub.utils as hub_utils
    import transformers.utils.logging as transformers_logging

    libs = (transformers_logging, diffusers_logging)
    before = [(lib.get_verbosity(), lib.is_progress_bar_enabled()) for lib in libs]
    hub_bars = not hub_utils.are_progress_bars_disabled()
    caught = warnings.catch_warnings()  # restores the warning filters on exit
    caught.__enter__()
    if not verbose:
        warnings.filterwarnings("ignore", module=CHATTY_MODULES)

    def switch(levels_and_bars) -> None:
        for lib, (level, bars) in zip(libs, levels_and_bars):
            lib.set_verbosity(level)
            if bars:
                lib.enable_progress_bar()
            else:
                lib.disable_progress_bar()
        # transformers switches the hub's bars along with its own: put them back as they were
        if hub_bars:
            hub_utils.enable_progress_bars()
        else:
            hub_utils.disable_progress_bars()

    switch([(lib.WARNING if verbose else lib.ERROR, verbose) for lib in libs])

    def restore() -> None:
        caught.__exit__(None, None, None)
        switch(before)

    return restore


@contextlib.contextmanager
def library_output(verbose: bool) -> Iterator[None]:
    """``set_library_output(verbose)`` for the block only."""
    restore = set_library_output(verbose)
    try:
        yield
    finally:
        restore()

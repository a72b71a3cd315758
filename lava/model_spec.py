"""What the memory planner knows about a model: its sizes (``ModelSpec``), read from its configs
and the headers of its safetensors files, or from an already-built pipeline. No weights are read.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass

from .backends.families import family_of
from .backends.loading import empty_module, module_class, stored_tensors
from .backends.pretrained import lacks_t5, load_error_message, model_index
from .errors import ModelError

TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")
HEAVY = ("transformer", "vae", *TEXT_ENCODERS)


@dataclass(frozen=True)
class ModelSpec:
    """A model's sizes, from configs: no weights needed.

    ``params``: module name → number of floating-point elements (parameters and buffers) for the
    modules present; ``largest``: the largest single tensor's elements; the rest is geometry.
    """

    params: dict[str, int]
    heads: int
    head_dim: int
    patch_size: int
    joint_dim: int
    vae_scale: int = 8
    vae_channels: int = 128
    vae_sample_size: int | None = None
    clip_len: int = 77
    t5_len: int = 256
    largest: int = 0

    @property
    def has_t5(self) -> bool:
        return "text_encoder_3" in self.params

    @property
    def grid_unit(self) -> int:
        return self.vae_scale * self.patch_size


_TRANSFORMER_KEYS = ("num_attention_heads", "attention_head_dim", "patch_size", "joint_attention_dim")


def _geometry(transformer) -> tuple[dict, bool]:
    """The transformer config's geometry under the SD3/Flux key names, and whether its text sequence
    starts with CLIP tokens: a Z-Image config (``n_heads``, ``dim``, ``all_patch_size``,
    ``cap_feat_dim``) is read as such, its text being its Qwen3 encoder's alone."""
    if "n_heads" in transformer and "cap_feat_dim" in transformer:
        heads = int(transformer["n_heads"])
        geometry = {
            "num_attention_heads": heads,
            "attention_head_dim": int(transformer["dim"]) // heads,
            "patch_size": int(transformer["all_patch_size"][0]),
            "joint_attention_dim": int(transformer["cap_feat_dim"]),
        }
        return geometry, False
    return {key: transformer[key] for key in _TRANSFORMER_KEYS}, True


def _spec(
    params: dict[str, int], largest: int, transformer: dict, vae: dict | None, *, clip_len: int, t5_len: int
) -> ModelSpec:
    """The ``ModelSpec`` of the counted modules and the transformer's and VAE's configs (as dicts;
    ``vae`` None without a VAE: 3-channel images, no downscaling)."""
    transformer, has_clip = _geometry(transformer)
    if not has_clip:
        clip_len = 0
    return ModelSpec(
        params=params,
        heads=int(transformer["num_attention_heads"]),
        head_dim=int(transformer["attention_head_dim"]),
        patch_size=int(transformer["patch_size"]),
        joint_dim=int(transformer["joint_attention_dim"]),
        vae_scale=_vae_geometry(vae)[0],
        vae_channels=_vae_geometry(vae)[1],
        vae_sample_size=_int_or_none(vae.get("sample_size")) if vae else None,
        clip_len=clip_len,
        t5_len=t5_len,
        largest=largest,
    )


def _vae_geometry(vae: dict | None) -> tuple[int, int]:
    """``(pixels per latent side, channels of the first encoder stage)`` of a VAE config: 2D VAEs
    (``block_out_channels``), or the 3-D causal video VAE of Qwen-Image (one spatial halving per
    ``temperal_downsample`` entry, first stage ``base_dim`` wide); ``(1, 3)`` without a VAE."""
    if not vae:
        return 1, 3
    if "block_out_channels" not in vae and "temperal_downsample" in vae:
        return 2 ** len(vae["temperal_downsample"]), int(vae.get("base_dim", 96))
    return 2 ** (len(vae["block_out_channels"]) - 1), int(vae["block_out_channels"][0])


def _clip_len(transformer: dict, model_max_length: int) -> int:
    """CLIP tokens at the start of the text sequence: the tokenizer's window, unless the
    transformer's family has no CLIP part there (``Family.clip_in_sequence``)."""
    from .backends.families import family_named

    family = family_named(str(transformer.get("_class_name", "")))
    return model_max_length if family is None or family.clip_in_sequence else 0


def spec_from_pipeline(pipe, max_sequence_length: int = 256) -> ModelSpec:
    """The spec of an already-built pipeline (any object with its attributes; missing parts count 0)."""
    params, largest = {}, 0
    for name in HEAVY:
        module = getattr(pipe, name, None)
        if module is None or not hasattr(module, "parameters"):
            continue
        tensors = [*module.parameters(), *getattr(module, "buffers", lambda: ())()]
        params[name] = sum(t.numel() for t in tensors if t.is_floating_point())
        largest = max([largest, *(t.numel() for t in tensors)])
    cfg = pipe.transformer.config
    transformer = dict(cfg) if isinstance(cfg, dict) else dict(vars(cfg))
    vcfg = getattr(getattr(pipe, "vae", None), "config", None)
    vae = None if vcfg is None else dict(vcfg) if isinstance(vcfg, dict) else dict(vars(vcfg))
    tokenizer = getattr(pipe, "tokenizer", None)
    clip_len = int(getattr(tokenizer, "model_max_length", 77))
    spec = _spec(params, largest, transformer, vae, clip_len=clip_len, t5_len=max_sequence_length)
    family = family_of(pipe.transformer)
    if family.name != "sd3":  # the family's own text layout and token size (FLUX.1, Chroma: 2x2 packing)
        spec = dataclasses.replace(
            spec, clip_len=family.clip_len(pipe), patch_size=family.patch_size(pipe.transformer)
        )
    return spec


def _int_or_none(value) -> int | None:
    if isinstance(value, (list, tuple)):
        value = max(value) if value else None
    return None if value is None else int(value)


def spec_from_folder(folder: str, *, drop_t5: bool = False, max_sequence_length: int = 256) -> ModelSpec:
    """The spec of a pipeline folder (``save_pretrained`` layout) from its JSON files and the headers
    of its safetensors files: nothing heavy is read. Components ``model_index.json`` lists as null
    are absent; without safetensors a module is built without storage to count its parameters."""
    index = model_index(folder)
    if not isinstance(index, dict):
        raise ModelError(
            f"{folder} has no readable model_index.json: expected a folder saved with save_pretrained()"
        )
    skip_t5 = drop_t5 or lacks_t5(index)
    params, largest = {}, 0
    for name in HEAVY:
        entry = index.get(name)
        if (name == "text_encoder_3" and skip_t5) or not isinstance(entry, (list, tuple)) or entry[0] is None:
            continue
        tensors = stored_tensors(os.path.join(folder, name))
        if tensors:
            sizes = [_numel(shape) for dt, shape in tensors.values() if dt.is_floating_point]
        else:  # no safetensors: count a module built without storage
            sizes = _meta_sizes(module_class(index, name), os.path.join(folder, name))
        params[name] = sum(sizes)
        largest = max([largest, *sizes])

    def config(name: str, file: str = "config.json") -> dict:
        with open(os.path.join(folder, name, file)) as fh:
            return json.load(fh)

    t = config("transformer")
    vae = config("vae") if "vae" in params else None
    has_tok = os.path.isfile(os.path.join(folder, "tokenizer", "tokenizer_config.json"))
    tok = config("tokenizer", "tokenizer_config.json") if has_tok else {}
    clip_len = _clip_len(t, int(tok.get("model_max_length", 77)))
    return _spec(params, largest, t, vae, clip_len=clip_len, t5_len=max_sequence_length)


def spec_for(source: str, *, drop_t5: bool = False, max_sequence_length: int = 256):
    """``(ModelSpec, transformer config)`` of a local folder, or of a hub id from its JSON files alone
    (downloaded once into the Hugging Face cache, weights not fetched)."""
    from diffusers.configuration_utils import FrozenDict

    folder = os.path.expanduser(source)
    if not os.path.isdir(folder):
        from huggingface_hub import snapshot_download

        try:
            folder = snapshot_download(source, allow_patterns=["*.json", "*.txt", "*.model"])
        except Exception as err:  # the hub's own errors, explained as load_backend explains them
            raise ModelError(load_error_message(source, err)) from err
    spec = spec_from_folder(folder, drop_t5=drop_t5, max_sequence_length=max_sequence_length)
    with open(os.path.join(folder, "transformer", "config.json")) as fh:
        return spec, FrozenDict(json.load(fh))


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _meta_sizes(cls, folder: str) -> list[int]:
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=True):
        module = empty_module(cls, folder)
    return [t.numel() for t in [*module.parameters(), *module.buffers()] if t.is_floating_point()]


def zimage_spec(max_sequence_length: int | None = None) -> ModelSpec:
    """The ``ModelSpec`` of Z-Image-Turbo from its published configs (``lava.backends.zimage``):
    every module built without storage and its parameters counted; nothing is downloaded."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    from .backends import flux, zimage

    with init_empty_weights(include_buffers=True):
        modules = {
            "transformer": ZImageTransformer2DModel(**zimage.TRANSFORMER_CONFIG),
            "vae": AutoencoderKL(**flux.VAE_CONFIG),  # FLUX.1's VAE
            "text_encoder": Qwen3Model(Qwen3Config(**zimage.TEXT_ENCODER_CONFIG)),
        }
    params, largest = {}, 0
    for name, module in modules.items():
        sizes = [t.numel() for t in [*module.parameters(), *module.buffers()] if t.is_floating_point()]
        params[name] = sum(sizes)
        largest = max(largest, *sizes)
    vae = {"block_out_channels": flux.VAE_CONFIG["block_out_channels"], "sample_size": 1024}
    return _spec(
        params,
        largest,
        zimage.TRANSFORMER_CONFIG,
        vae,
        clip_len=0,
        t5_len=max_sequence_length or zimage.MAX_SEQUENCE_LENGTH,
    )

"""The attention-slice op: text↔image probabilities of one joint-attention call, without ``N×N``.

One function, several implementations behind it:

* ``naive``  – explicit softmax over the full ``[B, H, N, N]`` matrix (the test reference);
* ``torch``  – fused SDPA that also returns the log-sum-exp, plus one small matmul for the
  wanted columns (CPU and GPU);
* ``triton`` – one fused pass producing the attention output and the slice together
  (CUDA, or CPU under ``TRITON_INTERPRET=1`` for tests).

``auto`` picks ``triton`` on CUDA when it is importable, ``torch`` elsewhere.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Sequence

import torch

from ..options import IMAGE_TO_TEXT, IMPLEMENTATIONS, JOINT
from .reference import naive_attention, naive_slice
from .spec import DIRECTIONS, HEAD_REDUCTIONS, SOFTMAX_DOMAINS, SliceSpec
from .torch_slice import torch_attention_slice

__all__ = [
    "DIRECTIONS",
    "HEAD_REDUCTIONS",
    "IMPLEMENTATIONS",
    "SOFTMAX_DOMAINS",
    "SliceSpec",
    "attention_slice",
    "attention_with_slice",
    "available_impls",
    "resolve_impl",
]


def _triton_module():
    """The Triton implementation, or None where triton is not installed."""
    if importlib.util.find_spec("triton") is None:
        return None
    try:
        return importlib.import_module("lava.kernels.triton_slice")
    except ImportError:
        return None


def _triton_usable(device: torch.device) -> bool:
    mod = _triton_module()
    if mod is None:
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def available_impls(device: torch.device | str = "cpu") -> tuple[str, ...]:
    """Implementations that can run on ``device`` in this process."""
    device = torch.device(device)
    impls = ["naive", "torch"]
    if _triton_usable(device):
        impls.append("triton")
    return tuple(impls)


def resolve_impl(impl: str, device: torch.device | str) -> str:
    """Turn ``auto`` into a concrete implementation; reject unknown or unavailable ones."""
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"attention impl must be one of {IMPLEMENTATIONS}, got {impl!r}")
    device = torch.device(device)
    if impl == "auto":
        return "triton" if device.type == "cuda" and _triton_usable(device) else "torch"
    if impl == "triton" and not _triton_usable(device):
        raise ValueError(
            "attention impl 'triton' needs the triton package and a CUDA device "
            "(or TRITON_INTERPRET=1 on CPU, set before lava is imported); "
            f"available here: {available_impls(device)}"
        )
    return impl


def attention_with_slice(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor | None,
    spec: SliceSpec,
    *,
    impl: str = "auto",
    attn_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The slice of ``spec`` and, when ``v`` is given, the layer's attention output ``O``.

    q, k, v: ``[B, H, N, D]``. ``attn_mask``: the mask the model attends with, as SDPA takes it
    (bool, ``True`` attends, or additive; broadcastable to ``[B, H, N, N]``); masked keys get
    probability 0 and leave every softmax domain. The Triton kernel takes no mask, so a masked
    call runs the ``torch`` path (``naive`` stays naive). Returns ``(O [B, H, N, D] in q.dtype or
    None, slice [B, H or 1, N_img, K] float32)``. ``O`` is computed by the same pass as the slice
    where the implementation allows it, so a capture never runs attention twice.
    """
    spec.check(q, k)
    impl = resolve_impl(impl, q.device)
    if impl == "naive":
        out = None
        if v is not None:
            out = naive_attention(q, k, v, attn_mask)[0].to(q.dtype)
        return out, naive_slice(q, k, spec, attn_mask)
    if attn_mask is not None:
        return torch_attention_slice(q, k, v, spec, attn_mask=attn_mask)
    if impl == "triton":
        out, _, sl = _triton_module().triton_attention_slice(
            q, k, v if v is not None else k, spec, need_output=v is not None
        )
        return out, sl
    return torch_attention_slice(q, k, v, spec)


def attention_slice(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    text_start: int,
    text_len: int,
    columns: Sequence[int] | torch.Tensor | None = None,
    direction: str = IMAGE_TO_TEXT,
    softmax: str = JOINT,
    heads: str = "mean",
    impl: str = "auto",
) -> torch.Tensor:
    """Text↔image attention probabilities of one joint-attention call.

    Args:
        q, k: ``[B, H, N, D]`` queries and keys of the joint sequence (after qk-norm).
        text_start, text_len: where the text tokens sit in the joint sequence (SD3 in diffusers:
            image first, so ``text_start = N - text_len``).
        columns: text positions (``0 … text_len-1``) wanted; ``None`` = all.
        direction: ``"image_to_text"`` (image queries over text keys) or ``"text_to_image"``
            (text queries over image keys).
        softmax: ``"joint"`` normalises over all ``N`` keys as the model does; ``"cross"`` over
            the other modality's keys only.
        heads: ``"mean"`` or ``"none"``.
        impl: ``"auto"``, ``"naive"``, ``"torch"`` or ``"triton"``.

    Returns:
        ``[B, H or 1, N_img, K]`` float32; entry ``[b, h, i, c]`` is the probability between
        image token ``i`` and text column ``c`` in the given direction.
    """
    spec = SliceSpec.make(
        text_start=text_start,
        text_len=text_len,
        columns=columns,
        direction=direction,
        softmax=softmax,
        heads=heads,
    )
    return attention_with_slice(q, k, None, spec, impl=impl)[1]

"""The attention-slice op written the obvious way: explicit softmax over the full joint matrix.

This is the reference every other implementation is tested against. It builds the whole
``[B, H, N, N]`` score matrix, so it is only for tests and small inputs.

Conventions shared by every implementation (see ``lava.kernels.attention_slice``):

* ``q, k, v``: ``[B, H, N, D]`` of one joint-attention call; scale ``1/sqrt(D)`` as in SDPA.
* The text tokens occupy ``[text_start, text_start + text_len)`` of the joint sequence; every
  other position is an image token, in order (``N_img = N - text_len``).
* ``columns``: text positions (``0 … text_len-1``, relative to ``text_start``) wanted.
* ``image_to_text``: ``out[b, h, i, c] = P(query = image i, key = text column c)``.
  ``text_to_image``: ``out[b, h, i, c] = P(query = text column c, key = image i)``.
* ``softmax="joint"`` normalises over all ``N`` keys (what the model itself does);
  ``softmax="cross"`` over the other modality's keys only (text keys for image→text,
  image keys for text→image).
* ``heads="mean"`` averages heads (``[B, 1, N_img, K]``), ``"none"`` keeps them
  (``[B, H, N_img, K]``). The result is float32.
"""

from __future__ import annotations

import torch

from ..options import CROSS, IMAGE_TO_TEXT
from .spec import SliceSpec


def additive_mask(mask: torch.Tensor | None, dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
    """An attention mask as SDPA takes it (bool: ``True`` attends; or additive) → additive ``dtype``
    (0 where attended, ``-inf`` where not), same shape (broadcastable to ``[B, H, N, N]``)."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
    return mask.to(dtype)


def naive_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention output and log-sum-exp by explicit softmax, in float32.

    ``attn_mask``: as SDPA takes it (bool, ``True`` attends, or additive), broadcastable to
    ``[B, H, N, N]``. Returns ``O [B, H, N, D]`` (float32) and ``lse [B, H, N]`` (natural log).
    """
    scale = q.shape[-1] ** -0.5
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale
    if attn_mask is not None:
        scores = scores + additive_mask(attn_mask)
    lse = torch.logsumexp(scores, dim=-1)
    # A query whose every key is masked (a padding token under Chroma's [text; image] x itself
    # mask) attends to nothing: SDPA returns zeros for its row, and so does this (not NaN).
    probs = torch.exp(scores - lse.masked_fill(torch.isneginf(lse), 0.0)[..., None])
    return probs @ v.float(), lse


def _softmax(scores: torch.Tensor) -> torch.Tensor:
    """Softmax over the last axis; a row that is ``-inf`` throughout (every key masked) is zeros."""
    return torch.softmax(scores, dim=-1).masked_fill(torch.isneginf(scores).all(-1, keepdim=True), 0.0)


def naive_slice(
    q: torch.Tensor, k: torch.Tensor, spec: SliceSpec, attn_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """The slice of ``spec`` from the explicit ``[B, H, N, N]`` probability matrix.

    q, k: ``[B, H, N, D]``; ``attn_mask`` as for ``naive_attention`` (masked keys get probability
    0 and leave every softmax domain). Returns ``[B, H or 1, N_img, K]`` float32.
    """
    n = q.shape[-2]
    scale = q.shape[-1] ** -0.5
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale  # [B, H, N, N]
    if attn_mask is not None:
        scores = scores + additive_mask(attn_mask)
    img = spec.image_index(n, q.device)
    txt = spec.text_index(q.device)
    cols = spec.column_index(q.device)

    if spec.direction == IMAGE_TO_TEXT:
        rows = scores[:, :, img, :]  # image queries over all keys
        if spec.softmax == CROSS:
            rows = rows[:, :, :, txt]  # keep only text keys, then columns are relative
            probs = _softmax(rows)[:, :, :, cols]
        else:
            probs = _softmax(rows)[:, :, :, txt[cols]]
        out = probs  # [B, H, N_img, K]
    else:
        rows = scores[:, :, txt[cols], :]  # wanted text queries over all keys
        probs = _softmax(rows[:, :, :, img]) if spec.softmax == CROSS else _softmax(rows)[:, :, :, img]
        out = probs.transpose(-1, -2)  # [B, H, N_img, K]

    if spec.heads == "mean":
        out = out.mean(dim=1, keepdim=True)
    return out.contiguous()

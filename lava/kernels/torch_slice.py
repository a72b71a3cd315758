"""The attention-slice op from fused SDPA plus one small matmul: no ``N×N`` tensor anywhere.

The fused SDPA kernels can return the log-sum-exp of each query row besides the output. With
the lse of the image rows, the probability of any text column is one dot product away:
``P[i, c] = exp(q_i · k_c · scale - lse_i)``. So image→text over the joint domain costs one
``[N_img, D] × [D, K]`` matmul on top of the attention the layer runs anyway.

The other cases need an lse the model never computes: softmax over text keys only, over image
keys only for K text rows, or over all ``N`` keys when no values are given (the standalone
``attention_slice``, which runs no attention). Those are computed in query chunks sized in
bytes (``chunk_bytes`` of fp32 scores per chunk, transformed in place), so their extra memory
is the same at every resolution and never ``O(N²)``: at 2048 px (16717 keys, 24 heads) a
32 MiB chunk is 20 query rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..options import IMAGE_TO_TEXT, JOINT
from .reference import additive_mask
from .spec import SliceSpec

# Bytes of fp32 scores materialised at once by the chunked paths; the rows per chunk follow from
# it and the number of keys, so the extra memory does not grow with the resolution. On CPU, chunks
# that stay in cache measured fastest (16–32 MiB beat 128 MiB by ~1.5–3×, docs/benchmarks.md); on
# GPUs, larger chunks mean fewer kernel launches per layer.
CHUNK_BYTES = {"cpu": 32 * 2**20}
DEFAULT_CHUNK_BYTES = 256 * 2**20


def chunk_budget(device: torch.device, chunk_bytes: int | None = None) -> int:
    """``chunk_bytes`` if given, else the default for ``device``'s type."""
    return chunk_bytes if chunk_bytes is not None else CHUNK_BYTES.get(device.type, DEFAULT_CHUNK_BYTES)


def rows_per_chunk(lead: int, keys: int, chunk_bytes: int) -> int:
    """Query rows per chunk so that ``[lead, rows, keys]`` fp32 scores fit in ``chunk_bytes`` (at least 1)."""
    return max(1, chunk_bytes // max(1, lead * keys * 4))


def sdpa_with_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention output and log-sum-exp from a fused kernel.

    q, k, v: ``[B, H, N, D]``; ``bias``: an additive mask broadcastable to ``[B, H, N, N]``
    (``additive_mask``), or ``None``. Returns ``O [B, H, N, D]`` (q.dtype) and ``lse [B, H, N]``
    (fp32). On CPU this is the same flash kernel ``F.scaled_dot_product_attention`` dispatches to
    (a bool mask turned into the additive mask SDPA makes of it), so ``O`` is bitwise equal to
    what the model computes without capture.
    """
    if q.device.type == "cpu":
        mask = None if bias is None else bias.to(q.dtype)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, attn_mask=mask)
        return out, lse.float()
    if q.device.type == "cuda" and bias is None:
        try:
            res = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, return_debug_mask=False)
            return res[0], res[1].float()
        except RuntimeError:
            # fp32 inputs or an older GPU: the memory-efficient kernel also returns the lse.
            out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
                q, k, v, None, compute_log_sumexp=True
            )[:2]
            return out, lse[..., : q.shape[-2]].float()
    mask = None if bias is None else bias.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask), chunked_lse(q, k, bias=bias)


def bias_at(
    bias: torch.Tensor | None, rows: torch.Tensor | slice, cols: torch.Tensor | slice
) -> torch.Tensor | None:
    """The entries of an additive mask ``[B|1, H|1, N|1, N]`` at query ``rows`` and key ``cols``
    (index tensors or slices), broadcast dimensions kept at size 1: ``[B|1, H|1, M|1, K]``."""
    if bias is None:
        return None
    picked = bias if bias.shape[-2] == 1 else bias[..., rows, :]
    return picked[..., cols]


def chunked_lse(
    q: torch.Tensor,
    keys: torch.Tensor,
    chunk_bytes: int | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Log-sum-exp of every query row of ``q`` over ``keys``, in fp32.

    q: ``[B, H, M, D]``, keys: ``[B, H, N_sel, D]``; ``bias``: additive mask of those rows and
    keys, broadcastable to ``[B, H, M, N_sel]``, or ``None``. Returns ``[B, H, M]``. Works through as many
    query rows at a time as fit in ``chunk_bytes`` of scores (default: ``chunk_budget``), and
    transforms them in place, so at most one ``[B, H, rows, N_sel]`` fp32 buffer lives at once.
    """
    b, h, m, _ = q.shape
    scale = q.shape[-1] ** -0.5
    keys_t = keys.float().transpose(-1, -2)
    lse = torch.empty(b, h, m, dtype=torch.float32, device=q.device)
    step = rows_per_chunk(b * h, keys.shape[-2], chunk_budget(q.device, chunk_bytes))
    for s in range(0, m, step):
        scores = q[:, :, s : s + step, :].float() @ keys_t
        scores.mul_(scale)
        if bias is not None:
            scores.add_(bias if bias.shape[-2] == 1 else bias[..., s : s + step, :])
        top = scores.amax(dim=-1, keepdim=True)
        lse[:, :, s : s + step] = scores.sub_(top).exp_().sum(dim=-1).log_().add_(top[..., 0])
        del scores, top  # free this chunk before the next one is computed
    return lse


def _rows_at_columns(
    q_rows: torch.Tensor,
    k_cols: torch.Tensor,
    lse: torch.Tensor,
    heads: str,
    chunk_bytes: int,
    transpose: bool = False,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``exp(q_rows · k_colsᵀ · scale + bias - lse)``, reduced over heads as asked.

    q_rows: ``[B, H, M, D]``, k_cols: ``[B, H, K, D]``, lse: ``[B, H, M]``; ``bias``: additive
    mask broadcastable to ``[B, H, M, K]`` or ``None``.
    Returns ``[B, H or 1, M, K]`` fp32 (``[B, H or 1, K, M]`` contiguous if ``transpose``), built
    as many rows at a time as fit in ``chunk_bytes``, so a head mean never holds the per-head
    tensor for all rows, and written straight into the result.
    """
    b, h, m, _ = q_rows.shape
    n_cols = k_cols.shape[-2]
    scale = q_rows.shape[-1] ** -0.5
    k_t = k_cols.float().transpose(-1, -2)
    h_out = 1 if heads == "mean" else h
    out = torch.empty(b, h_out, *((n_cols, m) if transpose else (m, n_cols)), device=q_rows.device)
    step = rows_per_chunk(b * h, n_cols, chunk_bytes)
    for s in range(0, m, step):
        probs = q_rows[:, :, s : s + step, :].float() @ k_t
        probs.mul_(scale)
        if bias is not None:
            probs.add_(bias if bias.shape[-2] == 1 else bias[..., s : s + step, :])
        probs.sub_(lse[:, :, s : s + step, None]).exp_()
        if heads == "mean":
            probs = probs.mean(dim=1, keepdim=True)
        if transpose:
            out[:, :, :, s : s + step] = probs.transpose(-1, -2)
        else:
            out[:, :, s : s + step, :] = probs
        del probs
    return out


def torch_attention_slice(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor | None,
    spec: SliceSpec,
    *,
    chunk_bytes: int | None = None,
    attn_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The slice of ``spec`` and, when ``v`` is given, the layer's attention output.

    q, k, v: ``[B, H, N, D]``; ``attn_mask``: the mask the model attends with (bool, ``True``
    attends, or additive; broadcastable to ``[B, H, N, N]``; padded text keys of Chroma,
    Qwen-Image, Z-Image), or ``None``. Returns ``(O [B, H, N, D] or None, slice [B, H or 1, N_img, K])``.
    Besides ``O`` and the result, at most ``chunk_bytes`` of scores (default: ``chunk_budget``)
    and ``[B, H, N_img]`` log-sum-exps are allocated, whatever ``N`` (plus the mask's own rows
    where it has one per query).
    """
    chunk_bytes = chunk_budget(q.device, chunk_bytes)
    cols = spec.text_index(q.device)[spec.column_index(q.device)]  # joint positions of the wanted tokens
    txt = slice(spec.text_start, spec.text_start + spec.text_len)
    k_txt = k[:, :, txt]
    # Built once, in the dtype SDPA takes it (0 and -inf are exact in any float dtype), so the
    # attention call uses it as is and the slice's fp32 scores add it without another copy.
    bias = additive_mask(attn_mask, q.dtype)
    img = spec.image_index(q.shape[-2], q.device) if bias is not None else None

    out, lse_all = sdpa_with_lse(q, k, v, bias) if v is not None else (None, None)

    if spec.direction == IMAGE_TO_TEXT:
        q_img = spec.image_rows(q)
        if spec.softmax == JOINT:
            lse = (
                spec.image_rows(lse_all[..., None])[..., 0]
                if lse_all is not None
                else chunked_lse(q_img, k, chunk_bytes, bias_at(bias, img, slice(None)))
            )
        else:
            lse = chunked_lse(q_img, k_txt, chunk_bytes, bias_at(bias, img, txt))
        return out, _rows_at_columns(
            q_img, k[:, :, cols, :], lse, spec.heads, chunk_bytes, bias=bias_at(bias, img, cols)
        )

    # text→image: only K query rows, so their scores over all keys are small ([K, N]).
    q_txt = q[:, :, cols, :]
    if spec.softmax == JOINT and lse_all is not None:
        lse = lse_all[:, :, cols]
    elif spec.softmax == JOINT:
        lse = chunked_lse(q_txt, k, chunk_bytes, bias_at(bias, cols, slice(None)))
    else:
        lse = chunked_lse(q_txt, spec.image_rows(k), chunk_bytes, bias_at(bias, cols, img))
    # Treat image keys as the "columns" of K text rows, then transpose to [.., N_img, K].
    return out, _rows_at_columns(
        q_txt,
        spec.image_rows(k),
        lse,
        spec.heads,
        chunk_bytes,
        transpose=True,
        bias=bias_at(bias, cols, img),
    )

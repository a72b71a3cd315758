"""The attention-slice op from fused SDPA plus one small matmul: no ``N×N`` tensor anywhere.

The fused SDPA kernels can return the log-sum-exp of each query row besides the output. With
the lse of the image rows, the probability of any text column is one dot product away:
``P[i, c] = exp(q_i · k_c · scale - lse_i)``. So image→text over the joint domain costs one
``[N_img, D] × [D, K]`` matmul on top of the attention the layer runs anyway.

The other cases need an lse the model never computes (softmax over text keys only, or over
image keys only for K text rows). Those are ``[N_img, T]`` or ``[K, N]`` sized and are computed
in query chunks so that peak memory stays ``O(chunk · T)``, never ``O(N²)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .spec import SliceSpec

# Rows of scores materialised at once by the chunked paths: 4096 rows × 333 keys × 24 heads
# in fp32 is ~130 MB, a size every GPU and CPU we target holds comfortably.
DEFAULT_CHUNK = 4096


def sdpa_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention output and log-sum-exp from a fused kernel.

    q, k, v: ``[B, H, N, D]``. Returns ``O [B, H, N, D]`` (q.dtype) and ``lse [B, H, N]`` (fp32).
    On CPU this is the same flash kernel ``F.scaled_dot_product_attention`` dispatches to, so
    ``O`` is bitwise equal to what the model computes without capture.
    """
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)
        return out, lse.float()
    if q.device.type == "cuda":
        try:
            res = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, return_debug_mask=False)
            return res[0], res[1].float()
        except RuntimeError:
            # fp32 inputs or an older GPU: the memory-efficient kernel also returns the lse.
            out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
                q, k, v, None, compute_log_sumexp=True
            )[:2]
            return out, lse[..., : q.shape[-2]].float()
    return F.scaled_dot_product_attention(q, k, v), chunked_lse(q, k)


def chunked_lse(q: torch.Tensor, keys: torch.Tensor, chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Log-sum-exp of every query row of ``q`` over ``keys``, in fp32.

    q: ``[B, H, M, D]``, keys: ``[B, H, N_sel, D]``. Returns ``[B, H, M]``. Works through
    ``chunk`` query rows at a time, so at most ``[B, H, chunk, N_sel]`` scores live at once.
    """
    scale = q.shape[-1] ** -0.5
    keys_t = keys.float().transpose(-1, -2)
    parts = [
        torch.logsumexp((q[:, :, s : s + chunk, :].float() @ keys_t) * scale, dim=-1)
        for s in range(0, q.shape[-2], chunk)
    ]
    return torch.cat(parts, dim=-1)


def _rows_at_columns(
    q_rows: torch.Tensor, k_cols: torch.Tensor, lse: torch.Tensor, heads: str, chunk: int
) -> torch.Tensor:
    """``exp(q_rows · k_colsᵀ · scale - lse)``, reduced over heads as asked.

    q_rows: ``[B, H, M, D]``, k_cols: ``[B, H, K, D]``, lse: ``[B, H, M]``.
    Returns ``[B, H or 1, M, K]`` fp32, built ``chunk`` rows at a time so a head mean never
    holds the per-head tensor for all rows.
    """
    scale = q_rows.shape[-1] ** -0.5
    k_cols = k_cols.float()
    parts = []
    for s in range(0, q_rows.shape[-2], chunk):
        scores = (q_rows[:, :, s : s + chunk, :].float() @ k_cols.transpose(-1, -2)) * scale
        probs = torch.exp(scores - lse[:, :, s : s + chunk, None])
        parts.append(probs.mean(dim=1, keepdim=True) if heads == "mean" else probs)
    return torch.cat(parts, dim=-2)


def torch_attention_slice(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor | None,
    spec: SliceSpec,
    *,
    chunk: int = DEFAULT_CHUNK,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The slice of ``spec`` and, when ``v`` is given, the layer's attention output.

    q, k, v: ``[B, H, N, D]``. Returns ``(O [B, H, N, D] or None, slice [B, H or 1, N_img, K])``.
    """
    cols = spec.text_index(q.device)[spec.column_index(q.device)]  # joint positions of the wanted tokens
    k_txt = k[:, :, spec.text_start : spec.text_start + spec.text_len]

    out, lse_all = sdpa_with_lse(q, k, v) if v is not None else (None, None)

    if spec.direction == "image_to_text":
        q_img = spec.image_rows(q)
        if spec.softmax == "joint":
            lse = (
                spec.image_rows(lse_all[..., None])[..., 0]
                if lse_all is not None
                else chunked_lse(q_img, k, chunk)
            )
        else:
            lse = chunked_lse(q_img, k_txt, chunk)
        return out, _rows_at_columns(q_img, k[:, :, cols, :], lse, spec.heads, chunk).contiguous()

    # text→image: only K query rows, so their scores over all keys are small ([K, N]).
    q_txt = q[:, :, cols, :]
    if spec.softmax == "joint" and lse_all is not None:
        lse = lse_all[:, :, cols]
    else:
        lse = chunked_lse(q_txt, k if spec.softmax == "joint" else spec.image_rows(k), chunk)
    # Treat image keys as the "columns" of K text rows, then transpose to [.., N_img, K].
    probs = _rows_at_columns(q_txt, spec.image_rows(k), lse, spec.heads, chunk)
    return out, probs.transpose(-1, -2).contiguous()

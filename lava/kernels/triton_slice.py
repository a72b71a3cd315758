"""Fused Triton attention slice: flash-attention forward plus the wanted probabilities, no ``N x N``.

One main kernel runs per (query block, batch*head). It makes a single pass over the key
blocks with an online softmax, which gives the attention output ``O`` and the row
log-sum-exp. With ``softmax="cross"`` it keeps a second running log-sum-exp restricted to the
cross-modality keys, from the same score tiles, so no second pass over the keys is needed.

* ``image_to_text``: once a query block has its final log-sum-exp, the kernel reloads only the
  ``K`` wanted text keys, takes one small ``[BLOCK_M, K]`` dot and writes
  ``exp(s - lse)`` for the image rows of that block.
* ``text_to_image``: the probabilities of the ``K`` wanted text *queries* need their final
  log-sum-exp first, so a second small kernel runs after the main one. It is
  ``O(K * N * D)`` work and memory per head, a sliver of the main pass.

Both write a per-head ``[B, H, N_img, K]`` float32 buffer; ``heads="mean"`` then reduces it with
a plain ``torch.mean`` over heads, which is deterministic (no float atomics anywhere).

Under ``TRITON_INTERPRET=1`` (no GPU) every tile is upcast to float32 before ``tl.dot``: the
interpreter's low-precision dots are not trustworthy (bf16 returns garbage). On a GPU, fp16 and
bf16 tiles go to the tensor cores natively with fp32 accumulation, and fp32 inputs use IEEE
dots (not TF32), so fp32 results match the float32 reference to ~1e-6.
"""

from __future__ import annotations

import math
import os

import torch

from ..options import CROSS, IMAGE_TO_TEXT
from .spec import SliceSpec

try:
    import triton
    import triton.language as tl

    _HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the environment
    _HAS_TRITON = False

__all__ = ["is_available", "triton_attention_slice"]

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def is_available() -> bool:
    """True when Triton imports and can run here: a CUDA device, or the CPU interpreter."""
    return _HAS_TRITON and (torch.cuda.is_available() or _interpreting())


def _pick_blocks(head_dim: int) -> dict[str, int]:
    """Tile sizes and launch options, by a fixed heuristic (autotuning needs a GPU to time on).

    The interpreter runs each program in Python, so fewer, larger programs would be faster there,
    but 32 keeps ragged tails exercised at test sizes. ``BLOCK_K`` (wanted columns per dot) stays
    at 16, the smallest ``tl.dot`` accepts, since ``K`` is often small.
    """
    if _interpreting():
        return {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 16, "num_warps": 4, "num_stages": 1}
    return {
        "BLOCK_M": 64,
        "BLOCK_N": 64,
        "BLOCK_K": 32,
        "num_warps": 8 if head_dim > 64 else 4,
        "num_stages": 2,
    }


if _HAS_TRITON:

    @triton.jit
    def _attn_slice_fwd_kernel(
        Q, K, V, O, LSE, LSE_DOM, SLICE, COLS,
        stride_qb, stride_qh, stride_qn, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd,
        stride_ob, stride_oh, stride_on, stride_od,
        H, N, D, N_IMG, NUM_COLS, TEXT_START, TEXT_LEN,
        sm_scale,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
        DOM: tl.constexpr, WANT_O: tl.constexpr, WANT_I2T: tl.constexpr,
        UPCAST: tl.constexpr, PREC: tl.constexpr,
    ):  # fmt: skip
        """One query block of one (batch, head): O, lse, and optionally the image->text slice.

        Q, K, V, O: ``[B, H, N, D]`` with the given strides. LSE, LSE_DOM: ``[B, H, N]`` fp32,
        contiguous. SLICE: ``[B, H, N_IMG, NUM_COLS]`` fp32, contiguous. COLS: ``[NUM_COLS]`` int32
        text positions relative to TEXT_START.
        DOM: 0 = joint lse only; 1 = also an lse over text keys; 2 = also one over image keys.
        """
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        # int64 so that b*stride and bh*N*K cannot overflow on large batches.
        b = (pid_bh // H).to(tl.int64)
        h = (pid_bh % H).to(tl.int64)
        bh = pid_bh.to(tl.int64)
        q_base = Q + b * stride_qb + h * stride_qh
        k_base = K + b * stride_kb + h * stride_kh
        v_base = V + b * stride_vb + h * stride_vh

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        m_ok = offs_m < N
        d_ok = offs_d < D  # BLOCK_D is D rounded up to a power of two; zero padding leaves dots exact

        q = tl.load(
            q_base + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd,
            mask=m_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        if UPCAST:
            q = q.to(tl.float32)
        # Scores live in log2 units so the inner loop can use exp2.
        qk_scale = sm_scale * 1.4426950408889634

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        m_d = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_d = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

        for start_n in range(0, N, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            n_ok = offs_n < N
            kt = tl.load(
                k_base + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                mask=n_ok[None, :] & d_ok[:, None],
                other=0.0,
            )
            if UPCAST:
                kt = kt.to(tl.float32)
            s = tl.dot(q, kt, input_precision=PREC) * qk_scale
            s = tl.where(n_ok[None, :], s, float("-inf"))

            # The first key block always holds key 0, so m_new is finite from the first step on.
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            if WANT_O:
                v = tl.load(
                    v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                    mask=n_ok[:, None] & d_ok[None, :],
                    other=0.0,
                )
                if UPCAST:
                    pv = tl.dot(p, v.to(tl.float32), input_precision=PREC)
                else:
                    pv = tl.dot(p.to(v.dtype), v, input_precision=PREC)
                acc = acc * alpha[:, None] + pv
            m_i = m_new

            if DOM != 0:
                is_text = (offs_n >= TEXT_START) & (offs_n < TEXT_START + TEXT_LEN)
                # Image keys are the non-text ones; keys past N need no mask, their s is already -inf.
                in_dom = is_text if DOM == 1 else (offs_n < TEXT_START) | (offs_n >= TEXT_START + TEXT_LEN)
                s_d = tl.where(in_dom[None, :], s, float("-inf"))
                m_dn = tl.maximum(m_d, tl.max(s_d, 1))
                # A block may hold no key of the domain yet (max still -inf); shifting by 0 then
                # keeps exp2(-inf - -inf) = NaN out of the running sum.
                m_safe = tl.where(m_dn == float("-inf"), 0.0, m_dn)
                l_d = l_d * tl.exp2(m_d - m_safe) + tl.sum(tl.exp2(s_d - m_safe[:, None]), 1)
                m_d = m_dn

        lse2 = m_i + tl.log2(l_i)
        tl.store(LSE + bh * N + offs_m, lse2 * 0.6931471805599453, mask=m_ok)
        if WANT_O:
            o = acc / l_i[:, None]
            tl.store(
                O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :] * stride_od,
                o.to(O.dtype.element_ty),
                mask=m_ok[:, None] & d_ok[None, :],
            )
        row_lse2 = lse2  # what the image->text rows are normalised by
        if DOM != 0:
            lse_d2 = m_d + tl.log2(l_d)
            tl.store(LSE_DOM + bh * N + offs_m, lse_d2 * 0.6931471805599453, mask=m_ok)
            if DOM == 1:
                row_lse2 = lse_d2

        if WANT_I2T:
            is_img_row = m_ok & ((offs_m < TEXT_START) | (offs_m >= TEXT_START + TEXT_LEN))
            img_row = tl.where(offs_m < TEXT_START, offs_m, offs_m - TEXT_LEN)
            out_base = SLICE + bh * N_IMG * NUM_COLS
            for c0 in range(0, NUM_COLS, BLOCK_K):
                offs_c = c0 + tl.arange(0, BLOCK_K)
                c_ok = offs_c < NUM_COLS
                key_pos = TEXT_START + tl.load(COLS + offs_c, mask=c_ok, other=0)
                kc = tl.load(
                    k_base + key_pos[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                    mask=c_ok[None, :] & d_ok[:, None],
                    other=0.0,
                )
                if UPCAST:
                    kc = kc.to(tl.float32)
                s = tl.dot(q, kc, input_precision=PREC) * qk_scale
                p = tl.exp2(s - row_lse2[:, None])
                tl.store(
                    out_base + img_row[:, None] * NUM_COLS + offs_c[None, :],
                    p,
                    mask=is_img_row[:, None] & c_ok[None, :],
                )

    @triton.jit
    def _text_to_image_kernel(
        Q, K, ROW_LSE, SLICE, COLS,
        stride_qb, stride_qh, stride_qn, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        H, N, D, N_IMG, NUM_COLS, TEXT_START, TEXT_LEN,
        sm_scale,
        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
        UPCAST: tl.constexpr, PREC: tl.constexpr,
    ):  # fmt: skip
        """One block of joint key positions of one (batch, head): P(text query c, image key i).

        ROW_LSE: ``[B, H, N]`` fp32 natural-log lse of every query row over the chosen domain
        (only the wanted text rows are read). SLICE: ``[B, H, N_IMG, NUM_COLS]`` fp32.
        """
        pid_n = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = (pid_bh // H).to(tl.int64)
        h = (pid_bh % H).to(tl.int64)
        bh = pid_bh.to(tl.int64)
        q_base = Q + b * stride_qb + h * stride_qh
        k_base = K + b * stride_kb + h * stride_kh

        # Blocks run over joint positions, so a block may straddle the text range; text keys are
        # simply not stored.
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        is_img = (offs_n < N) & ((offs_n < TEXT_START) | (offs_n >= TEXT_START + TEXT_LEN))
        img = tl.where(offs_n < TEXT_START, offs_n, offs_n - TEXT_LEN)

        k = tl.load(
            k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
            mask=is_img[:, None] & d_ok[None, :],
            other=0.0,
        )
        if UPCAST:
            k = k.to(tl.float32)
        out_base = SLICE + bh * N_IMG * NUM_COLS
        for c0 in range(0, NUM_COLS, BLOCK_K):
            offs_c = c0 + tl.arange(0, BLOCK_K)
            c_ok = offs_c < NUM_COLS
            q_pos = TEXT_START + tl.load(COLS + offs_c, mask=c_ok, other=0)
            qt = tl.load(
                q_base + q_pos[None, :] * stride_qn + offs_d[:, None] * stride_qd,
                mask=c_ok[None, :] & d_ok[:, None],
                other=0.0,
            )
            if UPCAST:
                qt = qt.to(tl.float32)
            s = tl.dot(k, qt, input_precision=PREC) * sm_scale
            row_lse = tl.load(ROW_LSE + bh * N + q_pos, mask=c_ok, other=0.0)
            p = tl.exp(s - row_lse[None, :])
            tl.store(
                out_base + img[:, None] * NUM_COLS + offs_c[None, :],
                p,
                mask=is_img[:, None] & c_ok[None, :],
            )


def triton_attention_slice(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    spec: SliceSpec,
    *,
    need_output: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Joint attention and the slice of ``spec``, without materialising the ``N x N`` matrix.

    q, k, v: ``[B, H, N, D]`` of one dtype (float32, float16 or bfloat16), any strides. The text
    tokens may sit at the start, the end or the middle of the joint sequence.

    Returns ``(O, lse, slice)``:

    * ``O``: ``[B, H, N, D]`` in ``q.dtype``, or ``None`` when ``need_output=False`` (the
      ``P @ V`` product and the V loads are then skipped altogether).
    * ``lse``: ``[B, H, N]`` float32, natural-log log-sum-exp of the scaled scores over all keys.
    * ``slice``: ``[B, H or 1, N_img, K]`` float32, exactly what ``naive_slice`` returns.
    """
    if not _HAS_TRITON:
        raise RuntimeError("triton_attention_slice needs the `triton` package")
    spec.check(q, k)
    if v.shape != q.shape:
        raise ValueError(f"v must have the shape of q {tuple(q.shape)}, got {tuple(v.shape)}")
    if q.dtype not in _SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(
            f"q, k, v must share one dtype among {_SUPPORTED_DTYPES}, got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    if not (q.is_cuda or _interpreting()):
        raise RuntimeError("triton_attention_slice needs CUDA tensors (or TRITON_INTERPRET=1 for CPU)")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")

    batch, heads, n, d = q.shape
    n_img = n - spec.text_len
    num_cols = spec.num_columns
    device = q.device
    cfg = _pick_blocks(d)
    block_d = max(16, triton.next_power_of_2(d))
    upcast = _interpreting() or q.dtype == torch.float32
    # Only fp32 x fp32 dots read this: IEEE keeps them at fp32 accuracy, which TF32 would not.
    # Native fp16/bf16 dots get the default so the tensor-core path is never in question.
    prec = "ieee" if upcast else "tf32"

    cols = spec.column_index(device).to(torch.int32).contiguous()
    lse = torch.empty((batch, heads, n), device=device, dtype=torch.float32)
    out = torch.empty_like(q) if need_output else None
    image_to_text = spec.direction == IMAGE_TO_TEXT
    if spec.softmax == CROSS:
        dom = 1 if image_to_text else 2
        lse_dom = torch.empty_like(lse)
    else:
        dom = 0
        lse_dom = lse  # never written when dom == 0
    per_head = torch.empty((batch, heads, n_img, num_cols), device=device, dtype=torch.float32)
    o_arg = out if out is not None else q  # a placeholder pointer; never written
    sm_scale = 1.0 / math.sqrt(d)

    grid = (triton.cdiv(n, cfg["BLOCK_M"]), batch * heads)
    _attn_slice_fwd_kernel[grid](
        q, k, v, o_arg, lse, lse_dom, per_head, cols,
        *q.stride(), *k.stride(), *v.stride(), *o_arg.stride(),
        heads, n, d, n_img, num_cols, spec.text_start, spec.text_len,
        sm_scale,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=block_d, BLOCK_K=cfg["BLOCK_K"],
        DOM=dom, WANT_O=need_output, WANT_I2T=image_to_text, UPCAST=upcast, PREC=prec,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )  # fmt: skip
    if not image_to_text:
        grid_t = (triton.cdiv(n, cfg["BLOCK_N"]), batch * heads)
        _text_to_image_kernel[grid_t](
            q, k, lse_dom, per_head, cols,
            *q.stride(), *k.stride(),
            heads, n, d, n_img, num_cols, spec.text_start, spec.text_len,
            sm_scale,
            BLOCK_N=cfg["BLOCK_N"], BLOCK_D=block_d, BLOCK_K=cfg["BLOCK_K"],
            UPCAST=upcast, PREC=prec,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )  # fmt: skip

    sliced = per_head.mean(dim=1, keepdim=True) if spec.heads == "mean" else per_head
    return out, lse, sliced

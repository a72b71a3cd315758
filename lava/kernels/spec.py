"""What slice of a joint attention to compute: one frozen value shared by every implementation."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..options import DIRECTIONS, HEAD_REDUCTIONS, IMAGE_TO_TEXT, JOINT, SOFTMAX_DOMAINS

__all__ = ["DIRECTIONS", "HEAD_REDUCTIONS", "SOFTMAX_DOMAINS", "SliceSpec"]


@dataclass(frozen=True)
class SliceSpec:
    """Which probabilities to read out of one joint-attention call.

    ``text_start``/``text_len`` locate the text tokens in the joint sequence (diffusers' SD3
    puts image tokens first, so ``text_start = N_img``; Flux puts text first, ``text_start = 0``).
    ``columns`` are text positions relative to ``text_start``; ``None`` means all of them.
    """

    text_start: int
    text_len: int
    columns: tuple[int, ...] | None = None
    direction: str = IMAGE_TO_TEXT
    softmax: str = JOINT
    heads: str = "mean"

    def __post_init__(self) -> None:
        if self.direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, got {self.direction!r}")
        if self.softmax not in SOFTMAX_DOMAINS:
            raise ValueError(f"softmax must be one of {SOFTMAX_DOMAINS}, got {self.softmax!r}")
        if self.heads not in HEAD_REDUCTIONS:
            raise ValueError(f"heads must be one of {HEAD_REDUCTIONS}, got {self.heads!r}")
        if self.text_len <= 0 or self.text_start < 0:
            raise ValueError(
                f"text range must be non-empty and start at >= 0, got start={self.text_start}, "
                f"len={self.text_len}"
            )
        if self.columns is not None:
            if len(self.columns) == 0:
                raise ValueError("columns must name at least one text position, got an empty list")
            bad = [c for c in self.columns if not 0 <= c < self.text_len]
            if bad:
                raise ValueError(f"columns {bad} fall outside the text range 0..{self.text_len - 1}")

    @classmethod
    def make(
        cls,
        *,
        text_start: int,
        text_len: int,
        columns: Sequence[int] | torch.Tensor | None = None,
        direction: str = IMAGE_TO_TEXT,
        softmax: str = JOINT,
        heads: str = "mean",
    ) -> SliceSpec:
        cols = None if columns is None else tuple(int(c) for c in torch.as_tensor(columns).flatten().tolist())
        return cls(int(text_start), int(text_len), cols, direction, softmax, heads)

    @property
    def num_columns(self) -> int:
        return self.text_len if self.columns is None else len(self.columns)

    def check(self, q: torch.Tensor, k: torch.Tensor) -> None:
        """Raise a clear error if ``q``/``k`` do not fit this spec."""
        if q.dim() != 4 or k.dim() != 4:
            raise ValueError(f"q and k must be [B, H, N, D], got {tuple(q.shape)} and {tuple(k.shape)}")
        if q.shape != k.shape:
            raise ValueError(f"q and k must have the same shape, got {tuple(q.shape)} and {tuple(k.shape)}")
        n = q.shape[-2]
        if self.text_start + self.text_len > n:
            raise ValueError(
                f"text range [{self.text_start}, {self.text_start + self.text_len}) does not fit in a joint "
                f"sequence of N={n} tokens"
            )
        if self.text_len == n:
            raise ValueError(f"the joint sequence (N={n}) holds no image tokens besides the text")

    def image_index(self, n: int, device: torch.device | str | None = None) -> torch.Tensor:
        """Joint positions of the image tokens, in order: ``[N_img]`` long."""
        pos = torch.arange(n, device=device)
        keep = (pos < self.text_start) | (pos >= self.text_start + self.text_len)
        return pos[keep]

    def image_rows(self, x: torch.Tensor) -> torch.Tensor:
        """The image-token rows of ``x [B, H, N, D]``: a view when the text sits at either end
        (SD3, Flux), so no copy of the image part is made; a gather otherwise."""
        n = x.shape[-2]
        if self.text_start + self.text_len == n:
            return x[:, :, : self.text_start]
        if self.text_start == 0:
            return x[:, :, self.text_len :]
        return x[:, :, self.image_index(n, x.device)]

    def text_index(self, device: torch.device | str | None = None) -> torch.Tensor:
        """Joint positions of all text tokens: ``[text_len]`` long."""
        return torch.arange(self.text_start, self.text_start + self.text_len, device=device)

    def column_index(self, device: torch.device | str | None = None) -> torch.Tensor:
        """Wanted text positions relative to ``text_start``: ``[K]`` long."""
        if self.columns is None:
            return torch.arange(self.text_len, device=device)
        return torch.tensor(self.columns, dtype=torch.long, device=device)

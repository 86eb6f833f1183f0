"""Sinusoidal encoding of a patch's global grid position (y, x) and level.

As in the reference code: K = channels // 6 frequencies f_k = 100^(-k / (K - 1)); the encoding is
[sin(f y), cos(f y), sin(f x), cos(f x), sin(f l), cos(f l)] blocks of K each; leftover channels
are zero. y, x are global grid indices (level-1 cells 0..N-1, level-2 cells N * parent + child).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def sinusoidal_encoding(pos: Tensor, channels: int) -> Tensor:
    """``pos`` (..., 3) holding (y, x, level) -> (..., channels)."""
    k = channels // 6
    if k < 1:
        raise ValueError(f"channels={channels}: need at least 6")
    steps = torch.arange(k, dtype=torch.float32, device=pos.device)
    freqs = 100.0 ** (-steps / max(k - 1, 1))  # (K,)
    angles = pos.float()[..., :, None] * freqs  # (..., 3, K)
    blocks = torch.stack([angles.sin(), angles.cos()], dim=-2)  # (..., 3, 2, K)
    enc = blocks.flatten(-3)  # (..., 6K) as [sin y, cos y, sin x, cos x, sin l, cos l]
    pad = channels - enc.shape[-1]
    return nn.functional.pad(enc, (0, pad)) if pad else enc


class PositionalFusion(nn.Module):
    """Combine a feature vector with its position: "add" (fMoW) or "concat" (ImageNet)."""

    def __init__(self, feature_dim: int, channels: int, mode: str) -> None:
        super().__init__()
        self.channels, self.mode = channels, mode
        if mode == "add":
            self.proj = nn.Linear(channels, feature_dim)
        else:
            self.proj = nn.Linear(feature_dim + channels, feature_dim)

    def forward(self, features: Tensor, pos: Tensor) -> Tensor:
        enc = sinusoidal_encoding(pos, self.channels).to(features.dtype)  # (N, P)
        if self.mode == "add":
            return nn.functional.silu(features + self.proj(enc))
        return self.proj(torch.cat([features, enc], dim=-1))

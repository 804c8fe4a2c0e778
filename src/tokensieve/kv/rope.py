"""RoPE rotations on captured q/k in HF's ``rotate_half`` layout (planes (j, j + d/2))."""

from __future__ import annotations

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Apply R(pos): x [..., n, d], cos/sin [n, d]."""
    return x * cos + rotate_half(x) * sin


def unrotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Apply R(-pos), the inverse of :func:`rotate` (exact when the rotary attention scaling is 1)."""
    return x * cos - rotate_half(x) * sin

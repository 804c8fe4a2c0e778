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


def rerotate(model, x: torch.Tensor, old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """x [..., n, d] rotated at positions ``old`` [n] -> rotated at ``new`` [n] instead, with the model's own
    rotary module (R(new) R(-old) x, in fp32, returned in x's dtype)."""
    from .families import rope_cos_sin

    xf = x.float()
    cos, sin = rope_cos_sin(model, old, xf)
    pre = unrotate(xf, cos, sin)
    cos, sin = rope_cos_sin(model, new, xf)
    return rotate(pre, cos, sin).to(x.dtype)

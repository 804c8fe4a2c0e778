"""RoPE rotations on captured q/k in HF's ``rotate_half`` layout (planes (j, j + d/2))."""

from __future__ import annotations

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Apply R(pos): x [..., n, d], cos/sin [n, d]. Same values as ``x * cos + rotate_half(x) * sin`` (negation
    and a + (-b) = a - b are exact), without the concatenated copy."""
    return _rot(x, cos, sin, 1.0)


def unrotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Apply R(-pos), the inverse of :func:`rotate` (exact when the rotary attention scaling is 1)."""
    return _rot(x, cos, sin, -1.0)


def _rot(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: float) -> torch.Tensor:
    half = x.shape[-1] // 2
    out = x * cos
    lo, hi = x[..., :half], x[..., half:]
    if sign > 0:
        out[..., :half] -= hi * sin[..., :half]
        out[..., half:] += lo * sin[..., half:]
    else:
        out[..., :half] += hi * sin[..., :half]
        out[..., half:] -= lo * sin[..., half:]
    return out


def rerotate(model, x: torch.Tensor, old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """x [..., n, d] rotated at positions ``old`` [n] -> rotated at ``new`` [n] instead, with the model's own
    rotary module, in fp32, returned in x's dtype. When the angles are linear in the position (no attention
    scaling, not dynamic / longrope) this is one rotation by R(new - old); otherwise R(new) R(-old)."""
    from .families import rope_cos_sin, rotary_module

    rope, xf = rotary_module(model), x.float()
    linear = getattr(rope, "attention_scaling", 1.0) == 1.0 and getattr(rope, "rope_type", "default") not in (
        "dynamic", "longrope")
    if linear:
        cos, sin = rope_cos_sin(model, new - old, xf)
        return rotate(xf, cos, sin).to(x.dtype)
    cos, sin = rope_cos_sin(model, old, xf)
    pre = unrotate(xf, cos, sin)
    cos, sin = rope_cos_sin(model, new, xf)
    return rotate(pre, cos, sin).to(x.dtype)

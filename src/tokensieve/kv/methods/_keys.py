"""Per-request caches shared by KV methods: derived key tensors kept incrementally (a growable buffer per slot),
e.g. TokenSelect's pre-RoPE keys or FASA's dominant-dimension keys (the official FASA cache stores them apart)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..families import rope_cos_sin
from ..rope import unrotate
from .base import Call


def grown(call: Call, name: str, rows: Callable[[int, int], torch.Tensor]) -> torch.Tensor:
    """[X, n, D] buffer for ``call.slot``; ``rows(m, n)`` computes entries m..n-1 ([X, n - m, D]) not yet kept."""
    key = (name, call.slot)
    buf, m = call.state.get(key, (None, 0))
    n = call.n
    if buf is None or m > n or buf.shape[1] < n:
        first = rows(0, 0) if buf is None else buf
        cap = max(n, 2 * (buf.shape[1] if buf is not None else 0), 64)
        new = first.new_empty(first.shape[0], cap, first.shape[-1])
        if buf is not None and m <= n:
            new[:, :m] = buf[:, :m]
        else:
            m = 0
        buf = new
    if m < n:
        buf[:, m:n] = rows(m, n)
    call.state[key] = (buf, n)
    return buf[:, :n]


def prerope_keys(call: Call, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[H_kv, n, d] keys with RoPE removed (R(-pos)) in ``dtype``, computed once per new cache entry."""

    def rows(m: int, n: int) -> torch.Tensor:
        cos, sin = rope_cos_sin(call.model, call.k_rope[m:n], call.k.float())
        return unrotate(call.k[0, :, m:n].float(), cos, sin).to(dtype)

    return grown(call, f"prerope_k_{dtype}", rows)

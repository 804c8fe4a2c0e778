"""Per-request caches shared by KV methods: pre-RoPE keys kept incrementally (a growable buffer per slot)."""

from __future__ import annotations

import torch

from ..families import rope_cos_sin
from ..rope import unrotate
from .base import Call


def prerope_keys(call: Call) -> torch.Tensor:
    """[H_kv, n, d] keys with RoPE removed (R(-pos)), computed once per new cache entry and kept per slot."""
    key = ("prerope_k", call.slot)
    buf, m = call.state.get(key, (None, 0))
    n = call.n
    if buf is None or m > n or buf.shape[1] < n:
        cap = max(n, 2 * (buf.shape[1] if buf is not None else 0), 64)
        new = call.k.new_empty(call.k.shape[1], cap, call.k.shape[-1], dtype=torch.float32)
        if buf is not None and m <= n:
            new[:, :m] = buf[:, :m]
        else:
            m = 0
        buf = new
    if m < n:
        cos, sin = rope_cos_sin(call.model, call.k_rope[m:n], call.k.float())
        buf[:, m:n] = unrotate(call.k[0, :, m:n].float(), cos, sin)
    call.state[key] = (buf, n)
    return buf[:, :n]

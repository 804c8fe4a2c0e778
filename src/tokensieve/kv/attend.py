"""Attention over selected keys: gather then SDPA, with exact causal masking by cache position.

GQA without copies: when every query head of a KV group attends the same keys (a shared selection, G = 1, or
every causal key), the g query heads of KV head j (HF's h // g layout: heads j * g .. j * g + g - 1) are packed
as g * q query rows of one SDPA head, so K/V are never repeated (``repeat_interleave`` of the gathered keys
cost more than the attention itself). Per-head selections (G = H) gather [H, k, d] rows directly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .methods.base import Call, Piece


def _heads_for(idx: torch.Tensor, n_heads: int, n_kv: int) -> torch.Tensor:
    """KV head of each row of idx in HF's layout (query head h reads KV head h // g)."""
    if idx.shape[0] == 1:
        return torch.arange(n_kv, device=idx.device)
    return torch.arange(n_heads, device=idx.device) // (n_heads // n_kv)


def gather_kv(t: torch.Tensor, idx: torch.Tensor, n_heads: int) -> torch.Tensor:
    """t [1, H_kv, n, d], idx [G, k] -> [1, G', k, d]: G = 1 gives the shared keys per KV head ([1, H_kv, k, d],
    not repeated); G = H gives each query head's own keys ([1, H, k, d]). One row lookup (``F.embedding``, about
    2x faster than ``index_select`` on unsorted rows) on the [H_kv * n, d] view of the cache."""
    safe = idx.clamp(min=0)
    n_kv, n, d = t.shape[1:]
    if not t.is_contiguous():
        if idx.shape[0] == 1:
            return t.index_select(2, safe[0])
        return t[0][_heads_for(idx, n_heads, n_kv)[:, None], safe].unsqueeze(0)
    heads = _heads_for(idx, n_heads, n_kv)
    rows = safe.expand(heads.shape[0], -1) + (heads * n)[:, None]  # [G', k] rows of the flat view
    return F.embedding(rows, t.view(n_kv * n, d)).unsqueeze(0)


def grouped_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                 scaling: float) -> torch.Tensor:
    """SDPA of q [1, H, q, d] on k, v [1, H_kv, n, d] shared by each group of g = H / H_kv heads, without
    repeating K/V. ``mask``: None, or bool [q, n] (all heads) or [H, q, n] (per head). -> [1, H, q, d]."""
    _, n_heads, n_q, d = q.shape
    n_kv = k.shape[1]
    g = n_heads // n_kv
    if g == 1:
        m = None if mask is None else (mask[None, None] if mask.dim() == 2 else mask[None])
        return F.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=scaling)
    qg = q.reshape(1, n_kv, g * n_q, d)
    if mask is not None:
        per_head = mask.expand(n_heads, -1, -1) if mask.dim() == 2 else mask
        mask = per_head.reshape(1, n_kv, g * n_q, mask.shape[-1])
    out = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask, scale=scaling)
    return out.view(1, n_heads, n_q, -1)


def attend_compact(call: Call, idx: torch.Tensor) -> torch.Tensor:
    """TSA: gather Q, K, V rows at ascending idx [H, L'], causal SDPA on the compact tensors, scatter into zeros."""
    n_heads, d = call.q.shape[1], call.q.shape[-1]
    rows = idx[:, :, None].expand(-1, -1, d)
    q = torch.gather(call.q[0], 1, rows)
    k, v = gather_kv(call.k, idx, n_heads)[0], gather_kv(call.v, idx, n_heads)[0]
    o = F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True, scale=call.scaling)[0]
    return torch.zeros_like(call.q[0]).scatter_(1, rows, o.to(call.q.dtype))[None]


def _attend_all(call: Call, piece: Piece, q: torch.Tensor, q_pos: torch.Tensor) -> torch.Tensor:
    """Every causal key (optionally restricted by piece.mask [G, q, n])."""
    mask = None
    if piece.mask is not None or int(q_pos.min()) < call.n - 1:
        keys = torch.arange(call.n, device=q.device)
        mask = keys[None, :] <= q_pos[:, None]  # [q, n]
        if piece.mask is not None:
            m = piece.mask if piece.mask.shape[0] > 1 else piece.mask[0]
            mask = mask & m
    return grouped_sdpa(q, call.k, call.v, mask, call.scaling)


def attend_piece(call: Call, piece: Piece) -> torch.Tensor:
    """Output [1, H, q1 - q0, d] for the piece's queries."""
    if piece.compact:
        return attend_compact(call, piece.idx)
    q = call.q[:, :, piece.q0 : piece.q1] if piece.q is None else piece.q
    q_pos = call.q_pos[piece.q0 : piece.q1]
    if piece.idx is None:
        return _attend_all(call, piece, q, q_pos)
    idx, n_heads = piece.idx, q.shape[1]
    k = gather_kv(call.k, idx, n_heads) if piece.k is None else piece.k
    v = gather_kv(call.v, idx, n_heads)
    mask = (idx[:, None, :] <= q_pos[None, :, None]) & (idx[:, None, :] >= 0)  # [G, q, k]
    if piece.valid is not None:
        mask = mask & piece.valid[:, None, :]
    mask = None if bool(mask.all()) else mask
    if idx.shape[0] == 1:
        return grouped_sdpa(q, k, v, None if mask is None else mask[0], call.scaling)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else mask[None],
                                          scale=call.scaling)


def attend(call: Call, pieces: list[Piece]) -> torch.Tensor:
    """Concatenate every piece's output along the query axis: [1, H, q, d]."""
    outs = [attend_piece(call, p) for p in pieces]
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)

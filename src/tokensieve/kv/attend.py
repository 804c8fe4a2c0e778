"""Attention over selected keys: gather then SDPA, with exact causal masking by cache position."""

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
    """t [1, H_kv, n, d], idx [G, k] -> [1, H, k, d] (G = 1: the same keys for every head)."""
    n_kv = t.shape[1]
    safe = idx.clamp(min=0)
    heads = _heads_for(idx, n_heads, n_kv)
    if idx.shape[0] == 1:
        out = t[0][:, safe[0]]  # [H_kv, k, d]
        out = out.repeat_interleave(n_heads // n_kv, dim=0)
    else:
        out = t[0][heads[:, None], safe]  # [H, k, d]
    return out.unsqueeze(0)


def attend_compact(call: Call, idx: torch.Tensor) -> torch.Tensor:
    """TSA: gather Q, K, V rows at ascending idx [H, L'], causal SDPA on the compact tensors, scatter into zeros."""
    n_heads, d = call.q.shape[1], call.q.shape[-1]
    rows = idx[:, :, None].expand(-1, -1, d)
    q = torch.gather(call.q[0], 1, rows)
    k, v = gather_kv(call.k, idx, n_heads)[0], gather_kv(call.v, idx, n_heads)[0]
    o = F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True, scale=call.scaling)[0]
    return torch.zeros_like(call.q[0]).scatter_(1, rows, o.to(call.q.dtype))[None]


def attend_piece(call: Call, piece: Piece) -> torch.Tensor:
    """Output [1, H, q1 - q0, d] for the piece's queries."""
    if piece.compact:
        return attend_compact(call, piece.idx)
    q = call.q[:, :, piece.q0 : piece.q1]
    q_pos = call.q_pos[piece.q0 : piece.q1]
    n_heads = q.shape[1]
    if piece.idx is None:
        keys = torch.arange(call.n, device=q.device)
        mask = keys[None, :] <= q_pos[:, None]  # [q, n]
        if piece.mask is not None:
            mask = mask[None] & piece.mask
        k = call.k.repeat_interleave(n_heads // call.k.shape[1], dim=1)
        v = call.v.repeat_interleave(n_heads // call.v.shape[1], dim=1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=_bcast(mask, n_heads), scale=call.scaling)
    idx = piece.idx
    k = gather_kv(call.k, idx, n_heads)
    v = gather_kv(call.v, idx, n_heads)
    mask = (idx[:, None, :] <= q_pos[None, :, None]) & (idx[:, None, :] >= 0)  # [G, q, k]
    if piece.valid is not None:
        mask = mask & piece.valid[:, None, :]
    if bool(mask.all()):
        return F.scaled_dot_product_attention(q, k, v, scale=call.scaling)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=_bcast(mask, n_heads), scale=call.scaling)


def _bcast(mask: torch.Tensor, n_heads: int) -> torch.Tensor:
    """[q, n] or [G, q, n] boolean mask -> broadcastable to [1, H, q, n]."""
    if mask.dim() == 2:
        return mask[None, None]
    if mask.shape[0] == 1:
        return mask[None]
    if mask.shape[0] != n_heads:
        mask = mask.repeat_interleave(n_heads // mask.shape[0], dim=0)
    return mask[None]


def attend(call: Call, pieces: list[Piece]) -> torch.Tensor:
    """Concatenate every piece's output along the query axis: [1, H, q, d]."""
    outs = [attend_piece(call, p) for p in pieces]
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)

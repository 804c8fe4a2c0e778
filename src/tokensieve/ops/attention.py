"""Partial attention recomputed from captured queries and keys.

Methods that score tokens by attention (FastV, PDrop, SparseVLM, TransPrune, FlowCut, CATP) only need a few
query rows. Recomputing ``softmax(q K^T / sqrt(d))`` for those rows from the layer's queries and keys (after
RoPE) costs ``O(n_q L d)`` per head and keeps FlashAttention/SDPA for the real forward pass.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["attention_rows", "head_mean"]


def attention_rows(
    q: Tensor,
    k: Tensor,
    key_mask: Tensor | None = None,
    query_positions: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """Softmax attention probabilities of some query rows over all keys.

    Parameters
    ----------
    q : Tensor, shape [B, H_q, n_q, d]
        Queries after RoPE.
    k : Tensor, shape [B, H_kv, L, d]
        Keys after RoPE. With grouped-query attention (``H_kv < H_q``) query head ``h`` reads kv head
        ``h // (H_q // H_kv)``, as HF's ``repeat_kv`` does; the kv heads are broadcast, not copied.
    key_mask : BoolTensor, shape [B, L], optional
        False marks keys that are excluded (padding, dropped tokens).
    query_positions : LongTensor, shape [B, n_q] or [n_q], optional
        Causal restriction: query ``i`` sees only keys whose index along ``L`` is ``<= query_positions[i]``
        (for the last prompt token of an unpadded prompt, ``L - 1``). None means no causal restriction.
    scale : float, optional
        Logit scale; defaults to ``1 / sqrt(d)``.

    Returns
    -------
    Tensor, shape [B, H_q, n_q, L]
        Attention probabilities in float32 (float64 for float64 input). A row whose keys are all excluded
        is all zeros rather than NaN.
    """
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q and k must be 4-D, got {tuple(q.shape)} and {tuple(k.shape)}")
    b, h_q, n_q, d = q.shape
    bk, h_kv, length, dk = k.shape
    if bk != b or dk != d:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree on batch or head dim")
    if h_q % h_kv != 0:
        raise ValueError(f"H_q={h_q} is not a multiple of H_kv={h_kv}")
    n_rep = h_q // h_kv
    dtype = torch.promote_types(q.dtype, torch.float32)
    scale = 1.0 / math.sqrt(d) if scale is None else scale

    # Group query heads by their kv head: [B, H_kv, n_rep * n_q, d] @ [B, H_kv, d, L].
    qg = q.to(dtype).reshape(b, h_kv, n_rep * n_q, d)
    logits = torch.matmul(qg, k.to(dtype).transpose(-1, -2)).mul_(scale)
    logits = logits.reshape(b, h_q, n_q, length)

    allowed: Tensor | None = None
    if key_mask is not None:
        if key_mask.shape != (b, length):
            raise ValueError(f"key_mask must be [{b}, {length}], got {tuple(key_mask.shape)}")
        allowed = key_mask.to(device=q.device, dtype=torch.bool)[:, None, None, :]
    if query_positions is not None:
        qpos = query_positions.to(q.device)
        if qpos.dim() == 1:
            qpos = qpos.expand(b, n_q)
        if qpos.shape != (b, n_q):
            raise ValueError(f"query_positions must be [{b}, {n_q}] or [{n_q}], got {tuple(qpos.shape)}")
        causal = torch.arange(length, device=q.device)[None, None, :] <= qpos[:, :, None]
        causal = causal[:, None, :, :]
        allowed = causal if allowed is None else allowed & causal

    if allowed is None:
        return torch.softmax(logits, dim=-1)
    logits = logits.masked_fill(~allowed, -math.inf)
    # A fully masked row softmaxes to NaN; zero it instead.
    return torch.softmax(logits, dim=-1).masked_fill(~allowed, 0.0)


def head_mean(probs: Tensor) -> Tensor:
    """Average attention over heads.

    Parameters
    ----------
    probs : Tensor, shape [B, H, n_q, L]

    Returns
    -------
    Tensor, shape [B, n_q, L]
    """
    if probs.dim() != 4:
        raise ValueError(f"probs must be [B, H, n_q, L], got shape {tuple(probs.shape)}")
    return probs.mean(dim=1)

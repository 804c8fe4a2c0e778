"""Exact top-k oracle: each query head attends its own ``keep`` highest-scoring causal keys.

Scores are the true attention logits q_h . k_{h // g} * scaling (HF's GQA layout), so this is the upper bound
of any selection at the same budget. Decode: idx [H, k]. Prefill/extend: a per-query boolean mask [H, q, n].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import Call, KVMethod, Piece


def head_logits(call: Call) -> torch.Tensor:
    """[H, q, n] attention logits with HF's h // g mapping (fp32)."""
    n_heads, n_kv = call.q.shape[1], call.k.shape[1]
    g, q_len = n_heads // n_kv, call.q.shape[2]
    q = call.q[0].float().reshape(n_kv, g * q_len, -1)  # heads j*g..j*g+g-1 read KV head j
    logits = torch.matmul(q, call.k[0].float().transpose(-1, -2)) * call.scaling  # [H_kv, g*q, n]
    return logits.view(n_heads, q_len, -1)


@dataclass
class OracleTopK(KVMethod):
    """Per query and per head, the top-``keep`` keys by exact attention logit (ties: torch.topk order)."""

    name: ClassVar[str] = "oracle"
    fidelity: ClassVar[str] = "reference upper bound (not a published method)"

    def plan(self, call: Call) -> list[Piece]:
        logits = head_logits(call)
        keys = torch.arange(call.n, device=logits.device)
        causal = keys[None, :] <= call.q_pos[:, None]  # [q, n]
        logits = logits.masked_fill(~causal[None], float("-inf"))
        k = min(call.keep, call.n)
        top = logits.topk(k, dim=-1).indices  # [H, q, k]
        if call.q.shape[2] == 1:
            return [Piece(0, 1, idx=top[:, 0])]
        mask = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, top, True) & causal[None]
        return [Piece(0, call.q.shape[2], mask=mask)]

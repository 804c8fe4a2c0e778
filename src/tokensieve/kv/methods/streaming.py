"""StreamingLLM-style window (Xiao et al., arXiv 2309.17453): ``n_sink`` first tokens + the most recent ones.

Selection form (the cache stays whole): each query attends its first ``n_sink`` tokens and its last
``keep - n_sink`` causal tokens. The native baseline that shows selection matters; kvpress's
``StreamingLLMPress`` (eviction) runs through kvpress itself in kv-bench.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import Call, KVMethod, KVMethodError, Piece


@dataclass
class StreamingWindow(KVMethod):
    """n_sink: always-attended first tokens (StreamingLLMPress default 4)."""

    name: ClassVar[str] = "streaming"
    fidelity: ClassVar[str] = "selection form of StreamingLLM (sink + recent window per query)"
    n_sink: int = 4

    def validate(self, info, keep) -> None:
        if isinstance(keep, int) and keep <= self.n_sink:
            raise KVMethodError(f"streaming: keep={keep} must exceed n_sink={self.n_sink}")

    def plan(self, call: Call) -> list[Piece]:
        keys = torch.arange(call.n, device=call.q.device)
        qp = call.q_pos[:, None]
        recent = call.keep - self.n_sink
        mask = (keys[None] <= qp) & ((keys[None] < self.n_sink) | (keys[None] > qp - recent))
        if call.q.shape[2] == 1:
            return [Piece(0, 1, idx=keys[mask[0]].view(1, -1))]
        return [Piece(0, call.q.shape[2], mask=mask[None])]

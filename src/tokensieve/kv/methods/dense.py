"""Dense attention: every query attends every causal key (the reference of every KV method)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .base import Call, KVMethod, Piece


@dataclass
class Dense(KVMethod):
    """The unmodified model's attention, routed through the sieve (``keep`` is ignored)."""

    name: ClassVar[str] = "dense"
    fidelity: ClassVar[str] = "exact: calls the model's own sdpa/eager attention"

    def is_dense(self, n: int, keep: int, phase: str, layer: int) -> bool:
        return True

    def plan(self, call: Call) -> list[Piece]:
        return [Piece(0, call.q.shape[2])]

"""What a KV method sees and returns.

The framework calls a method once per (layer, forward pass, sample) with that sample's tensors restricted to its
valid (non-padding) cache entries, so positions below are *compacted* coordinates 0..n-1 of the valid keys; it
maps them back to cache positions for the Trace. A decision therefore never depends on batch position, batch
size or padding.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ..families import ModelInfo


class KVMethodError(ValueError):
    """Bad hyperparameters or an unsuitable model for a KV method."""


@dataclass
class Call:
    """One sample at one layer.

    q: [1, H, q, d] queries after RoPE (valid rows only); k, v: [1, H_kv, n, d] valid cache entries after RoPE;
    q_pos: [q] compacted key coordinate of each query (query i sees keys 0..q_pos[i]); k_rope: [n] RoPE
    position ids of the keys; q_rope: [q] RoPE position ids of the queries; phase: "prefill" (no past),
    "extend" (q > 1 with a past) or "decode" (q == 1); n_context: the sample's prompt length; slot: a key for
    per-request state (layer, batch row).
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    q_pos: torch.Tensor
    k_rope: torch.Tensor
    q_rope: torch.Tensor
    phase: str
    layer: int
    keep: int
    n_context: int
    scaling: float
    model: nn.Module
    info: ModelInfo
    state: dict[Any, Any]
    slot: tuple[int, int]
    stats: dict[str, float] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return self.k.shape[2]


@dataclass
class Piece:
    """Queries q0..q1-1 attend either ``idx`` [G, k] (G = 1 shared, or H per query head; -1 = empty slot),
    or a boolean ``mask`` [G, q1 - q0, n], or (both None) all causal keys. ``valid`` [G, k] masks slots of idx.
    ``compact``: idx [H, L'] picks the queries as well (prefill, q == keys); other query rows get zeros.
    ``q`` [1, H, q1 - q0, d] / ``k`` [1, H_kv, k, d] (G = 1 only): replacement queries / gathered keys, e.g.
    re-rotated at compacted positions (TokenSelect ``positions="compact"``); None = call.q rows / gather."""

    q0: int
    q1: int
    idx: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    valid: torch.Tensor | None = None
    compact: bool = False  # idx [H, L'] selects queries too (TSA): attention on the compact S_h x S_h, scattered
    q: torch.Tensor | None = None
    k: torch.Tensor | None = None


@dataclass
class KVMethod:
    """Base of every KV selection method: a dataclass of typed hyperparameters."""

    name: ClassVar[str] = ""
    fidelity: ClassVar[str] = ""
    families: ClassVar[tuple[str, ...]] = ("llama", "qwen2", "qwen3")
    extra: dict = field(default_factory=dict, repr=False)

    def validate(self, info: ModelInfo, keep: int | float) -> None:
        """Raise a KVMethodError before any forward pass if the model or budget cannot work."""

    def prepare(self, model: nn.Module, info: ModelInfo, keep: int | float) -> None:
        """Called on entering the sieve, before hooks are installed (e.g. FASA's calibration)."""

    def is_dense(self, n: int, keep: int, phase: str, layer: int) -> bool:
        """True when this call would attend every causal key (then the original attention runs, bit-exact)."""
        return keep >= n

    def plan(self, call: Call) -> list[Piece]:
        raise NotImplementedError

"""DivPrune: diversity-based visual token pruning as a max-min diversity problem."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..budget import resolve_keep
from ..context import ImageContext
from ..ops import greedy_max_min
from .base import Method, MethodError, register


@register
@dataclass
class DivPrune(Method):
    """DivPrune (Alvar et al., CVPR 2025, arXiv 2503.02175): greedy max-min diversity on projected tokens.

    Stage ``projector``; signals: projected features ``Z`` [n, D]. With ``D = 1 - cos(Z_a, Z_b)`` the first pick
    is the token whose nearest neighbour is farthest (the argmax of the second-smallest entry of each column,
    the smallest being the self-distance), then each step adds ``argmax_j min_{s in S} D(s, j)``. The kept tokens
    are sorted back to their original order and re-indexed contiguously (``reindex``), as in the official
    ``vbdi/divprune`` LLaVA code. On LLaVA-NeXT the whole anyres sequence, newline tokens included, is one set
    (as in the official code). Budget: a ratio becomes ``int(round(ratio * n))`` (Python's half-to-even
    ``round``, the official ``threshold_terms`` from ``SUBSET_RATIO``: 26 at 0.1 x 256, 64 at 0.1112 x 576);
    ``rounding="floor"`` gives ``int(ratio * n)`` instead.

    Differences from the official code: already-selected tokens are masked out of later steps (the official
    argmax could re-pick one only when every remaining distance is 0, i.e. duplicated tokens).
    """

    rounding: str = "round"

    name = "divprune"
    stage = "projector"
    needs = frozenset({"features"})
    paper = "DivPrune: Diversity-based Visual Token Pruning for Large Multimodal Models (CVPR 2025)"
    arxiv = "2503.02175"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rounding not in ("round", "floor"):
            raise MethodError(f"divprune: rounding={self.rounding!r}: choose 'round' (official) or 'floor'")

    def budget(self, n_tokens: int, *, stage_index: int = 0, n_layers: int = 0) -> int:
        return resolve_keep(self.keep, n_tokens, rounding=self.rounding)

    def select(self, ctx: ImageContext, k: int) -> torch.Tensor:
        return greedy_max_min(ctx.features, k, first="farthest_neighbour")

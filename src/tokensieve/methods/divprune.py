"""DivPrune: diversity-based visual token pruning as a max-min diversity problem."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..context import ImageContext
from ..ops import greedy_max_min
from .base import Method, register


@register
@dataclass
class DivPrune(Method):
    """DivPrune (Alvar et al., CVPR 2025, arXiv 2503.02175): greedy max-min diversity on projected tokens.

    Stage ``projector``; signals: projected features ``Z`` [n, D]. With ``D = 1 - cos(Z_a, Z_b)`` the first pick
    is the token whose nearest neighbour is farthest (the argmax of the second-smallest entry of each column,
    the smallest being the self-distance), then each step adds ``argmax_j min_{s in S} D(s, j)``. The kept tokens
    are sorted back to their original order and re-indexed contiguously (``reindex``), as in the official
    ``vbdi/divprune`` LLaVA code. On LLaVA-NeXT the whole anyres sequence, newline tokens included, is one set
    (as in the official code). Budget ``k = int(ratio * n)`` for a ratio (official ``SUBSET_RATIO``).
    """

    name = "divprune"
    stage = "projector"
    needs = frozenset({"features"})
    paper = "DivPrune: Diversity-based Visual Token Pruning for Large Multimodal Models (CVPR 2025)"
    arxiv = "2503.02175"

    def select(self, ctx: ImageContext, k: int) -> torch.Tensor:
        return greedy_max_min(ctx.features, k, first="farthest_neighbour")

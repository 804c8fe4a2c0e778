"""FastV: drop the least-attended visual tokens from decoder layer K on."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..context import LLMContext
from ..ops import topk_indices
from .base import LLMMethod, register


@register
@dataclass
class FastV(LLMMethod):
    """FastV (Chen et al., ECCV 2024, arXiv 2403.06764): last-token attention at layer K-1, top-k from layer K.

    Stage ``llm`` at ``layer`` K (paper default K=2; the official kv-cache demo uses K=3). Signals: queries and
    keys of layer K-1 after RoPE; the last prompt token's attention row is recomputed from them (no
    ``output_attentions``), averaged over heads and restricted to the image's tokens; the top-k are kept
    (sorted) and keep their ``original`` positions (``position_ids = keep_indexs`` in the official code).

    Budget: ``keep`` is the count kept from layer K on. Comparison tables quote FastV at a layer-*averaged*
    budget (all tokens for K layers, fewer afterwards); set ``average_budget=True`` to read ``keep`` that way
    (converted by :func:`tokensieve.budget.layer_average_to_stage_count`). The paper's ``R=50%`` is ``keep=0.5``.
    """

    keep: float | int = 0.5
    layer: int = 2

    name = "fastv"
    needs = frozenset({"hidden", "attention"})
    paper = "An Image is Worth 1/2 Tokens After Layer 2 (FastV, ECCV 2024)"
    arxiv = "2403.06764"

    def select(self, ctx: LLMContext, k: int) -> torch.Tensor:
        return topk_indices(ctx.last_token_attention(), k)

"""FastV: drop the least-attended visual tokens from decoder layer K on."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..context import LLMContext
from ..ops import topk_indices
from ._layers import llm_layer
from .base import LLMMethod, register


@register
@dataclass
class FastV(LLMMethod):
    """FastV (Chen et al., ECCV 2024, arXiv 2403.06764): last-token attention at layer K-1, top-k from layer K.

    Stage ``llm`` at ``layer`` K. Default: the paper's K=2 of a 32-layer LLM scaled to the model,
    ``max(1, round(2 * n_layers / 32))`` (:mod:`tokensieve.methods._layers`; 2 at 32 layers); the official
    kv-cache demo uses K=3. Signals: queries and
    keys of layer K-1 after RoPE; the last prompt token's attention row is recomputed from them (no
    ``output_attentions``), averaged over heads and restricted to the image's tokens; the top-k are kept
    (sorted) and keep their ``original`` positions (``position_ids = keep_indexs`` in the official code).

    Budget: ``keep`` is the count kept from layer K on. Comparison tables quote FastV at a layer-*averaged*
    budget (all tokens for K layers, fewer afterwards); set ``average_budget=True`` to read ``keep`` that way
    (converted by :func:`tokensieve.budget.layer_average_to_stage_count`). The paper's ``R=50%`` is ``keep=0.5``.
    """

    keep: float | int = 0.5
    layer: int | None = None  # None: the paper's K=2 scaled with depth

    name = "fastv"
    needs = frozenset({"hidden", "attention"})
    paper = "An Image is Worth 1/2 Tokens After Layer 2 (FastV, ECCV 2024)"
    arxiv = "2403.06764"

    def llm_layers(self, n_layers: int) -> list[int]:
        return [llm_layer(self.layer, 2, n_layers, name="fastv: layer")]

    def select(self, ctx: LLMContext, k: int) -> torch.Tensor:
        return topk_indices(ctx.last_token_attention(), k)

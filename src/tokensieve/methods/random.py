"""Random pruning: a uniform subset without replacement, seeded."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..context import ImageContext, LLMContext
from .base import Method, MethodError, register


@register
@dataclass
class Random(Method):
    """Keep a uniform random subset of each image's visual tokens (``randperm(n)[:k]``).

    Stage: ``projector`` (before the LLM) by default; with ``layer=K`` it prunes the hidden states at decoder
    layer K instead, as LightCompress ``random.py`` and the Information-Horizon recipe do (DivPrune at layer 0,
    random at a deep layer). Positions: ``reindex`` before the LLM, ``original`` inside it (LightCompress keeps
    ``keep_indexs``; Information-Horizon re-indexes, choose ``positions="reindex"`` for that).

    Signals: none. Same ``seed``, same tokens (the generator is seeded by seed, sample and image).
    Paper: a baseline found strong by UniPruneBench, CATP and "All You Need Are Random Visual Tokens?"
    (arXiv 2512.07580).
    """

    seed: int = 0
    layer: int | None = None

    name = "random"
    stage = "projector"
    needs = frozenset()
    paper = "Random visual-token pruning (baseline; Information Horizon, arXiv 2512.07580)"
    arxiv = "2512.07580"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.layer is not None:
            object.__setattr__(self, "stage", "llm")
            object.__setattr__(self, "default_positions", "original")

    def llm_layers(self, n_layers: int) -> list[int]:
        if self.layer is None:
            return []
        layer = self.layer if self.layer >= 0 else n_layers + self.layer
        if not 0 <= layer < n_layers:
            raise MethodError(f"random: layer={self.layer} is outside the model's {n_layers} decoder layers")
        return [layer]

    def select(self, ctx: ImageContext | LLMContext, k: int) -> torch.Tensor:
        order = torch.randperm(ctx.n, generator=ctx.generator(self.seed))
        return order[:k].to(ctx.token_index.device)

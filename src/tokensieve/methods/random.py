"""Random pruning: a uniform subset without replacement, seeded."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..context import ImageContext, LLMContext
from ._layers import normalize_layer
from .base import Method, register


class _ByLayer:
    """A per-instance value of a class attribute: ``by_layer`` when the instance has a ``layer``, else
    ``default``. On the class itself it reads ``default``, so the registry still sees a valid ``stage``."""

    def __init__(self, default: str, by_layer: str) -> None:
        self.default, self.by_layer = default, by_layer

    def __get__(self, obj, owner=None) -> str:
        if obj is None or getattr(obj, "layer", None) is None:
            return self.default
        return self.by_layer


@register
@dataclass
class Random(Method):
    """Keep a uniform random subset of each image's visual tokens (``randperm(n)[:k]``).

    Stage: ``projector`` (before the LLM) by default; with ``layer=K`` it prunes the hidden states at decoder
    layer K instead, as LightCompress ``random.py`` and the Information-Horizon recipe do (DivPrune at layer 0,
    random at a deep layer). Positions: ``reindex`` before the LLM, ``original`` inside it (LightCompress keeps
    ``keep_indexs``; Information-Horizon re-indexes, choose ``positions="reindex"`` for that).

    Signals: none. Same ``seed``, same tokens (the draw comes from ``ctx.generator(seed)``).
    Paper: a baseline found strong by UniPruneBench, CATP and "All You Need Are Random Visual Tokens?"
    (arXiv 2512.07580).
    """

    seed: int = 0
    layer: int | None = None

    name = "random"
    stage = _ByLayer("projector", "llm")  # type: ignore[assignment]  # per instance, never written
    default_positions = _ByLayer("reindex", "original")  # type: ignore[assignment]
    needs = frozenset()
    fidelity = "seeded uniform draw: the rule of LightCompress random.py, not its (unseeded) picks"
    paper = "Random visual-token pruning (baseline; Information Horizon, arXiv 2512.07580)"
    arxiv = "2512.07580"

    def llm_layers(self, n_layers: int) -> list[int]:
        if self.layer is None:
            return []
        return [normalize_layer(self.layer, n_layers, name="random: layer")]

    def select(self, ctx: ImageContext | LLMContext, k: int) -> torch.Tensor:
        order = torch.randperm(ctx.n, generator=ctx.generator(self.seed))
        return order[:k].to(ctx.token_index.device)

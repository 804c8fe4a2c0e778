"""SparseVLM: text-rater-guided progressive pruning with recycling of the deleted tokens into a few merged ones."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..budget import resolve_keep
from ..context import LLMContext, Selection
from ..ops import density_peak_clusters, merge_by_assignment
from ._schedule import PAPER_DEPTH, PAPER_TOKENS, check_layers, fit_stages, scale_layers, solve_schedule
from .base import LLMMethod, MethodError, register

# v1 per-stage kept counts for a 576-token image at layers [2, 6, 15] (LightCompress ``sparsevlm.py``), keyed by
# the layer-averaged budget they are quoted at.
PAPER_SCHEDULES: dict[int, tuple[int, int, int]] = {192: (300, 200, 110), 128: (303, 110, 36), 64: (66, 30, 17)}


@register
@dataclass
class SparseVLM(LLMMethod):
    """SparseVLM (Zhang et al., ICML 2025, arXiv 2410.04417): visual tokens rated by the relevant text tokens,
    pruned progressively, the deleted ones partly recycled.

    Stage ``llm`` at several layers: ``[2, 6, 15]`` on a 32-layer LLM (``layer_fractions``; ``layers`` sets them
    explicitly). Signals: hidden states at the input of decoder layer 0 (the LM input embeddings, captured as
    ``layer_hidden`` of layer 0), queries/keys of the layer before each stage (``attention``), and the stage's
    hidden states [n, D].

    1. Text raters: with ``v`` [n, D] the image's embeddings and ``t`` [t, D] those of the text after the image,
       ``m = softmax(v t^T, dim=text).mean(dim=visual)``; raters are the text tokens with ``m > mean(m)``.
    2. Relation: the raters' attention rows over the image, recomputed from the q/k of layer ``l - 1`` after RoPE,
       averaged over heads and raters.
    3. Recycling (``recycle=True``): the stage keeps ``k`` tokens in all, ``k - r`` by highest relation and
       ``r`` recycled slots. The top ``recycle_ratio`` (30%) of the deleted tokens by relation are clustered by
       density peaks (:func:`tokensieve.ops.density_peak_clusters`, ``knn`` neighbours) into
       ``r = pool // 10 + 1`` clusters and averaged (:func:`tokensieve.ops.merge_by_assignment`). Each average
       is written into the slot of its cluster's representative, the member with the highest relation, which
       is therefore kept: the stage count is pruned + recycled and never exceeds ``k``.

    Budget: ``keep`` is the layer-averaged (FLOPs-equivalent) budget of the paper's tables. When it is one of
    the paper's 192/128/64 of 576 (``keep`` 0.3334/0.2223/0.1112, or the same fraction as a count), the v1
    schedule ``[300, 200, 110]`` / ``[303, 110, 36]`` / ``[66, 30, 17]`` is used, scaled by ``n / 576``. Other
    budgets use the geometric schedule ``n * t^(s+1)`` with ``t`` solved so the layer average is the largest
    one not above ``keep`` (:func:`tokensieve.budget.stages_layer_average`); ``keep=1.0`` keeps everything.
    ``schedule`` (fractions of ``n`` per stage) overrides both. On a model that is not 32 layers deep the
    paper schedules keep their counts on the scaled layers, so their layer average is not exactly ``keep``.

    Positions: ``original`` (LightCompress passes the kept tokens' ``position_ids`` through); ``reindex``
    re-packs them.

    Differences from the official code (LightCompress ``llmc/compression/token_reduction/sparsevlm.py``;
    ``Gumpest/SparseVLMs`` not read): the recycled averages replace kept slots instead of being appended as new
    tokens, so the count stays within the budget; raters are recomputed at every stage from the surviving
    tokens' embeddings (the code rates once on all of them); the v1 code's rank-adaptive deletion count is
    replaced by the fixed schedule, as LightCompress does; density ties are broken by index, not by noise.
    """

    keep: float | int = 0.3334
    layer: int = 2  # unused when `layers`/`layer_fractions` set the schedule; kept for the shared signature
    layers: tuple[int, ...] | None = None
    layer_fractions: tuple[float, ...] = (2 / PAPER_DEPTH, 6 / PAPER_DEPTH, 15 / PAPER_DEPTH)
    schedule: tuple[float, ...] | None = None
    recycle: bool = True
    recycle_ratio: float = 0.3
    knn: int = 5

    name = "sparsevlm"
    needs = frozenset({"hidden", "attention", "layer_hidden"})
    paper = "SparseVLM: Visual Token Sparsification for Efficient Vision-Language Model Inference (ICML 2025)"
    arxiv = "2410.04417"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.recycle_ratio <= 1.0:
            raise MethodError(f"sparsevlm: recycle_ratio={self.recycle_ratio} must lie in (0, 1]")
        if self.schedule is not None and (
            any(not 0.0 < f <= 1.0 for f in self.schedule) or list(self.schedule) != sorted(self.schedule)[::-1]
        ):
            raise MethodError("sparsevlm: schedule must be non-increasing fractions in (0, 1]")

    def llm_layers(self, n_layers: int) -> list[int]:
        if self.layers is not None:
            return check_layers(self.name, self.layers, n_layers)
        return scale_layers(self.layer_fractions, n_layers)

    def capture_layers(self, layer: int, n_layers: int) -> list[int]:
        return sorted({0, layer - 1})  # layer 0's input = the embeddings that rate the text

    def stage_counts(self, n_tokens: int, n_layers: int) -> list[int]:
        """Visual tokens kept after each stage (recycled slots included)."""
        layers = self.llm_layers(n_layers)
        if self.schedule is not None:
            if self.layers is not None and len(self.schedule) != len(layers):
                raise MethodError(f"sparsevlm: {len(self.schedule)} schedule entries for {len(layers)} layers")
            return [max(1, int(f * n_tokens)) for f in fit_stages(self.schedule, len(layers))]
        ratio = self.keep if isinstance(self.keep, float) else self.keep / n_tokens
        if len(layers) == 3:
            for budget, counts in PAPER_SCHEDULES.items():
                if abs(ratio - budget / PAPER_TOKENS) < 3e-3:
                    return [max(1, min(n_tokens, c * n_tokens // PAPER_TOKENS)) for c in counts]
        average = resolve_keep(self.keep, n_tokens)

        def counts(t: float) -> list[int]:
            return [max(1, int(n_tokens * t ** (s + 1))) for s in range(len(layers))]

        return solve_schedule(counts, average, layers, n_tokens, n_layers)

    def budget(self, n_tokens: int, *, stage_index: int = 0, n_layers: int = 0) -> int:
        return self.stage_counts(n_tokens, n_layers)[stage_index]

    def relation(self, ctx: LLMContext) -> torch.Tensor:
        """Mean attention [n] of the text raters over the image's candidates."""
        instruction = ctx.text_cols[ctx.text_after_image]
        if instruction.numel() == 0:
            instruction = torch.tensor([ctx.last_col], device=ctx.hidden.device)
        embeds = ctx.capture(0)
        if embeds.hidden is None:
            raise RuntimeError("sparsevlm needs the embeddings: declare 'layer_hidden' in needs")
        v = embeds.hidden[embeds.rows(ctx.image_cols)].float()
        t = embeds.hidden[embeds.rows(instruction)].float()
        m = torch.softmax(v @ t.T, dim=1).mean(0)  # [t]
        raters = instruction[m > m.mean()]
        if raters.numel() == 0:  # all text tokens equally relevant
            raters = instruction
        return ctx.attention_from(raters).mean(0).mean(0)

    def recycled_slots(self, n: int, k: int) -> tuple[int, int]:
        """(r, pool): merged tokens and how many deleted tokens feed them, with ``k - r`` kept by relation."""
        if not self.recycle or k < 2 or k >= n:
            return 0, 0
        r = 1
        for _ in range(8):  # fixed point: the pool is a share of what is deleted, which grows with r
            pool = math.ceil(self.recycle_ratio * (n - (k - r)))
            new_r = max(1, min(pool // 10 + 1, k - 1, pool))
            if new_r == r:
                break
            r = new_r
        pool = math.ceil(self.recycle_ratio * (n - (k - r)))
        return r, max(pool, r)

    def select(self, ctx: LLMContext, k: int) -> Selection:
        relation = self.relation(ctx)
        order = torch.sort(relation, descending=True, stable=True).indices
        r, pool_size = self.recycled_slots(ctx.n, k)
        top = order[: k - r]
        if r == 0:
            return Selection(keep=top)
        pool = order[k - r : k - r + pool_size]  # deleted tokens with the highest relation, best first
        tokens = ctx.hidden[pool]
        assign = density_peak_clusters(tokens, r, knn=self.knn)
        merged = merge_by_assignment(tokens, assign, r)
        # Representative = the member ranked first in the pool (highest relation).
        rank = torch.arange(pool.numel(), device=pool.device)
        first = torch.full((r,), pool.numel(), dtype=torch.long, device=pool.device)
        first = first.scatter_reduce(0, assign, rank, reduce="amin")
        representatives = pool[first]
        return Selection(keep=torch.cat([top, representatives]), replace_at=representatives, replace_with=merged)

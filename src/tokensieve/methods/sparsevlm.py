"""SparseVLM: text-rater-guided progressive pruning with recycling of the deleted tokens into a few merged ones."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..budget import resolve_keep
from ..context import LLMContext, Selection
from ..ops import density_peak_clusters, merge_by_assignment
from ._schedule import PAPER_DEPTH, PAPER_TOKENS, check_layers, fit_stages, scale_layers, solve_schedule
from .base import LLMMethod, MethodError, register

# v1 per-stage kept counts for a 576-token image after layers [2, 6, 15] (``score.py`` of Gumpest/SparseVLMs),
# keyed by the layer-averaged budget they are quoted at.
PAPER_SCHEDULES: dict[int, tuple[int, int, int]] = {192: (300, 200, 110), 128: (303, 110, 36), 64: (66, 30, 17)}
PAPER_LOCS = (2, 6, 15)  # official ``pruning_loc``: the layers whose own attention scores, and whose output is pruned


def image_columns(ctx: LLMContext) -> torch.Tensor:
    """Prompt columns [n_tokens] of the whole image before any pruning (its tokens are contiguous)."""
    base = ctx.image_cols[0] - ctx.token_index[0]
    if not torch.equal(ctx.image_cols - base, ctx.token_index):
        raise RuntimeError("sparsevlm: the image's tokens are not contiguous in the prompt")
    return base + torch.arange(ctx.n_tokens, device=ctx.image_cols.device)


def recycle_sizes(n_deleted: int, ratio: float = 0.3) -> tuple[int, int]:
    """(pool, clusters) of the official recycling: ``pool = int(ratio * d) + 1`` of the ``d`` deleted tokens,
    ``clusters = int(pool / 10) + 1``; both capped at ``d``."""
    pool = min(n_deleted, int(n_deleted * ratio) + 1)
    return pool, min(pool, int(pool / 10) + 1)


@register
@dataclass
class SparseVLM(LLMMethod):
    """SparseVLM (Zhang et al., ICML 2025, arXiv 2410.04417): visual tokens rated by the relevant text tokens,
    pruned progressively, the deleted ones partly recycled.

    The official code (``Gumpest/SparseVLMs`` ``modelling_sparse_llama.py``, ``score.py``, ``utils.py``) runs
    decoder layer ``loc`` in ``pruning_loc = [2, 6, 15]`` on all tokens, scores with that layer's own
    attention, and prunes its *output*. Here a stage at layer ``l = loc + 1`` prunes its input (the same
    tensor) with the attention of layer ``l - 1 = loc`` recomputed from its captured q/k after RoPE. Default
    stage layers: ``loc + 1`` of a 32-layer LLM scaled with depth, ``max(1, round((loc + 1) * n_layers / 32))``
    made strictly increasing (``[3, 7, 16]`` at 32 layers; ``layers`` sets the stage layers explicitly).
    Signals: hidden states at the input of decoder layer 0 (the LM input embeddings, ``layer_hidden`` of layer
    0), q/k of the layer before each stage (``attention``), the stage's hidden states [n, D].

    1. Text raters, once, from the embeddings: ``v`` [n_tokens, D] the whole image, ``t`` [t, D] the text after
       it, ``m = softmax(v t^T, dim=text).mean(dim=visual)``; raters are the text tokens with ``m > mean(m)``.
    2. Relation: the raters' attention rows over the image's candidates at layer ``loc``, averaged over heads
       and raters. The stage keeps ``topk(relation, min(k, n - 1))`` (``k`` from the schedule below).
    3. Recycling (``recycle=True``): of the ``d`` deleted tokens, the ``pool = int(0.3 * d) + 1`` with the
       highest relation are clustered by density peaks (:func:`tokensieve.ops.density_peak_clusters`, density
       from the ``clusters`` nearest neighbours, i.e. ``topk(k=cluster_num)``) into ``clusters = int(pool / 10)
       + 1`` and averaged (:func:`tokensieve.ops.merge_by_assignment`). The official code appends the
       averages after the kept visual tokens; here each is written into the slot of its cluster's
       representative (the member with the highest relation), which is kept. So a stage keeps ``k + clusters``
       visual tokens, as the official one does (documented extras).

    Budget: ``keep`` is the layer-averaged (FLOPs-equivalent) budget of the paper's tables. When it is one of
    the paper's 192/128/64 of 576 (``keep`` 0.3334/0.2223/0.1112, or the same fraction as a count), the v1
    schedule ``[300, 200, 110]`` / ``[303, 110, 36]`` / ``[66, 30, 17]`` is used, scaled by ``n / 576`` (floor).
    Other budgets use the geometric schedule ``int(n * t^(s+1))`` with ``t`` solved so the layer average is
    the largest one not above ``keep`` (:func:`tokensieve.budget.stages_layer_average`); ``keep=1.0`` keeps
    everything (the official ``score.py`` picks its list by editing the code: it reads
    ``sparse_token_list_128``). ``schedule`` (fractions of ``n`` per stage, floor) overrides both. The
    recycled extras are not part of the schedule, as in the official code.

    Positions: ``reindex`` (the official code re-packs the sequence and slices ``position_ids`` to its new
    length, i.e. contiguous positions); ``original`` keeps the kept tokens' own.

    Differences from the official code: the merged tokens sit in their representatives' slots instead of after
    the kept visual tokens, so with ``reindex`` they get the representatives' positions; density ties are
    broken by index instead of ``rand * 1e-6`` noise; a cluster's average is its mean (the official divides by
    ``count + 1e-6``). Options: ``recycle_within_budget=True`` (our earlier behaviour) counts the merged tokens
    towards ``k`` (``k - r`` by relation, ``r`` recycled); ``knn`` fixes the density neighbours instead of
    ``clusters``; ``recycle=False`` drops the deleted tokens.
    """

    keep: float | int = 0.3334
    layer: int = 3  # unused when `layers`/`layer_fractions` set the schedule; kept for the shared signature
    layers: tuple[int, ...] | None = None
    layer_fractions: tuple[float, ...] = tuple((loc + 1) / PAPER_DEPTH for loc in PAPER_LOCS)
    schedule: tuple[float, ...] | None = None
    recycle: bool = True
    recycle_ratio: float = 0.3
    knn: int | None = None  # None: the official topk(k=cluster_num) density
    recycle_within_budget: bool = False

    name = "sparsevlm"
    needs = frozenset({"hidden", "attention", "layer_hidden"})
    default_positions = "reindex"
    paper = "SparseVLM: Visual Token Sparsification for Efficient Vision-Language Model Inference (ICML 2025)"
    arxiv = "2410.04417"
    fidelity = "kept set faithful; merged tokens sit in their representatives' slots (official: appended)"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.recycle_ratio <= 1.0:
            raise MethodError(f"sparsevlm: recycle_ratio={self.recycle_ratio} must lie in (0, 1]")
        if self.knn is not None and self.knn < 1:
            raise MethodError(f"sparsevlm: knn={self.knn} must be >= 1 (or None for the official rule)")
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
        """Visual tokens kept by relation after each stage (recycled extras not included)."""
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

    def kept_count(self, n: int, k: int) -> int:
        """Visual tokens a stage with ``n`` candidates and budget ``k`` leaves: ``min(k, n - 1)`` by relation
        plus the recycled clusters (the documented extras; none with ``recycle_within_budget``)."""
        k = min(k, max(1, n - 1)) if n > 1 else n
        if not self.recycle or k >= n or self.recycle_within_budget:
            return k
        return k + recycle_sizes(n - k, self.recycle_ratio)[1]

    def raters(self, ctx: LLMContext) -> torch.Tensor:
        """Prompt columns of the text raters, from the embeddings of the whole image and the text after it."""
        instruction = ctx.text_cols[ctx.text_after_image]
        if instruction.numel() == 0:
            return torch.tensor([ctx.last_col], device=ctx.hidden.device)
        embeds = ctx.capture(0)
        if embeds.hidden is None:
            raise RuntimeError("sparsevlm needs the embeddings: declare 'layer_hidden' in needs")
        v = embeds.hidden[embeds.rows(image_columns(ctx))].float()
        t = embeds.hidden[embeds.rows(instruction)].float()
        m = torch.softmax(v @ t.T, dim=1).mean(0)  # [t]
        return instruction[m > m.mean()]

    def relation(self, ctx: LLMContext) -> torch.Tensor:
        """Mean attention [n] of the text raters over the image's candidates."""
        raters = self.raters(ctx)
        if raters.numel() == 0:  # every text token exactly as relevant: no token passes the mean
            return torch.zeros(ctx.n, device=ctx.hidden.device)
        return ctx.attention_from(raters).mean(0).mean(0)

    def select(self, ctx: LLMContext, k: int) -> torch.Tensor | Selection:
        relation = self.relation(ctx)
        n = ctx.n
        k = min(k, max(1, n - 1)) if n > 1 else n
        if not self.recycle or k >= n:
            return torch.topk(relation, k).indices
        if self.recycle_within_budget:
            return self._within_budget(ctx, relation, k)
        top = torch.topk(relation, k).indices
        deleted = torch.ones(n, dtype=torch.bool, device=relation.device)
        deleted[top] = False
        deleted = torch.nonzero(deleted).flatten()  # ascending, as ``torch.where(mask == 0)``
        pool_size, clusters = recycle_sizes(int(deleted.numel()), self.recycle_ratio)
        pool = deleted[torch.topk(relation[deleted], pool_size).indices]  # best first
        return self._recycle(ctx, relation, top, pool, clusters)

    def _recycle(self, ctx, relation, top, pool, clusters) -> Selection:
        tokens = ctx.hidden[pool]
        assign = density_peak_clusters(tokens, clusters, knn=self.knn or clusters)
        merged = merge_by_assignment(tokens, assign, clusters)
        # Representative = the member with the highest relation (the pool is ordered best first).
        rank = torch.arange(pool.numel(), device=pool.device)
        first = torch.full((clusters,), pool.numel(), dtype=torch.long, device=pool.device)
        first = first.scatter_reduce(0, assign, rank, reduce="amin")
        representatives = pool[first]
        return Selection(keep=torch.cat([top, representatives]), replace_at=representatives, replace_with=merged)

    def _within_budget(self, ctx: LLMContext, relation: torch.Tensor, k: int) -> torch.Tensor | Selection:
        """Option ``recycle_within_budget``: ``k - r`` tokens by relation and ``r`` recycled slots, ``r`` the
        fixed point of the official sizes for what is deleted."""
        n, r = ctx.n, 1
        for _ in range(8):
            new_r = max(1, min(recycle_sizes(n - (k - r), self.recycle_ratio)[1], k - 1))
            if new_r == r:
                break
            r = new_r
        if k < 2:
            return torch.topk(relation, k).indices
        order = torch.sort(relation, descending=True, stable=True).indices
        pool_size = max(recycle_sizes(n - (k - r), self.recycle_ratio)[0], r)
        return self._recycle(ctx, relation, order[: k - r], order[k - r : k - r + pool_size], r)

"""PyramidDrop (PDrop): multi-stage pruning by the last instruction token's attention, a geometric schedule."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..budget import resolve_keep
from ..context import LLMContext
from ._own_qk import FALLBACK_NOTE, OWN_QK_SUPPORTED, attention_needs, score_layer
from ._schedule import PAPER_TOKENS, check_layers, scale_layers, solve_schedule
from .base import LLMMethod, MethodError, register


@register
@dataclass
class PDrop(LLMMethod):
    """PyramidDrop (Xing et al., CVPR 2025, arXiv 2410.17247): rank and drop visual tokens at the end of each
    stage of the LLM, keeping ``lambda^s`` of them after stage ``s``.

    Stage ``llm``, several layers: ``[8, 16, 24]`` on a 32-layer LLM, scaled with depth as
    ``max(1, round(K32 * n_layers / 32))`` and made strictly increasing (:mod:`tokensieve.methods._layers`;
    ``layers`` sets them explicitly). At each stage layer ``l``, before layer ``l`` runs, the last prompt
    token's attention row over the image is recomputed from layer ``l``'s *own* queries and keys after RoPE
    on its input (``input_layernorm -> q_proj / k_proj``, signal ``own_qk``, as the official
    ``pdrop_rank_drop`` does; no ``output_attentions``), averaged over heads, and the top count is kept
    (``torch.topk``). Signals: ``own_qk`` ([H, L, d] q/k of layer ``l``), hidden [n, D]. Positions:
    ``reindex`` (contiguous, as the official code rebuilds the sequence), ``original`` on M-RoPE families
    (the framework's rule).

    Budget (``n`` = the image's tokens):

    - default (``average_budget=False``): ``keep`` is the ratio after the *first* stage and stage ``s`` keeps
      ``int(n * keep * lam**s)`` (floor, as the official ``int(image_tokens * image_token_ratio_list[s])``),
      never below one token; an int ``keep`` is the first count ``c0`` and stage ``s`` keeps
      ``int(c0 * lam**s)``. ``keep=0.5, lam=0.5`` is the paper's ``image_token_ratio_list [0.5, 0.25, 0.125]``.
    - ``average_budget=True``: ``keep`` is the layer-averaged count of the standard comparison tables (FLOPs
      equivalent). The stage layers stay fixed and ``lam`` is solved (``lam_s = t^(s+1)`` schedule, bisection
      on ``t`` through :func:`tokensieve.budget.stages_layer_average`) so the average is the largest one not
      above ``keep``; ``lam`` is then ignored. ``keep=1.0`` keeps everything. When the layers before the first
      stage alone would exceed the average (``first / L >= keep_ratio``, e.g. 128 or 64 of 576 with the first
      stage at 8 of 32), the first stage moves to ``max(1, int(keep_ratio * L / 2))`` (layer 3 for 128, 1 for
      64 on 32 layers), as the paper's low-budget settings move the first layer. The stage layers are fixed
      before the image is seen, so an int ``keep`` is read as a fraction of 576 tokens for this rule only.

    Differences from the official code (``Cooperx521/PyramidDrop`` ``llava/model/modeling_llama_pdrop.py``):
    the query row is the last prompt token, which on LLaVA prompts is the last instruction token (the official
    ``prompt_len + image_tokens - 1``); the official 64/128/192 settings tune the first layer and ``lam`` by
    hand, here (``average_budget=True``) ``lam`` is solved for a given average with the layers fixed. Where
    the framework has no ``own_qk`` signal the method falls back to the q/k of layer ``l - 1`` and its
    ``fidelity`` note says so.
    """

    keep: float | int = 0.5
    layer: int = 8  # unused when `layers`/`layer_fractions` set the schedule; kept for the shared signature
    layers: tuple[int, ...] | None = None
    layer_fractions: tuple[float, ...] = (0.25, 0.5, 0.75)
    lam: float = 0.5

    name = "pdrop"
    needs = attention_needs("hidden")
    fidelity = "faithful" if OWN_QK_SUPPORTED else FALLBACK_NOTE
    default_positions = "reindex"
    paper = "PyramidDrop: Accelerating Your Large Vision-Language Models via Pyramid Visual Redundancy Reduction"
    arxiv = "2410.17247"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.lam <= 1.0:
            raise MethodError(f"pdrop: lam={self.lam} must lie in (0, 1]")

    def llm_layers(self, n_layers: int) -> list[int]:
        if self.layers is not None:
            return check_layers(self.name, self.layers, n_layers)
        layers = scale_layers(self.layer_fractions, n_layers)
        if self.average_budget:
            # Keeping every token before the first stage already costs first/L of the budget: when that reaches
            # the average, move the first stage so half of the average is spent before it.
            ratio = self.keep if isinstance(self.keep, float) else self.keep / PAPER_TOKENS
            if layers[0] / n_layers >= ratio:
                layers[0] = max(1, min(layers[0], int(ratio * n_layers / 2)))
        return layers

    def schedule(self, n_tokens: int, n_layers: int) -> list[int]:
        """Visual tokens kept after each stage, for an image of ``n_tokens`` tokens."""
        layers = self.llm_layers(n_layers)
        if self.average_budget:
            average = resolve_keep(self.keep, n_tokens)

            def counts(t: float) -> list[int]:
                return [max(1, int(n_tokens * t ** (s + 1))) for s in range(len(layers))]

            return solve_schedule(counts, average, layers, n_tokens, n_layers)
        if isinstance(self.keep, float):
            return [max(1, min(n_tokens, int(n_tokens * (self.keep * self.lam**s)))) for s in range(len(layers))]
        first = resolve_keep(self.keep, n_tokens)
        return [max(1, int(first * self.lam**s)) for s in range(len(layers))]

    def budget(self, n_tokens: int, *, stage_index: int = 0, n_layers: int = 0) -> int:
        return self.schedule(n_tokens, n_layers)[stage_index]

    def capture_layers(self, layer: int, n_layers: int) -> list[int]:
        return [] if OWN_QK_SUPPORTED else [layer - 1]

    def select(self, ctx: LLMContext, k: int) -> torch.Tensor:
        return torch.topk(ctx.last_token_attention(score_layer(ctx.layer)), k).indices

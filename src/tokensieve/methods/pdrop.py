"""PyramidDrop (PDrop): multi-stage pruning by the last instruction token's attention, a geometric schedule."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..budget import resolve_keep
from ..context import LLMContext
from ..ops import topk_indices
from ._schedule import PAPER_TOKENS, check_layers, scale_layers, solve_schedule
from .base import LLMMethod, MethodError, register


@register
@dataclass
class PDrop(LLMMethod):
    """PyramidDrop (Xing et al., CVPR 2025, arXiv 2410.17247): rank and drop visual tokens at the end of each
    stage of the LLM, keeping ``lambda^s`` of them after stage ``s``.

    Stage ``llm``, several layers: ``[8, 16, 24]`` on a 32-layer LLM (``layer_fractions=(0.25, 0.5, 0.75)``,
    rounded and made strictly increasing on shallower models; pass ``layers`` to set them explicitly). At each
    stage layer ``l`` the last prompt token's attention row over the image is recomputed from the queries and
    keys of layer ``l - 1`` after RoPE (captured by the framework, no ``output_attentions``), averaged over
    heads, and the top count is kept. Signals: ``attention`` of layer ``l - 1`` ([H, L, d] q/k), hidden [n, D]
    (only its width is used). Positions: ``reindex`` (contiguous, as the official code rebuilds the sequence),
    ``original`` on M-RoPE families (the framework's rule).

    Budget (``n`` = the image's tokens):

    - default (``average_budget=False``): ``keep`` is the count after the *first* stage, ``c0 = int(keep * n)``
      (or the int itself), and stage ``s`` keeps ``int(c0 * lam**s)``, never below one token. ``keep=0.5,
      lam=0.5`` is the paper's ``image_token_ratio_list [0.5, 0.25, 0.125]``.
    - ``average_budget=True``: ``keep`` is the layer-averaged count of the standard comparison tables (FLOPs
      equivalent). The stage layers stay fixed and ``lam`` is solved (``lam_s = t^(s+1)`` schedule, bisection
      on ``t`` through :func:`tokensieve.budget.stages_layer_average`) so the average is the largest one not
      above ``keep``; ``lam`` is then ignored. ``keep=1.0`` keeps everything. When the layers before the first
      stage alone would exceed the average (``first / L >= keep_ratio``, e.g. 128 or 64 of 576 with the first
      stage at 8 of 32), the first stage moves to ``max(1, int(keep_ratio * L / 2))`` (layer 3 for 128, 1 for
      64 on 32 layers), as the paper's low-budget settings move the first layer. The stage layers are fixed
      before the image is seen, so an int ``keep`` is read as a fraction of 576 tokens for this rule only.

    Differences from the official code (``Cooperx521/PyramidDrop`` ``llava/model/modeling_llama_pdrop.py``,
    LightCompress ``pyramiddrop.py``): the scores come from the q/k of the layer just before the stage layer
    (the framework captures layers < the stage layer) and the query row is the last prompt token, which on
    LLaVA prompts is the last instruction token; the official 64/128/192 settings tune the first layer and
    ``lam`` by hand (``R_dict``), here ``lam`` is solved for a given average with the layers fixed.
    """

    keep: float | int = 0.5
    layer: int = 8  # unused when `layers`/`layer_fractions` set the schedule; kept for the shared signature
    layers: tuple[int, ...] | None = None
    layer_fractions: tuple[float, ...] = (0.25, 0.5, 0.75)
    lam: float = 0.5

    name = "pdrop"
    needs = frozenset({"hidden", "attention"})
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
        first = resolve_keep(self.keep, n_tokens)
        return [max(1, int(first * self.lam**s)) for s in range(len(layers))]

    def budget(self, n_tokens: int, *, stage_index: int = 0, n_layers: int = 0) -> int:
        return self.schedule(n_tokens, n_layers)[stage_index]

    def select(self, ctx: LLMContext, k: int) -> torch.Tensor:
        return topk_indices(ctx.last_token_attention(), k)

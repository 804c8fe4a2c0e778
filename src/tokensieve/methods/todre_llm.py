"""ToDRE stage 2: task relevance inside the decoder ("information migration"), optionally dropping all visual tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..budget import resolve_keep
from ..context import LLMContext
from ..ops import topk_indices
from .base import LLMMethod, MethodError, register

DEFAULT_FRACTION = 0.5  # GUESS: the paper's layer was not recoverable; the middle of the decoder
QUERIES = ("instruction", "last")


@register
@dataclass
class ToDRELLM(LLMMethod):
    """ToDRE, stage 2 (arXiv 2505.18757; paper only, no official code found). **Most details here are guesses.**

    The paper observes "information migration": in later decoder layers the visual information has moved into the
    text tokens, so visual tokens become task-irrelevant and can be pruned by text-to-visual relevance, up to
    removing *all* of them. This method prunes the hidden states from decoder ``layer`` on.

    Stage ``llm`` at ``layer`` (default ``round(0.5 * n_layers)``, clipped to ``[1, n_layers - 1]``).
    Signals: queries and keys after RoPE of layer ``layer - 1`` (the framework captures only layers before the
    pruning layer), hidden states [n, D] (width only). Relevance of each of the image's n candidates:

    - ``query="instruction"`` (default): attention from the text tokens after the image (the instruction) to the
      image, averaged over heads and query rows (:meth:`LLMContext.instruction_attention`), [n];
    - ``query="last"``: the last prompt token's attention row (FastV's signal).

    The ``keep`` most relevant tokens are kept (ties to the lower index) with their ``original`` positions.
    ``drop_all=True`` sets the budget to 0: every visual token of every image is dropped from ``layer`` on (the
    KV cache of those layers holds text only); no attention is captured then.

    Unverified choices (the paper text does not pin them down; none of these is from code):

    * the default layer (middle of the decoder) and the relevance threshold (none: a count budget instead);
    * relevance = softmax attention of the instruction tokens (averaged over heads and rows), read at layer
      ``layer - 1`` rather than at ``layer`` itself (the sieve's capture rule);
    * the query rows (the text after the image; with several images, the text after *this* image);
    * positions stay ``original`` (no re-indexing after the drop).

    Use it after stage 1 as ``[ToDRE(keep=0.1), ToDRELLM(drop_all=True)]`` (or with a ``keep``).
    """

    keep: float | int = 0.5
    layer: int | None = None
    drop_all: bool = False
    query: str = "instruction"

    name = "todre_llm"
    needs = frozenset({"hidden", "attention"})
    paper = "ToDRE: token diversity and task relevance for visual token pruning (stage 2, in-LLM)"
    arxiv = "2505.18757"
    fidelity = "paper only, no official code: layer, relevance signal, query rows and positions are guesses"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.query not in QUERIES:
            raise MethodError(f"todre_llm: query={self.query!r}: choose one of {QUERIES}")
        if self.drop_all:  # nothing is scored, so capture nothing
            object.__setattr__(self, "needs", frozenset({"hidden"}))

    def llm_layers(self, n_layers: int) -> list[int]:
        if self.layer is None:
            return [max(1, min(n_layers - 1, round(DEFAULT_FRACTION * n_layers)))]
        return super().llm_layers(n_layers)

    def budget(self, n_tokens: int, *, stage_index: int = 0, n_layers: int = 0) -> int:
        if self.drop_all:
            return 0
        return resolve_keep(self.keep, n_tokens, strict=False)

    def relevance(self, ctx: LLMContext) -> torch.Tensor:
        """Task relevance [n] of the image's candidates (attention of layer ``ctx.layer - 1``)."""
        if self.query == "last":
            return ctx.last_token_attention()
        return ctx.instruction_attention()

    def select(self, ctx: LLMContext, k: int) -> torch.Tensor:
        if k == 0:
            return torch.empty(0, dtype=torch.long, device=ctx.token_index.device)
        return topk_indices(self.relevance(ctx), k)

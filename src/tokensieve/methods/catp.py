"""CATP stage 1: per-image facility location plus text alignment for multimodal in-context prompts."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..budget import resolve_keep
from ..context import ImageContext
from ..ops import cosine_similarity_matrix, facility_location
from ._text import TEXT_SPANS, prompt_text_embeddings
from .base import Method, MethodError, register


def stage_one_count(keep: int | float, n_tokens: int) -> int:
    """CATP's stage-1 count ``floor(S (1 - R/2))`` for a total keep target (``R = 1 - keep/S``), in [1, S]."""
    target = resolve_keep(keep, n_tokens)
    ratio = 1.0 - target / n_tokens
    return max(1, min(n_tokens, math.floor(n_tokens * (1.0 - ratio / 2.0) + 1e-9)))


@register
@dataclass
class CATP(Method):
    """CATP (AAAI 2026, arXiv 2508.07871; paper only, no official code), stage 1 after the projector.

    Stage ``projector``, per image ``i``. Signals: projected tokens ``X_i`` [S, D] and the input embeddings of the
    text paired with the image [t_i, D]. Chooses ``Y`` greedily (``ops.facility_location``) to maximise
    ``F_div(Y) + lam1 F_align(Y)`` with ``F_div = sum_{x in X_i} max_{y in Y} sim_hat(y, x)`` and
    ``F_align = sum_{y in Y} sim_hat(y, mean(text_i))``, ``sim_hat = (cos + 1) / 2``. ``lam1=0.7``.

    Paired text ``text_i`` (``text``): ``"paired"`` (default) is the text between this image and the next one,
    i.e. the demonstration's question and answer in a multi-image in-context prompt (for the query image: the
    question that follows it); ``"all"`` is the whole prompt text. The paired span needs ``ctx.text_segment``
    from the core; until it exists, and for single-image prompts, the whole prompt text is used (chat-template
    and special tokens included: the paper does not say how text_i is delimited).

    Budget: by default ``keep`` is the count this stage keeps. With ``paper_schedule=True``, ``keep`` is the
    *total* target of the two-stage schedule (ratio ``R = 1 - keep/S``) and this stage keeps
    ``floor(S (1 - R/2))``, leaving the other ``R/2`` to stage 2 (in-LLM, not part of this method).
    LLaVA-NeXT ``image_newline`` tokens are kept on top of the budget (no code to follow); the paper selects over
    the whole image, so there is no per-crop split. Positions: contiguous on LLaVA, original M-RoPE ids on Qwen.
    """

    lam1: float = 0.7
    text: str = "paired"
    paper_schedule: bool = False

    name = "catp"
    stage = "projector"
    needs = frozenset({"features", "text"})
    paper = "CATP: Contextually Adaptive Token Pruning for Efficient Multimodal In-Context Learning (AAAI 2026)"
    arxiv = "2508.07871"
    fidelity = "paper only, no official code: stage 1 only; the paired-text span falls back to the whole prompt"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.text not in TEXT_SPANS:
            raise MethodError(f"catp: text={self.text!r}: choose one of {TEXT_SPANS}")

    def budget(self, n_tokens: int, *, stage_index: int = 0, n_layers: int = 0) -> int:
        if self.paper_schedule:
            return stage_one_count(self.keep, n_tokens)
        return super().budget(n_tokens, stage_index=stage_index, n_layers=n_layers)

    def alignment(self, x: torch.Tensor, text: torch.Tensor) -> torch.Tensor | None:
        """``sim_hat(x_j, mean(text))`` [n], or None without text."""
        if text.shape[0] == 0:
            return None
        anchor = F.normalize(text.float().mean(0), dim=-1, eps=1e-8)
        return (F.normalize(x.float(), dim=-1, eps=1e-8) @ anchor.to(x.device) + 1.0) / 2.0

    def select(self, ctx: ImageContext, k: int) -> torch.Tensor:
        lines = torch.nonzero(ctx.always_keep).flatten()
        cand = torch.nonzero(~ctx.always_keep).flatten()
        x = ctx.features[cand]
        sim = (cosine_similarity_matrix(x) + 1.0) / 2.0
        align = self.alignment(x, prompt_text_embeddings(ctx, self.text))
        lam = self.lam1 if align is not None else 0.0
        picks = facility_location(sim, min(k, cand.numel()), modular=align, lam=lam, symmetric=True)
        return torch.cat([lines, cand[picks]])

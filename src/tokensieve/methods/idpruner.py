"""IDPruner: maximal marginal relevance over token importance and diversity, with training-free importances."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..context import ImageContext
from ..ops import minmax_normalise, mmr
from ._text import prompt_text_embeddings
from .base import Method, MethodError, register
from .zoo import Zoo

IMPORTANCES = ("norm", "zoo", "text")


@register
@dataclass
class IDPruner(Method):
    """IDPruner (Tencent AngelSlim, arXiv 2602.13315): MMR over importance and diversity after the projector.

    Stage ``projector``. Signals: projected tokens ``v`` [n, D] for the similarity ``cos(v_i, v_j)``, and a
    per-token importance [n], min-max normalised (eps 1e-6 as in AngelSlim). Greedy (``ops.mmr``): first pick
    ``argmax Imp``, then ``argmax_i lam Imp(i) - (1 - lam) max_{j in S} cos(v_i, v_j)``, ``parallel_k`` picks per
    step, running max-similarity initialised to -2. Defaults ``lam=0.5``, ``parallel_k=1``. Positions: contiguous
    on LLaVA (``reindex``), original M-RoPE ids on Qwen (AngelSlim slices the 3-D ids).

    **THE IMPORTANCE IS NOT THE PAPER'S.** The official importance is the output of a *trained* Vision Selector
    (``get_universal_selector_scores``, weights ``AngelSlim/Qwen2.5-VL-*-Instruct-Selector``) that we cannot ship.
    ``importance`` picks a training-free stand-in:

    - ``"norm"`` (**default**): L2 norm of the projected token ``||v_i||``. Free, deterministic, and reported
      rank-equivalent to ZOO-Prune's sensitivity on a Qwen merger (Spearman about 0.99, third-party audit).
    - ``"zoo"``: ZOO-Prune's Monte-Carlo projector sensitivity, computed by ``Zoo.sensitivity`` (``zoo_m=64``
      Gaussian unit directions, ``zoo_h=0.01``, float32, seeded by ``seed`` through ``ctx.generator``); costs
      ``2 m`` projector passes per token.
    - ``"text"``: max cosine of ``v_i`` to the prompt's text-token input embeddings (the text after the image when
      the core provides ``ctx.text_segment``, else the whole prompt, special tokens included).

    Other differences from AngelSlim: budgets are per image (AngelSlim pools every visual token of a sample) with
    ``int(ratio * n)`` rounding (AngelSlim: ``round(n * (1 - prune_ratio))``); there is no LLaVA-NeXT code, so the
    ``image_newline`` tokens are kept on top of the budget; cosine uses a norm floor instead of ``+1e-8``.
    """

    lam: float = 0.5
    parallel_k: int = 1
    importance: str = "norm"
    zoo_m: int = 64
    zoo_h: float = 0.01
    seed: int = 0

    name = "idpruner"
    stage = "projector"
    needs = frozenset({"features", "pre_features", "projector", "text"})  # the union; narrowed per importance
    paper = "IDPruner: MMR-based visual token pruning (Tencent AngelSlim)"
    arxiv = "2602.13315"
    fidelity = (
        "importance is a training-free stand-in (default: projected-feature L2 norm) for the trained Vision "
        "Selector of the official code; the MMR selection itself follows AngelSlim"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.importance not in IMPORTANCES:
            raise MethodError(f"idpruner: importance={self.importance!r}: choose one of {IMPORTANCES}")
        if self.parallel_k < 1:
            raise MethodError(f"idpruner: parallel_k must be >= 1, got {self.parallel_k}")
        if self.zoo_m < 1 or self.zoo_h <= 0:
            raise MethodError(f"idpruner: need zoo_m >= 1 and zoo_h > 0, got {self.zoo_m}, {self.zoo_h}")
        extra = {"zoo": {"pre_features", "projector"}, "text": {"text"}}.get(self.importance, set())
        object.__setattr__(self, "needs", frozenset({"features"} | extra))  # capture only what this importance reads

    def scores(self, ctx: ImageContext, cand: torch.Tensor) -> torch.Tensor:
        """Raw importance [len(cand)] of the candidates ``cand`` (before min-max normalisation)."""
        x = ctx.features[cand]
        if self.importance == "norm":
            return x.float().norm(dim=-1)
        if self.importance == "text":
            text = prompt_text_embeddings(ctx, "after")
            if text.shape[0] == 0:
                return torch.zeros(cand.numel(), device=x.device)
            sim = F.normalize(x.float(), dim=-1, eps=1e-8) @ F.normalize(text.float(), dim=-1, eps=1e-8).T
            return sim.amax(dim=1)
        # ZOO-Prune's own estimator (methods/zoo.py), so both methods score tokens identically.
        return Zoo(m=self.zoo_m, h=self.zoo_h, seed=self.seed).sensitivity(ctx, cand)

    def select(self, ctx: ImageContext, k: int) -> torch.Tensor:
        lines = torch.nonzero(ctx.always_keep).flatten()
        cand = torch.nonzero(~ctx.always_keep).flatten()
        importance = minmax_normalise(self.scores(ctx, cand), eps=1e-6)
        picks = mmr(importance, ctx.features[cand], min(k, cand.numel()), self.lam, self.parallel_k)
        return torch.cat([lines, cand[picks]])

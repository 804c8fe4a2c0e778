"""ToDRE stage 1: diversity-driven visual token selection before the LLM (greedy k-center or max-sum)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..context import ImageContext
from ..ops import cosine_distance_matrix, greedy_max_min
from .base import Method, MethodError, register

VARIANTS = ("kcenter", "maxsum")
METRICS = ("cosine", "euclidean")


def distance_matrix(x: torch.Tensor, metric: str) -> torch.Tensor:
    """Pairwise distances [n, n] of the rows of ``x`` with an exactly zero diagonal."""
    if metric == "cosine":
        return cosine_distance_matrix(x)
    d = torch.cdist(x.float(), x.float())
    d.fill_diagonal_(0.0)  # cdist's matmul path leaves rounding noise on the diagonal
    return d


def greedy_max_sum(dist: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy max-sum dispersion: start from the farthest pair, then add ``argmax_j sum_{s in S} D(s, j)``.

    The standard greedy for max-sum diversification without a quality term (Ravi et al.; Borodin et al.); a running
    [n] sum of distances to the selected set is updated with one row per pick. Ties go to the lower index.
    Returns indices [k] in selection order.
    """
    n = dist.shape[0]
    if not 0 <= k <= n:
        raise ValueError(f"k={k} must lie in [0, {n}]")
    if k == 0:
        return torch.empty(0, dtype=torch.long, device=dist.device)
    if n == 1:
        return torch.zeros(1, dtype=torch.long, device=dist.device)
    d = dist.float()
    flat = int(d.argmax())
    first, second = divmod(flat, n)
    selected = [first, second][:k] if first != second else [first]
    taken = torch.zeros(n, dtype=torch.bool, device=d.device)
    taken[selected] = True
    total = d[selected].sum(0)
    while len(selected) < k:
        score = total.masked_fill(taken, -math.inf)
        p = int(score.argmax())
        selected.append(p)
        taken[p] = True
        total += d[p]
    return torch.tensor(selected, dtype=torch.long, device=dist.device)


@register
@dataclass
class ToDRE(Method):
    """ToDRE, stage 1 (arXiv 2505.18757; no official code found): diversity selection after the vision encoder.

    Stage ``projector``: the selection reads the projected tokens ``Z`` [n, D] (the LM-space tokens the paper's
    stage 2 later scores against text; *unverified* whether the paper measures diversity before or after the
    projector). Variants (``variant``):

    - ``"kcenter"`` (v1): greedy k-center (``ops.greedy_max_min``): each step adds the token farthest from the
      selected set. First pick (*unverified*, the paper does not say): the token whose nearest neighbour is
      farthest, as DivPrune; with ``metric="cosine"`` this variant then equals DivPrune.
    - ``"maxsum"`` (v2): greedy max-sum diversification: start from the farthest pair, then add the token with the
      largest summed distance to the selected set (no quality term; *unverified*).

    Distance (``metric``): ``"cosine"`` (default) ``1 - cos(Z_a, Z_b)``. Why: projected LLaVA/Qwen tokens carry a few
    high-norm outliers, and Euclidean k-center would spend the budget on norm extremes rather than on distinct
    content; cosine also matches the LM's dot-product attention and DivPrune, the baseline ToDRE builds on.
    ``"euclidean"`` is offered for the textbook k-center.

    Budget: ``keep`` tokens per image (paper: about 10% kept after the encoder). LLaVA-NeXT ``image_newline``
    tokens are kept on top of the budget (no official code to follow). Positions: contiguous (``reindex``) on
    LLaVA, original M-RoPE ids on Qwen. Stage 2 (in-LLM "information migration" by text relevance, which may drop
    every visual token late in the LLM) is a separate ``llm`` method that reuses :meth:`diverse_subset`.
    """

    variant: str = "kcenter"
    metric: str = "cosine"

    name = "todre"
    stage = "projector"
    needs = frozenset({"features"})
    paper = "ToDRE: token diversity and task relevance for visual token pruning"
    arxiv = "2505.18757"
    fidelity = "paper only, no official code: first pick, distance and feature space are unverified choices"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.variant not in VARIANTS:
            raise MethodError(f"todre: variant={self.variant!r}: choose one of {VARIANTS}")
        if self.metric not in METRICS:
            raise MethodError(f"todre: metric={self.metric!r}: choose one of {METRICS}")

    def diverse_subset(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """Indices [k] into the rows of ``x`` chosen by this variant, in selection order."""
        dist = distance_matrix(x, self.metric)
        if self.variant == "kcenter":
            return greedy_max_min(None, k, distances=dist, first="farthest_neighbour")
        return greedy_max_sum(dist, k)

    def select(self, ctx: ImageContext, k: int) -> torch.Tensor:
        lines = torch.nonzero(ctx.always_keep).flatten()
        cand = torch.nonzero(~ctx.always_keep).flatten()
        return torch.cat([lines, cand[self.diverse_subset(ctx.features[cand], min(k, cand.numel()))]])

"""Maximal marginal relevance (IDPruner): importance against redundancy with what is already picked."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._common import _LAZY_ROW_COST, _argmax_stable_order, _check_k, _compute_dtype, _normalise_rows
from .selection import cosine_similarity_matrix


def mmr(
    importance: Tensor,
    x: Tensor,
    k: int,
    lam: float = 0.5,
    parallel_k: int = 1,
    *,
    similarity: Tensor | None = None,
    lazy: bool | None = None,
    eps: float = 1e-8,
) -> Tensor:
    """Maximal marginal relevance (IDPruner).

    Step 0 picks by ``importance`` alone. Every later step scores the unselected tokens by
    ``lam * importance[i] - (1 - lam) * max_{j in selected} sim(i, j)`` and picks the best ``parallel_k``
    (fewer on the last step). The running max-similarity vector starts at -2, as in AngelSlim, and is updated
    with one similarity column per picked token. ``sim`` is cosine similarity of the rows of ``x`` (rows
    normalised with a norm floor ``eps``; AngelSlim adds 1e-8 to the norm instead, which differs only for
    near-zero rows). Ties go to the lower index.

    Parameters
    ----------
    importance : Tensor, shape [N]
        Finite importance scores (IDPruner: min-max normalised selector scores).
    x : Tensor, shape [N, D]
        Features for the similarity (post-projector embeddings).
    k : int
        Number of tokens to select, ``0 <= k <= N``.
    lam : float
        Weight of importance against redundancy.
    parallel_k : int
        Tokens picked per greedy step.
    similarity : Tensor, shape [N, N], optional
        Precomputed similarity to use instead of cosine on ``x``; column ``j`` is read when ``j`` is picked.
    lazy : bool, optional
        Compute one similarity row per picked token from ``x`` instead of the full matrix. None chooses the
        cheaper one (lazy when ``k * 12 < N`` and no ``similarity`` is given).
    eps : float
        Lower bound on row norms.

    Returns
    -------
    LongTensor, shape [k]
        Selected indices in selection order (within a parallel step, best first).
    """
    if importance.dim() != 1:
        raise ValueError(f"importance must be [N], got shape {tuple(importance.shape)}")
    n, device = importance.shape[0], importance.device
    if x.shape[0] != n:
        raise ValueError(f"x has {x.shape[0]} rows, importance has {n}")
    if parallel_k < 1:
        raise ValueError(f"parallel_k must be >= 1, got {parallel_k}")
    _check_k(k, n)
    if k == 0:
        return torch.empty(0, dtype=torch.long, device=device)
    imp = importance.to(torch.promote_types(_compute_dtype(importance), torch.float32))
    if not torch.isfinite(imp).all():
        raise ValueError("importance must be finite")

    if lazy is None:
        lazy = similarity is None and k * _LAZY_ROW_COST < n
    if lazy and similarity is not None:
        raise ValueError("lazy mode computes similarity from x; do not pass similarity")
    xn: Tensor | None = None
    sim: Tensor | None = None
    if lazy:
        xn = _normalise_rows(x, eps)
    else:
        sim = cosine_similarity_matrix(x, eps) if similarity is None else similarity.to(_compute_dtype(similarity))

    def sim_to(idx: Tensor) -> Tensor:
        """Similarity of every token to the tokens ``idx``, shape [N, len(idx)]."""
        if sim is not None:
            return sim.index_select(1, idx)
        assert xn is not None
        return xn @ xn[idx].T

    selected = torch.empty(k, dtype=torch.long, device=device)
    taken = torch.zeros(n, dtype=torch.bool, device=device)
    max_sim = torch.full((n,), -2.0, dtype=imp.dtype, device=device)
    imp_term = lam * imp
    n_sel = 0
    while n_sel < k:
        step = min(parallel_k, k - n_sel)
        score = imp.clone() if n_sel == 0 else imp_term - (1.0 - lam) * max_sim
        score.masked_fill_(taken, -math.inf)
        best = _argmax_stable_order(score, step)
        selected[n_sel : n_sel + step] = best
        taken[best] = True
        n_sel += step
        if n_sel < k:
            torch.maximum(max_sim, sim_to(best).amax(dim=1).to(max_sim.dtype), out=max_sim)
    return selected

"""Greedy diversity rules: max-min diversity (DivPrune, ZOO-Prune's SADS, k-center) and its sum-fusion variant.

Each keeps a running per-candidate minimum distance and updates it with one row per step.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._common import _LAZY_ROW_COST, _check_k, _compute_dtype, _normalise_rows
from .selection import cosine_distance_matrix


def _second_smallest_per_column(dist: Tensor) -> Tensor:
    """Second-smallest entry of every column of a square matrix, shape [N].

    When every diagonal entry is its column's minimum (true for distances: self-distance 0), the answer is
    the minimum over the off-diagonal entries, which ``amin`` gives several times faster than a column-wise
    ``topk`` on a row-major matrix. The diagonal is masked in place and restored.
    """
    diag = dist.diagonal()
    if bool((diag <= dist.amin(dim=0)).all()):
        saved = diag.clone()
        try:
            diag.fill_(math.inf)
            return dist.amin(dim=0)
        finally:
            diag.copy_(saved)
    return torch.topk(dist, 2, dim=0, largest=False).values[1]


def greedy_max_min(
    x: Tensor | None,
    k: int,
    *,
    distances: Tensor | None = None,
    weights: Tensor | None = None,
    first: str | int = "farthest_neighbour",
    lazy: bool | None = None,
    eps: float = 1e-8,
) -> Tensor:
    """Greedy (weighted) max-min diversity selection: DivPrune, ZOO-Prune SADS, k-center.

    Step 0 picks ``first`` (see below). Step ``t > 0`` picks
    ``argmax_i weights[i] * min_{p in selected} D(p, i)`` over the unselected tokens (selected tokens are
    masked, so none is picked twice even when every remaining score is 0). Ties go to the lower index.
    ``D`` is ``distances`` when given, otherwise the cosine distance ``1 - cos`` of the rows of ``x``.

    A running ``[N]`` vector of minimum distances is updated with one row of ``D`` per step, so the loop is
    ``O(k N)`` once ``D`` exists. In the lazy mode ``D`` is never built: each step computes the one row it
    needs as a matvec on the normalised features, ``O(k N D)`` in total instead of ``O(N^2 D)``.

    Parameters
    ----------
    x : Tensor, shape [N, D], or None
        Features; needed unless ``distances`` is given.
    k : int
        Number of tokens to select, ``0 <= k <= N``.
    distances : Tensor, shape [N, N], optional
        Precomputed distances (e.g. :func:`cosine_distance_matrix`); row ``p`` is read when ``p`` is picked,
        so an asymmetric matrix is read as ``D[selected, candidate]`` (DivPrune's convention).
    weights : Tensor, shape [N], optional
        Non-negative, finite per-token multipliers (SADS: min-max-normalised sensitivity). None means 1.
    first : {"farthest_neighbour", "max_weight"} or int
        First pick. ``"farthest_neighbour"`` (DivPrune): ``argmax_j`` of the second-smallest entry of column
        ``j`` of ``D``, i.e. the token whose nearest neighbour is farthest. ``"max_weight"`` (SADS):
        ``argmax weights``. An int picks that index.
    lazy : bool, optional
        Force (True) or forbid (False) the lazy row-per-step mode. None chooses the cheaper one: lazy when
        ``x`` is given, ``distances`` is not, ``first`` does not need the full matrix, and
        ``k * 12 < N`` (a matvec row costs about 12 GEMM rows).
    eps : float
        Lower bound on row norms for the cosine distance.

    Returns
    -------
    LongTensor, shape [k]
        Selected indices in selection order, on the input device.
    """
    if distances is None and x is None:
        raise ValueError("give x or distances")
    if distances is not None:
        if distances.dim() != 2 or distances.shape[0] != distances.shape[1]:
            raise ValueError(f"distances must be [N, N], got shape {tuple(distances.shape)}")
        n, device = distances.shape[0], distances.device
    else:
        assert x is not None
        if x.dim() != 2:
            raise ValueError(f"x must be [N, D], got shape {tuple(x.shape)}")
        n, device = x.shape[0], x.device
    _check_k(k, n)
    if k == 0:
        return torch.empty(0, dtype=torch.long, device=device)

    w: Tensor | None = None
    if weights is not None:
        if weights.shape != (n,):
            raise ValueError(f"weights must have shape [{n}], got {tuple(weights.shape)}")
        w = weights.to(device=device, dtype=torch.promote_types(_compute_dtype(weights), torch.float32))
        if not torch.isfinite(w).all():
            raise ValueError("weights must be finite")

    needs_matrix = first == "farthest_neighbour"
    if lazy is None:
        lazy = distances is None and not needs_matrix and k * _LAZY_ROW_COST < n
    if lazy and (distances is not None or needs_matrix):
        raise ValueError("lazy mode needs x, no distances, and first != 'farthest_neighbour'")

    xn: Tensor | None = None
    dist: Tensor | None = None
    if lazy:
        assert x is not None
        xn = _normalise_rows(x, eps)
    else:
        dist = cosine_distance_matrix(x, eps) if distances is None else distances.to(_compute_dtype(distances))

    def row(p: Tensor) -> Tensor:
        """Distances from token ``p`` to every token, shape [N]."""
        if dist is not None:
            return dist[p]
        assert xn is not None
        r = (xn @ xn[p]).clamp_(-1.0, 1.0).neg_().add_(1.0)
        r[p] = 0.0  # same convention as cosine_distance_matrix's diagonal
        return r

    # First pick.
    if isinstance(first, int) and not isinstance(first, bool):
        if not 0 <= first < n:
            raise ValueError(f"first index {first} out of range [0, {n})")
        p = torch.tensor(first, device=device)
    elif first == "max_weight":
        if w is None:
            raise ValueError("first='max_weight' needs weights")
        p = w.argmax()
    elif first == "farthest_neighbour":
        assert dist is not None
        if n == 1:
            p = torch.tensor(0, device=device)
        else:
            p = _second_smallest_per_column(dist).argmax()
    else:
        raise ValueError(f"unknown first={first!r}")

    selected = torch.empty(k, dtype=torch.long, device=device)
    selected[0] = p
    taken = torch.zeros(n, dtype=torch.bool, device=device)
    taken[p] = True
    min_dist = row(p).clone()
    for t in range(1, k):
        score = min_dist * w if w is not None else min_dist.clone()
        score.masked_fill_(taken, -math.inf)
        p = score.argmax()
        selected[t] = p
        taken[p] = True
        torch.minimum(min_dist, row(p), out=min_dist)
    return selected


def greedy_sum_fusion(z: Tensor, weights: Tensor, k: int) -> Tensor:
    """SADS with sum fusion (ZOO-Prune's ablation): first ``argmax w``, then
    ``argmax_i w(i) + min_{p in P} (1 - cos(z_i, z_p))`` over the unpicked tokens.

    One matvec per step on the normalised features and a running minimum distance; ties go to the lower index.

    Parameters
    ----------
    z : Tensor, shape [n, D]
        Features whose cosine distance measures diversity.
    weights : Tensor, shape [n]
        Per-token weights (ZOO-Prune: min-max-normalised sensitivity).
    k : int
        Picks, ``1 <= k <= n``.

    Returns
    -------
    LongTensor, shape [k]
        Indices in pick order.
    """
    if not 1 <= k <= z.shape[0]:
        raise ValueError(f"k must lie in [1, {z.shape[0]}], got {k}")
    zn = z.float()
    zn = zn / zn.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    w = weights.to(device=z.device, dtype=torch.float32)
    n = zn.shape[0]
    picked = torch.empty(k, dtype=torch.long, device=z.device)
    taken = torch.zeros(n, dtype=torch.bool, device=z.device)
    min_dist = torch.full((n,), float("inf"), device=z.device)
    p = w.argmax()
    for t in range(k):
        picked[t] = p
        taken[p] = True
        if t == k - 1:
            break
        row = (zn @ zn[p]).clamp_(-1.0, 1.0).neg_().add_(1.0)
        torch.minimum(min_dist, row, out=min_dist)
        p = (w + min_dist).masked_fill(taken, float("-inf")).argmax()
    return picked

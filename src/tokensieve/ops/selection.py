"""Shared, vectorised token-selection rules.

Every greedy rule here keeps a running per-candidate state (minimum distance, maximum similarity, best
coverage) and updates it with one row or one column per step, so a step costs ``O(N)`` (or ``O(N D)`` in the
lazy mode) rather than re-reducing over everything selected so far. Inputs of any floating dtype are computed
in float32 (float64 stays float64); indices come back as ``torch.long`` on the input device.

The rules are the ones specified in ``/work/shared/research/pruning-methods.md``:

- :func:`greedy_max_min`: DivPrune (max-min diversity), ZOO-Prune's SADS (sensitivity-weighted max-min),
  ToDRE's k-center.
- :func:`mmr`: IDPruner's maximal marginal relevance.
- :func:`max_coverage`: MMTok's greedy max coverage.
- :func:`facility_location`: CATP stage 1 (facility location plus a modular alignment term).
- :func:`density_peak_clusters` / :func:`merge_by_assignment`: SparseVLM's token recycling (DPC-KNN).
"""

from __future__ import annotations

import math
import os

import torch
from torch import Tensor

__all__ = [
    "topk_indices",
    "cosine_similarity_matrix",
    "cosine_distance_matrix",
    "greedy_max_min",
    "mmr",
    "max_coverage",
    "facility_location",
    "density_peak_clusters",
    "merge_by_assignment",
]

# One matvec row costs roughly 8-16x one row of a GEMM on CPU (memory bound vs compute bound; measured in
# scripts/bench_ops.py), so the lazy row-per-step mode only pays off when k is well below N / 12.
_LAZY_ROW_COST = 12

# Coverage / facility location keep every candidate's gain up to date incrementally: each step reads only the
# rows of the items the last pick improved, this many rows at a time (bounded buffers; no page-faulting
# [M, N] temporaries when a pick improves most items).
_COVERAGE_ROW_CHUNK = 256
# Candidates whose running gain lies within this fraction of the largest initial gain of the best one are
# re-evaluated from scratch before a pick, so that rounding in the running gains never changes the greedy choice.
# Their error stays well below it: float32 sums of the initial gains and of small per-step terms in
# [0, new - old], accumulated in float64.
_COVERAGE_TIE_WINDOW = 1e-5


def _compute_dtype(t: Tensor) -> torch.dtype:
    """float32 for half/bfloat16/float32 inputs, float64 for float64 inputs."""
    return torch.promote_types(t.dtype, torch.float32) if t.is_floating_point() else torch.float32


def _check_k(k: int, n: int) -> None:
    if not isinstance(k, int) or isinstance(k, bool):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if k < 0 or k > n:
        raise ValueError(f"k must be in [0, {n}], got {k}")


def _normalise_rows(x: Tensor, eps: float = 1e-8) -> Tensor:
    """Rows scaled to unit L2 norm; a zero row stays zero instead of becoming NaN."""
    x = x.to(_compute_dtype(x))
    return x / x.norm(dim=-1, keepdim=True).clamp_min(eps)


def _argmax_stable_order(scores: Tensor, k: int) -> Tensor:
    """Indices of the ``k`` largest scores in descending order, ties broken by the lower index.

    ``torch.topk`` does not promise an order among equal values; a stable descending sort does.
    """
    if k == 1:
        return scores.argmax().reshape(1)
    return torch.sort(scores, descending=True, stable=True).indices[:k]


def topk_indices(scores: Tensor, k: int) -> Tensor:
    """Indices of the ``k`` highest scores, sorted ascending.

    Ties are broken by the lower index, so the result is deterministic. NaN scores rank below every number.

    Parameters
    ----------
    scores : Tensor, shape [N]
        Any real dtype.
    k : int
        Number of indices to return, ``0 <= k <= N``.

    Returns
    -------
    LongTensor, shape [k]
        Selected indices in increasing order, on ``scores.device``.
    """
    if scores.dim() != 1:
        raise ValueError(f"scores must be 1-D, got shape {tuple(scores.shape)}")
    _check_k(k, scores.shape[0])
    s = scores.to(_compute_dtype(scores))
    s = torch.nan_to_num(s, nan=-math.inf)
    order = torch.sort(s, descending=True, stable=True).indices[:k]
    return torch.sort(order).values


def cosine_similarity_matrix(x: Tensor, eps: float = 1e-8) -> Tensor:
    """Pairwise cosine similarity of the rows of ``x``.

    Computed as a single GEMM on L2-normalised rows (never an ``[N, N, D]`` broadcast). A zero row has
    similarity 0 to every row (including itself). Values are clamped to ``[-1, 1]``.

    Parameters
    ----------
    x : Tensor, shape [N, D]
        Features in any floating dtype.
    eps : float
        Lower bound on row norms.

    Returns
    -------
    Tensor, shape [N, N]
        float32 (float64 for float64 input).
    """
    if x.dim() != 2:
        raise ValueError(f"x must be [N, D], got shape {tuple(x.shape)}")
    xn = _normalise_rows(x, eps)
    return (xn @ xn.T).clamp_(-1.0, 1.0)


def cosine_distance_matrix(x: Tensor, eps: float = 1e-8) -> Tensor:
    """Pairwise cosine distance ``1 - cos(x_i, x_j)`` of the rows of ``x``.

    The diagonal is set to exactly 0 (a token's distance to itself), which rounding would otherwise leave at
    about 1e-7, and values are clamped to ``[0, 2]``.

    Parameters
    ----------
    x : Tensor, shape [N, D]
        Features in any floating dtype.
    eps : float
        Lower bound on row norms.

    Returns
    -------
    Tensor, shape [N, N]
        float32 (float64 for float64 input).
    """
    d = cosine_similarity_matrix(x, eps).neg_().add_(1.0)
    d.fill_diagonal_(0.0)
    return d


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


# The coverage greedy runs as a compiled kernel on CPU tensors when numba is installed (a dependency of the
# package); TOKENSIEVE_NUMBA=0 (or setting this to False) forces the torch loop, which GPU tensors always use.
USE_NUMBA = os.environ.get("TOKENSIEVE_NUMBA", "1") != "0"


def _numba_coverage():
    """The compiled coverage kernel, or None (numba missing or disabled)."""
    if not USE_NUMBA:
        return None
    try:
        from . import _coverage_numba
    except ImportError:
        return None
    return _coverage_numba


def _check_finite(items: Tensor, bonus: Tensor | None) -> None:
    """Both coverage backends refuse non-finite input with the same error: a NaN/inf gain has no greedy order
    (the compiled kernel would repeat index 0, the torch loop return arbitrary distinct indices)."""
    bad = ~torch.isfinite(items)
    if bool(bad.any()) or (bonus is not None and not bool(torch.isfinite(bonus).all())):
        where = torch.nonzero(bad.any(dim=0)).flatten()[:8].tolist() if bool(bad.any()) else "the bonus"
        raise ValueError(
            f"coverage greedy: the coverage matrix has NaN or inf entries (candidate columns {where}); some "
            f"feature rows are not finite. Check the model's visual features (dtype overflow, NaN pixels)."
        )


def _greedy_coverage(items: Tensor, k: int, bonus: Tensor | None, candidates: Tensor | None = None) -> Tensor:
    """Greedy maximisation of ``sum_r max_{j in S} items[r, j] + sum_{j in S} bonus[j]``.

    ``items`` is [M, N], item-major: row ``r`` is how well each of the N candidates covers item ``r``;
    ``candidates`` is the same matrix candidate-major ([N, M]) when the caller has it (cheaper rows). The best
    coverage of every item starts at 0; the gain of ``j`` is ``sum_r relu(items[r, j] - best[r]) + bonus[j]``.

    Instead of re-evaluating candidates (lazy greedy), the gains of all candidates are kept current: a pick
    raises ``best`` only on the items ``R`` it covers better, and there every candidate's gain falls by
    ``sum_{r in R} clamp(items[r, j], old_r, new_r) - old_r``: one pass over ``[|R|, N]`` per step, and ``|R|``
    shrinks fast (2880 random 4096-d tokens, k = 320: 17k item rows in all, against 45k candidate evaluations
    of 2880 items for lazy greedy), with a handful of kernel launches per step. Rounding in the running gains
    cannot change a pick: when the best two are within ``_COVERAGE_TIE_WINDOW`` of each other, every candidate
    that close to the best is evaluated from scratch (float64 sums) and the best of those wins (ties: lowest
    index, as the plain greedy).

    On CPU tensors the same loop runs compiled (``ops._coverage_numba``: one fused pass per step instead of about
    twenty kernel launches); GPU tensors, or ``USE_NUMBA = False`` / ``TOKENSIEVE_NUMBA=0``, run the torch loop.
    """
    m, n = items.shape
    device = items.device
    if k == 0:
        return torch.empty(0, dtype=torch.long, device=device)
    _check_finite(items, bonus)
    kernel = _numba_coverage() if device.type == "cpu" else None
    if kernel is not None:
        picks = kernel.run(
            items.detach().contiguous().numpy(),
            None if candidates is None else candidates.detach().contiguous().numpy(),
            None if bonus is None else bonus.detach().to(torch.float64).numpy(),
            k,
            _COVERAGE_TIE_WINDOW,
            torch.get_num_threads(),
        )
        return torch.from_numpy(picks).to(device)
    best = torch.zeros(m, dtype=items.dtype, device=device)

    def column(j: int) -> Tensor:
        return candidates[j] if candidates is not None else items[:, j]

    def exact(cols: Tensor) -> Tensor:
        if candidates is not None:
            gain = candidates.index_select(0, cols).sub_(best).clamp_(min=0).sum(dim=1, dtype=torch.float64)
        else:
            gain = items.index_select(1, cols).sub_(best[:, None]).clamp_(min=0).sum(dim=0, dtype=torch.float64)
        return gain if bonus is None else gain + bonus[cols]

    if bool(items.min() >= 0):  # the usual case (softmax rows, rescaled cosine): no clamped copy
        gain = items.sum(dim=0).to(torch.float64)
    else:  # negative entries never cover anything
        gain = torch.zeros(n, dtype=torch.float64, device=device)
        for start in range(0, m, _COVERAGE_ROW_CHUNK):
            gain += items[start : start + _COVERAGE_ROW_CHUNK].clamp(min=0).sum(dim=0)
    if bonus is not None:
        gain += bonus
    window = float(gain.abs().max()) * _COVERAGE_TIE_WINDOW
    picks: list[int] = []
    for t in range(k):
        values, indices = (v.tolist() for v in torch.topk(gain, min(2, n)))  # one host sync per step
        top, second, j = values[0], values[1] if n > 1 else -math.inf, indices[0]
        if top - second <= window:  # a near-tie (or a rounding-sized gap): settle it on fresh gains
            near = torch.nonzero(gain >= top - window).flatten()
            j = int(near[exact(near).argmax()])
        picks.append(j)
        gain[j] = -math.inf  # never picked again
        if t == k - 1:
            break
        row = column(j)
        improved = torch.nonzero(row > best).flatten()
        for rows in improved.split(_COVERAGE_ROW_CHUNK):
            # clamp(items[rows], old, new) - old, summed per candidate; maximum + minimum, as a clamp with
            # tensor bounds is several times slower on CPU
            old = best[rows]
            covered = torch.maximum(items.index_select(0, rows), old[:, None])
            torch.minimum(covered, row[rows][:, None], out=covered)
            covered.sub_(old[:, None])  # small terms in [0, new - old]: their float32 sum is accurate
            gain.sub_(covered.sum(dim=0))
        torch.maximum(best, row, out=best)
    return torch.tensor(picks, dtype=torch.long, device=device)


def max_coverage(C: Tensor, k: int) -> Tensor:
    """Greedy max coverage (MMTok).

    Maximises ``sum_r max_{j in S} C[r, j]`` greedily: each step picks
    ``argmax_j sum_r relu(C[r, j] - best[r])`` over unselected columns (ties to the lower index), then sets
    ``best = max(best, C[:, j*])``; ``best`` starts at 0, so negative entries never contribute. The gains are
    kept current incrementally (see ``_greedy_coverage``), with the same picks as recomputing every gain at
    every step.

    Parameters
    ----------
    C : Tensor, shape [M, N]
        Coverage matrix: M items to cover (MMTok: text rows P stacked on scaled vision rows alpha*Q), N
        candidate tokens. Entries are expected to be non-negative.
    k : int
        Number of columns to select, ``0 <= k <= N``.

    Returns
    -------
    LongTensor, shape [k]
        Selected column indices in selection order.
    """
    if C.dim() != 2:
        raise ValueError(f"C must be [M, N], got shape {tuple(C.shape)}")
    _check_k(k, C.shape[1])
    return _greedy_coverage(C.to(_compute_dtype(C)).contiguous(), k, None)  # C is item-major already


def facility_location(
    sim: Tensor,
    k: int,
    modular: Tensor | None = None,
    lam: float = 0.0,
    symmetric: bool = False,
) -> Tensor:
    """Greedy facility location with a modular term (CATP stage 1).

    Maximises ``F(Y) = sum_x max_{y in Y} sim[y, x] + lam * sum_{y in Y} modular[y]`` greedily: the
    marginal gain of ``y`` is ``sum_x relu(sim[y, x] - best[x]) + lam * modular[y]`` with ``best`` starting
    at 0. Ties go to the lower index; selected candidates are never picked again.

    Parameters
    ----------
    sim : Tensor, shape [N, N]
        Similarity of candidate ``y`` (row) to item ``x`` (column), assumed in ``[0, 1]`` (CATP: cosine
        rescaled as ``(cos + 1) / 2``); negative entries behave as 0.
    k : int
        Number of tokens to select, ``0 <= k <= N``.
    modular : Tensor, shape [N], optional
        Per-candidate bonus (CATP: ``ŝim(y, mean(text))``).
    lam : float
        Weight of the modular term (CATP's lambda_1 = 0.7).
    symmetric : bool
        Promise that ``sim`` equals its transpose (a similarity of a set with itself, as CATP's), which saves
        one [N, N] transposed copy. Not checked: with an asymmetric ``sim`` the picks would be wrong.

    Returns
    -------
    LongTensor, shape [k]
        Selected indices in selection order.
    """
    if sim.dim() != 2 or sim.shape[0] != sim.shape[1]:
        raise ValueError(f"sim must be [N, N], got shape {tuple(sim.shape)}")
    n = sim.shape[0]
    _check_k(k, n)
    dtype = _compute_dtype(sim)
    bonus = None
    if modular is not None and lam != 0.0:
        if modular.shape != (n,):
            raise ValueError(f"modular must have shape [{n}], got {tuple(modular.shape)}")
        bonus = lam * modular.to(device=sim.device, dtype=dtype)
    sim = sim.to(dtype).contiguous()  # candidate-major
    # The per-step reads are rows of items: sim itself when symmetric, else one transposed copy.
    items = sim if symmetric else sim.T.contiguous()
    return _greedy_coverage(items, k, bonus, candidates=sim)


def _euclidean_distance_matrix(x: Tensor) -> Tensor:
    """``||x_i - x_j||`` via the Gram matrix (no [N, N, D] broadcast), diagonal exactly 0."""
    sq = (x * x).sum(dim=1)
    d2 = (sq[:, None] + sq[None, :]).sub_(x @ x.T, alpha=2.0).clamp_(min=0)
    d = d2.sqrt_()
    d.fill_diagonal_(0.0)
    return d


def density_peak_clusters(x: Tensor, n_clusters: int, knn: int = 5) -> Tensor:
    """Density-peak clustering with k-nearest-neighbour density (DPC-KNN), as in SparseVLM's recycling.

    1. ``dist = ||x_i - x_j|| / sqrt(D)``.
    2. ``density_i = exp(-mean_{j in kNN(i)} dist_ij^2)``; the ``knn`` neighbours include the point itself
       (TCFormer / SparseVLM convention).
    3. ``delta_i`` = distance to the nearest denser point; the densest point gets the largest distance in
       the matrix.
    4. Centres = the ``n_clusters`` points with the largest ``delta * density``.
    5. Every point joins its nearest centre; each centre joins its own cluster.

    Deviation for determinism: the reference code adds ``rand * 1e-6`` to the density to break ties; here
    ties are broken by index (the lower index counts as denser, and wins equal centre scores).

    Parameters
    ----------
    x : Tensor, shape [n, D]
        Tokens to cluster.
    n_clusters : int
        Number of clusters, ``1 <= n_clusters <= n``.
    knn : int
        Neighbours for the density (clamped to ``n``).

    Returns
    -------
    LongTensor, shape [n]
        Cluster id in ``[0, n_clusters)`` of every token; cluster ``c`` is the ``c``-th centre by score.
    """
    if x.dim() != 2:
        raise ValueError(f"x must be [n, D], got shape {tuple(x.shape)}")
    n, dim = x.shape
    if not 1 <= n_clusters <= n:
        raise ValueError(f"n_clusters must be in [1, {n}], got {n_clusters}")
    if knn < 1:
        raise ValueError(f"knn must be >= 1, got {knn}")
    xf = x.to(_compute_dtype(x))
    dist = _euclidean_distance_matrix(xf) / math.sqrt(dim)
    near = torch.topk(dist, min(knn, n), dim=1, largest=False).values
    density = torch.exp(-(near * near).mean(dim=1))

    # rank 0 = densest; equal densities rank by index, so "denser" is a strict total order.
    order = torch.sort(density, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank[order] = torch.arange(n, device=x.device)
    denser = rank[None, :] < rank[:, None]  # denser[i, j]: j is denser than i
    dist_max = dist.max()
    delta = torch.where(denser, dist, dist_max).amin(dim=1)
    score = delta * density

    centres = torch.sort(score, descending=True, stable=True).indices[:n_clusters]
    assign = dist[centres].argmin(dim=0)
    assign[centres] = torch.arange(n_clusters, device=x.device)
    return assign


def merge_by_assignment(x: Tensor, assign: Tensor, n_clusters: int | None = None) -> Tensor:
    """Mean of the tokens in each cluster.

    Parameters
    ----------
    x : Tensor, shape [n, D]
        Tokens.
    assign : LongTensor, shape [n]
        Cluster id of each token (e.g. from :func:`density_peak_clusters`).
    n_clusters : int, optional
        Number of clusters; defaults to ``assign.max() + 1``. An empty cluster gives a zero row.

    Returns
    -------
    Tensor, shape [n_clusters, D]
        Cluster means, in ``x.dtype`` (accumulated in float32).
    """
    if x.dim() != 2 or assign.shape != (x.shape[0],):
        raise ValueError(f"need x [n, D] and assign [n], got {tuple(x.shape)} and {tuple(assign.shape)}")
    if n_clusters is None:
        n_clusters = int(assign.max().item()) + 1 if assign.numel() else 0
    xf = x.to(_compute_dtype(x))
    sums = torch.zeros(n_clusters, x.shape[1], dtype=xf.dtype, device=x.device)
    sums.index_add_(0, assign, xf)
    counts = torch.bincount(assign, minlength=n_clusters).clamp_(min=1).to(xf.dtype)
    return (sums / counts[:, None]).to(x.dtype)

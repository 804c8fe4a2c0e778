"""Shared, vectorised token-selection rules.

Every greedy rule here keeps a running per-candidate state (minimum distance, maximum similarity, best
coverage) and updates it with one row or one column per step, so a step costs ``O(N)`` (or ``O(N D)`` in the
lazy mode) rather than re-reducing over everything selected so far. Inputs of any floating dtype are computed
in float32 (float64 stays float64); indices come back as ``torch.long`` on the input device.

The rules are the ones specified in ``/work/shared/research/pruning-methods.md``:

- :func:`max_coverage`: MMTok's greedy max coverage.
- :func:`facility_location`: CATP stage 1 (facility location plus a modular alignment term).

Elsewhere in ``tokensieve.ops``: ``diversity`` (DivPrune / SADS / k-center max-min, sum fusion), ``relevance``
(IDPruner's MMR), ``clustering`` (SparseVLM's DPC-KNN recycling).
"""

from __future__ import annotations

import math
import os

import torch
from torch import Tensor

from ._common import _check_k, _compute_dtype, _normalise_rows

__all__ = ["topk_indices", "cosine_similarity_matrix", "cosine_distance_matrix", "max_coverage", "facility_location"]

# Coverage / facility location keep every candidate's gain up to date incrementally: each step reads only the
# rows of the items the last pick improved, this many rows at a time (bounded buffers; no page-faulting
# [M, N] temporaries when a pick improves most items).
_COVERAGE_ROW_CHUNK = 256
# Candidates whose running gain lies within this fraction of the largest initial gain of the best one are
# re-evaluated from scratch before a pick, so that rounding in the running gains never changes the greedy choice.
# Their error stays well below it: float32 sums of the initial gains and of small per-step terms in
# [0, new - old], accumulated in float64.
_COVERAGE_TIE_WINDOW = 1e-5

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

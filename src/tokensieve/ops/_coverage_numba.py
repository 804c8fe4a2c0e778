"""CPU kernel of the incremental coverage greedy (see ``selection._greedy_coverage`` for the algorithm).

The torch version of the loop spends most of its time in about twenty kernel launches per step and five passes
over the improved item rows; compiled, a step is one fused, branch-free pass over those rows (split over the
threads by candidate blocks) plus two scans of the gains. Same picks as the torch version: float64 running gains,
and near-ties (within ``window`` of the best) settled on gains recomputed from scratch, lowest index first.

Compiled on first use and cached on disk (``cache=True``), so only the first process pays the few seconds.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange


@njit(cache=True, parallel=True)
def _lower_gains(items, improved, n_improved, best, row, gain, n_blocks):  # pragma: no cover - compiled
    """``gain[j] -= sum_{r in improved} clamp(items[r, j], best[r], row[r]) - best[r]``, candidates in blocks."""
    n = items.shape[1]
    block = (n + n_blocks - 1) // n_blocks
    for b in prange(n_blocks):
        lo = b * block
        hi = min(n, lo + block)
        for i in range(n_improved):
            r = improved[i]
            old = best[r]
            new = row[r]
            for j in range(lo, hi):  # branch-free, so it vectorises
                gain[j] -= min(max(items[r, j], old), new) - old


@njit(cache=True)
def greedy_coverage(items, candidates, has_candidates, bonus, k, window_rel, n_blocks):  # pragma: no cover
    """Picks [k] maximising ``sum_r max_{j in S} items[r, j] + sum_{j in S} bonus[j]`` greedily.

    ``items`` [M, N] item-major; ``candidates`` [N, M] the same matrix candidate-major when ``has_candidates``
    (any array otherwise); ``bonus`` [N] float64 (zeros for none).
    """
    m, n = items.shape
    best = np.zeros(m, dtype=items.dtype)
    gain = bonus.copy()
    for r in range(m):
        for j in range(n):
            gain[j] += max(items[r, j], 0.0)  # negative entries never cover anything
    window = np.abs(gain).max() * window_rel
    picks = np.empty(k, dtype=np.int64)
    improved = np.empty(m, dtype=np.int64)
    row = np.empty(m, dtype=items.dtype)
    for t in range(k):
        top, second, j = -np.inf, -np.inf, 0
        for c in range(n):
            g = gain[c]
            if g > top:
                second, top, j = top, g, c
            elif g > second:
                second = g
        if top - second <= window:  # near-tie: settle it on gains recomputed from scratch
            near = np.flatnonzero(gain >= top - window)
            exact = bonus[near].copy()
            if has_candidates:
                for i in range(near.size):
                    for r in range(m):
                        exact[i] += max(candidates[near[i], r] - best[r], 0.0)
            else:
                for r in range(m):
                    for i in range(near.size):
                        exact[i] += max(items[r, near[i]] - best[r], 0.0)
            j = near[np.argmax(exact)]  # first maximum: the lowest index
        picks[t] = j
        gain[j] = -np.inf  # never picked again
        if t == k - 1:
            break
        n_improved = 0
        for r in range(m):
            v = candidates[j, r] if has_candidates else items[r, j]
            row[r] = v
            if v > best[r]:
                improved[n_improved] = r
                n_improved += 1
        _lower_gains(items, improved, n_improved, best, row, gain, n_blocks)
        for i in range(n_improved):
            best[improved[i]] = row[improved[i]]
    return picks


def run(items: np.ndarray, candidates: np.ndarray | None, bonus: np.ndarray | None, k: int, window_rel: float,
        max_threads: int) -> np.ndarray:  # fmt: skip
    """Picks [k] of :func:`greedy_coverage`; ``candidates`` / ``bonus`` may be None; at most ``max_threads``."""
    n = items.shape[1]
    return greedy_coverage(
        items,
        candidates if candidates is not None else np.zeros((1, 1), items.dtype),
        candidates is not None,
        np.zeros(n) if bonus is None else bonus,
        k,
        window_rel,
        max(1, min(numba.get_num_threads(), max_threads)),
    )

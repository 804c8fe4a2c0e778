"""CPU kernel of the grouped query-key scores used by KV selection (``ops.group_scores``).

For one KV head: out[a, i] = f[a] . k[i] for the g query rows f [g, d] and the keys k [n, d]. BLAS sgemm packs
the big key matrix before multiplying by a handful of rows, so it reads the keys about twice; this loop reads
each key row once and keeps four query rows' partial sums in registers (the rows are processed four at a time,
the caller pads g to a multiple of 4). Memory-bound: its floor is one pass over the keys.

Compiled on first use and cached on disk (``cache=True``).
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, fastmath=True, boundscheck=False, nogil=True)
def scores_rows(k, f, out):  # pragma: no cover - compiled
    """k [n, d] C-contiguous float32, f [g4, d] (g4 % 4 == 0), out [g4, n]."""
    n, d = k.shape
    for a0 in range(0, f.shape[0], 4):
        f0, f1, f2, f3 = f[a0], f[a0 + 1], f[a0 + 2], f[a0 + 3]
        for i in range(n):
            row = k[i]
            s0 = np.float32(0.0)
            s1 = np.float32(0.0)
            s2 = np.float32(0.0)
            s3 = np.float32(0.0)
            for c in range(d):
                x = row[c]
                s0 += f0[c] * x
                s1 += f1[c] * x
                s2 += f2[c] * x
                s3 += f3[c] * x
            out[a0, i] = s0
            out[a0 + 1, i] = s1
            out[a0 + 2, i] = s2
            out[a0 + 3, i] = s3


@njit(cache=True, fastmath=True, boundscheck=False, nogil=True)
def scores_heads(buf, n, f, out):  # pragma: no cover - compiled
    """buf [H, cap, d] C-contiguous float32 (rows 0..n-1 valid), f [H, d], out [H, n]: one query per head."""
    h, _, d = buf.shape
    for j in range(h):
        fj = f[j]
        for i in range(n):
            row = buf[j, i]
            s = np.float32(0.0)
            for c in range(d):
                s += fj[c] * row[c]
            out[j, i] = s

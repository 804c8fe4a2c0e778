"""Benchmark the shared selection rules in tokensieve.ops.

Prints median-of-5 wall times (after one warm-up run) for N in {576, 2880} visual tokens, D = 4096
(LLaVA-7B hidden size), k = N // 9 (about 11%, the 64-of-576 / 320-of-2880 settings). Matrix construction
(similarity / distance / coverage matrix) is timed separately from the greedy loop that consumes it.

A naive reference that mirrors the released ZOO-Prune style, an ``[N, N, D]`` broadcast cosine similarity
followed by a loop that re-reduces over all selected rows each step, is timed once at N = 576 only: at
N = 2880 the broadcast tensor alone would need 2880^2 * 4096 * 4 B = 136 GB.

Usage: ``python scripts/bench_ops.py [--threads T]``; the whole run takes about a minute on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch

from tokensieve.ops import (
    cosine_distance_matrix,
    cosine_similarity_matrix,
    facility_location,
    greedy_max_min,
    max_coverage,
    minmax_normalise,
    mmr,
    selection,
)

D = 4096
SIZES = (576, 2880)
TARGET_MS = 100.0


def timeit(fn: Callable[[], object], repeats: int = 5) -> float:
    """Median wall time in ms of ``repeats`` runs after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def timeit_once(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def naive_zoo_sads(z: torch.Tensor, w: torch.Tensor, k: int) -> torch.Tensor:
    """Broadcast ``[N, N, D]`` cosine similarity plus a loop that re-reduces over the selected rows.

    Mirrors the structure of the released ZOO-Prune / DivPrune greedy (``index_select`` of all selected
    rows and a ``min`` over them at every step: ``O(k^2 N)``). The broadcast is written as one explicit
    product so its peak memory is a single ``[N, N, D]`` tensor (``F.cosine_similarity`` on broadcast
    views peaks about 3x higher).
    """
    norms = z.norm(dim=-1)
    sim = (z[:, None, :] * z[None, :, :]).sum(-1) / (norms[:, None] * norms[None, :]).clamp_min(1e-8)
    dist = 1.0 - sim
    n = z.shape[0]
    selected = torch.empty(k, dtype=torch.long)
    for i in range(k):
        if i == 0:
            scores = w
        else:
            scores = torch.index_select(dist, 0, selected[:i]).min(dim=0).values * w
        mask = torch.ones(n, dtype=torch.bool)
        if i > 0:
            mask[selected[:i]] = False
        selected[i] = torch.argmax(scores.masked_fill(~mask, float("-inf")))
    return selected


def mmtok_coverage_matrix(v: torch.Tensor, v_pre: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """MMTok's ``C = [P; alpha * Q]``: text-to-vision and vision-to-vision softmax rows, [m + n, n]."""
    vn = torch.nn.functional.normalize(v, dim=-1)
    tn = torch.nn.functional.normalize(text, dim=-1)
    pn = torch.nn.functional.normalize(v_pre, dim=-1)
    p = torch.softmax(tn @ vn.T / 0.02, dim=1) / text.shape[0]
    q = torch.softmax(pn @ pn.T / 0.2, dim=1) / v.shape[0]
    return torch.cat([p, 0.5 * q])


Row = tuple[int, int, str, str, bool, float]


def bench_size(n: int) -> list[Row]:
    """Time every rule at one size; returns (N, k, name, printed time, is_greedy_loop, ms) rows."""
    k = n // 9
    rows: list[Row] = []

    def add(name: str, ms: float, greedy: bool = False) -> None:
        rows.append((n, k, name, f"{ms:.1f}", greedy, ms))

    # Low-rank-ish features so that similarities are not all ~0, as with real projected tokens.
    x = torch.randn(n, 64) @ torch.randn(64, D) + 0.5 * torch.randn(n, D)
    w = minmax_normalise(torch.rand(n))
    imp = minmax_normalise(torch.rand(n))

    dist = cosine_distance_matrix(x)
    sim = cosine_similarity_matrix(x)
    add("matrix: cosine distance [N,N]", timeit(lambda: cosine_distance_matrix(x)))
    add("greedy: max-min, DivPrune first pick", timeit(lambda: greedy_max_min(None, k, distances=dist)), True)
    add(
        "greedy: max-min weighted (SADS)",
        timeit(lambda: greedy_max_min(None, k, distances=dist, weights=w, first="max_weight")),
        True,
    )
    add(
        "end-to-end: SADS lazy rows (no matrix)",
        timeit(lambda: greedy_max_min(x, k, weights=w, first="max_weight", lazy=True)),
    )
    auto = "lazy" if k * 12 < n else "matrix"
    add(
        f"end-to-end: SADS auto (chooses {auto})",
        timeit(lambda: greedy_max_min(x, k, weights=w, first="max_weight")),
    )
    add("greedy: mmr (lam=0.5, parallel_k=1)", timeit(lambda: mmr(imp, x, k, similarity=sim)), True)
    add("greedy: mmr (parallel_k=8)", timeit(lambda: mmr(imp, x, k, parallel_k=8, similarity=sim)), True)

    v_pre = torch.randn(n, 16) @ torch.randn(16, 1024) + 0.5 * torch.randn(n, 1024)
    text = torch.randn(32, D)
    cov = mmtok_coverage_matrix(x, v_pre, text)
    add(f"matrix: MMTok coverage C [{n + 32},{n}]", timeit(lambda: mmtok_coverage_matrix(x, v_pre, text)))
    add("greedy: max_coverage", timeit(lambda: max_coverage(cov, k)), True)

    fl_sim = (sim + 1.0) / 2.0
    modular = fl_sim[:, :32].mean(dim=1)
    add("matrix: (cos+1)/2 similarity", timeit(lambda: (cosine_similarity_matrix(x) + 1) / 2))
    add(
        "greedy: facility_location (lam=0.7)",
        timeit(lambda: facility_location(fl_sim, k, modular, 0.7, symmetric=True)),  # as CATP calls it
        True,
    )
    if selection._numba_coverage() is not None:  # the rows above ran the compiled kernel; also time the torch loop
        selection.USE_NUMBA = False
        try:
            add("  same, torch loop (the GPU path): max_coverage", timeit(lambda: max_coverage(cov, k)))
            add(
                "  same, torch loop (the GPU path): facility_location",
                timeit(lambda: facility_location(fl_sim, k, modular, 0.7, symmetric=True)),
            )
        finally:
            selection.USE_NUMBA = True

    if n <= 576:
        got: list[torch.Tensor] = []
        ms = timeit_once(lambda: got.append(naive_zoo_sads(x, w, k)))
        ours = greedy_max_min(x, k, weights=w, first="max_weight", lazy=False)
        same = "same picks as ours" if torch.equal(got[0], ours) else "picks differ from ours"
        add(f"naive ZOO-style [N,N,D] SADS, 1 run ({same})", ms)
    else:
        need_gb = n * n * D * 4 / 1e9
        rows.append((n, k, "naive ZOO-style [N,N,D] SADS", f"skipped (OOM: needs {need_gb:.0f} GB)", False, 0.0))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, D={D}, float32, CPU")
    print(f"{os.cpu_count()} CPUs, 1-min load average at start {load:.2f} (other processes inflate the timings)")
    print("median of 5 runs after 1 warm-up; 'matrix' rows build the [N, N] input, 'greedy' rows consume it\n")

    rows = [row for n in SIZES for row in bench_size(n)]
    width = max(len(r[2]) for r in rows)
    print(f"{'N':>5} {'k':>4}  {'operation':<{width}}  {'ms':>10}")
    print("-" * (5 + 1 + 4 + 2 + width + 2 + 10))
    for n, k, name, shown, _, _ in rows:
        print(f"{n:>5} {k:>4}  {name:<{width}}  {shown:>10}")

    big = max(SIZES)
    name, worst = max(((r[2], r[5]) for r in rows if r[0] == big and r[4]), key=lambda t: t[1])
    verdict = "OK" if worst < TARGET_MS else "OVER TARGET"
    print(f"\nslowest greedy loop at N={big}: {name}, {worst:.1f} ms (target < {TARGET_MS:.0f} ms): {verdict}")


if __name__ == "__main__":
    main()

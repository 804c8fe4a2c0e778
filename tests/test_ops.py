"""Tests for tokensieve.ops: every greedy rule against a plain loop reference, plus hand-made cases."""

from __future__ import annotations

import math

import pytest
import torch

from tokensieve.ops import (
    attention_rows,
    cosine_distance_matrix,
    cosine_similarity_matrix,
    density_peak_clusters,
    entropy,
    facility_location,
    greedy_max_min,
    head_mean,
    matrix_entropy_per_token,
    max_coverage,
    merge_by_assignment,
    minmax_normalise,
    mmr,
    selection,
    topk_indices,
)

# ----------------------------------------------------------------------------------------------------------
# Loop references: written for clarity, one Python loop per candidate, no shared code with the library.
# ----------------------------------------------------------------------------------------------------------


def ref_max_min(dist: torch.Tensor, k: int, weights=None, first="farthest_neighbour") -> list[int]:
    n = dist.shape[0]
    w = [1.0] * n if weights is None else weights.tolist()
    d = dist.tolist()
    if first == "farthest_neighbour":
        nn = [sorted(d[r][j] for r in range(n))[1] for j in range(n)]
        sel = [max(range(n), key=lambda j: (nn[j], -j))]
    elif first == "max_weight":
        sel = [max(range(n), key=lambda j: (w[j], -j))]
    else:
        sel = [first]
    while len(sel) < k:
        best, best_j = -math.inf, -1
        for j in range(n):
            if j in sel:
                continue
            s = w[j] * min(d[p][j] for p in sel)
            if s > best:
                best, best_j = s, j
        sel.append(best_j)
    return sel


def ref_mmr(imp: torch.Tensor, sim: torch.Tensor, k: int, lam: float, parallel_k: int) -> list[int]:
    n = imp.shape[0]
    im, s = imp.tolist(), sim.tolist()
    sel: list[int] = []
    while len(sel) < k:
        step = min(parallel_k, k - len(sel))
        scores = []
        for i in range(n):
            if i in sel:
                continue
            if not sel:
                sc = im[i]
            else:
                sc = lam * im[i] - (1 - lam) * max([-2.0] + [s[i][j] for j in sel])
            scores.append((-sc, i))
        sel += [i for _, i in sorted(scores)[:step]]
    return sel


def ref_coverage(c: torch.Tensor, k: int, bonus=None) -> list[int]:
    m, n = c.shape
    cl = c.tolist()
    b = [0.0] * n if bonus is None else bonus.tolist()
    best = [0.0] * m
    sel: list[int] = []
    for _ in range(k):
        top, top_j = -math.inf, -1
        for j in range(n):
            if j in sel:
                continue
            g = sum(max(cl[r][j] - best[r], 0.0) for r in range(m)) + b[j]
            if g > top:
                top, top_j = g, j
        sel.append(top_j)
        best = [max(best[r], cl[r][top_j]) for r in range(m)]
    return sel


# ----------------------------------------------------------------------------------------------------------
# topk and distances
# ----------------------------------------------------------------------------------------------------------


def test_topk_indices_sorted_and_tie_break():
    scores = torch.tensor([1.0, 3.0, 3.0, 0.0, 3.0, 2.0])
    assert topk_indices(scores, 2).tolist() == [1, 2]
    assert topk_indices(scores, 4).tolist() == [1, 2, 4, 5]
    assert topk_indices(scores, 0).tolist() == []
    assert topk_indices(scores, 6).tolist() == list(range(6))
    assert topk_indices(torch.tensor([float("nan"), 1.0, 0.0]), 1).tolist() == [1]
    assert topk_indices(scores.half(), 3).dtype == torch.long


def test_topk_indices_matches_python_sort():
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 5, (200,), generator=g).float()
    want = sorted(sorted(range(200), key=lambda i: (-scores[i].item(), i))[:37])
    assert topk_indices(scores, 37).tolist() == want


def test_cosine_matrices():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(20, 8, generator=g)
    sim = cosine_similarity_matrix(x)
    naive = torch.nn.functional.cosine_similarity(x[:, None], x[None, :], dim=-1)
    torch.testing.assert_close(sim, naive, atol=1e-6, rtol=0)
    dist = cosine_distance_matrix(x.bfloat16())
    assert dist.dtype == torch.float32
    assert torch.all(dist.diagonal() == 0)
    assert dist.min() >= 0 and dist.max() <= 2
    # a zero row does not produce NaN
    x[3] = 0
    assert torch.isfinite(cosine_distance_matrix(x)).all()


# ----------------------------------------------------------------------------------------------------------
# greedy max-min
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
def test_greedy_max_min_divprune_matches_reference(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(60, 16, generator=g)
    dist = cosine_distance_matrix(x)
    got = greedy_max_min(x, 12)
    assert got.tolist() == ref_max_min(dist, 12)
    assert greedy_max_min(None, 12, distances=dist).tolist() == got.tolist()


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("lazy", [False, True])
def test_greedy_max_min_sads_matches_reference(seed, lazy):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(60, 16, generator=g)
    w = minmax_normalise(torch.rand(60, generator=g))
    dist = cosine_distance_matrix(x)
    got = greedy_max_min(x, 15, weights=w, first="max_weight", lazy=lazy)
    assert got.tolist() == ref_max_min(dist, 15, w, "max_weight")


def test_greedy_max_min_int_first_and_dtypes():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(40, 8, generator=g)
    ref = ref_max_min(cosine_distance_matrix(x.half()), 10, None, 7)
    for lazy in (False, True):
        got = greedy_max_min(x.half(), 10, first=7, lazy=lazy)
        assert got.dtype == torch.long
        assert got.tolist() == ref


def test_greedy_max_min_duplicates_never_both_picked():
    g = torch.Generator().manual_seed(2)
    base = torch.randn(6, 8, generator=g)
    x = torch.cat([base, base[:3]])  # tokens 6, 7, 8 duplicate 0, 1, 2
    for first in ("farthest_neighbour", 0, 4):
        got = greedy_max_min(x, 6, first=first).tolist()
        assert len(set(got)) == 6
        pairs = [(0, 6), (1, 7), (2, 8)]
        assert not any(a in got and b in got for a, b in pairs), (first, got)
    # DivPrune's first pick never lands on a duplicated token (its nearest neighbour is at distance 0)
    assert greedy_max_min(x, 1).item() in (3, 4, 5)


def test_greedy_max_min_zero_weight_never_first():
    x = torch.eye(5)
    w = torch.tensor([0.0, 1.0, 1.0, 0.5, 1.0])
    got = greedy_max_min(x, 5, weights=w, first="max_weight")
    assert got[0].item() == 1  # argmax with ties to the lower index; never the zero-weight token 0
    assert sorted(got.tolist()) == list(range(5))
    assert got[-1].item() == 0  # zero weight -> score 0, picked only when nothing else is left


def test_greedy_max_min_k_equals_n_and_determinism():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(30, 4, generator=g)
    for kwargs in ({}, {"first": "max_weight", "weights": torch.rand(30, generator=g)}):
        a = greedy_max_min(x, 30, **kwargs)
        b = greedy_max_min(x, 30, **kwargs)
        assert sorted(a.tolist()) == list(range(30))
        assert torch.equal(a, b)
    assert greedy_max_min(torch.ones(1, 3), 1).tolist() == [0]
    assert greedy_max_min(x, 0).numel() == 0


def test_greedy_max_min_all_zero_scores_still_distinct():
    x = torch.ones(8, 4)  # every distance is 0: selection must still not repeat
    got = greedy_max_min(x, 8, first=3)
    assert sorted(got.tolist()) == list(range(8))


def test_greedy_max_min_errors():
    x = torch.randn(10, 4)
    with pytest.raises(ValueError):
        greedy_max_min(x, 11)
    with pytest.raises(ValueError):
        greedy_max_min(x, 3, first="max_weight")
    with pytest.raises(ValueError):
        greedy_max_min(x, 3, lazy=True)  # farthest_neighbour needs the matrix
    with pytest.raises(ValueError):
        greedy_max_min(x, 3, weights=torch.tensor([math.inf] + [1.0] * 9), first=0)


# ----------------------------------------------------------------------------------------------------------
# MMR
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("parallel_k", [1, 3])
@pytest.mark.parametrize("lazy", [False, True])
def test_mmr_matches_reference(seed, parallel_k, lazy):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(50, 12, generator=g)
    imp = minmax_normalise(torch.rand(50, generator=g))
    sim = cosine_similarity_matrix(x)
    got = mmr(imp, x, 14, lam=0.6, parallel_k=parallel_k, lazy=lazy)
    assert got.tolist() == ref_mmr(imp, sim, 14, 0.6, parallel_k)


def test_mmr_hand_made():
    # token 0 most important; token 1 duplicates it; token 2 is orthogonal and less important
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    imp = torch.tensor([1.0, 0.9, 0.5])
    assert mmr(imp, x, 2, lam=0.5).tolist() == [0, 2]
    assert mmr(imp, x, 2, lam=1.0).tolist() == [0, 1]  # lam=1: importance only
    assert sorted(mmr(imp, x, 3).tolist()) == [0, 1, 2]
    assert mmr(imp, x, 2, similarity=cosine_similarity_matrix(x)).tolist() == [0, 2]


# ----------------------------------------------------------------------------------------------------------
# coverage and facility location
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(params=["numba", "torch"])
def backend(request, monkeypatch):
    """Run a coverage test on the compiled CPU kernel and on the torch loop (what GPU tensors use)."""
    if request.param == "numba":
        assert selection._numba_coverage() is not None
    monkeypatch.setattr(selection, "USE_NUMBA", request.param == "numba")
    return request.param


def test_cpu_coverage_runs_the_compiled_kernel_and_gpu_style_calls_the_torch_loop(monkeypatch):
    from tokensieve.ops import _coverage_numba

    calls = []
    compiled = _coverage_numba.greedy_coverage
    monkeypatch.setattr(_coverage_numba, "greedy_coverage", lambda *a: calls.append(1) or compiled(*a))
    c = torch.rand(40, 25, generator=torch.Generator().manual_seed(1))
    picks = max_coverage(c, 6)
    assert calls == [1]
    monkeypatch.setattr(selection, "USE_NUMBA", False)  # the path GPU tensors take
    assert torch.equal(max_coverage(c, 6), picks) and calls == [1]


@pytest.mark.parametrize("seed", range(4))
def test_max_coverage_matches_reference(seed, backend):
    g = torch.Generator().manual_seed(seed)
    # MMTok-like: rows are softmax distributions over the candidates
    c = torch.softmax(torch.randn(70, 40, generator=g) / 0.3, dim=1)
    assert max_coverage(c, 15).tolist() == ref_coverage(c, 15)


def test_max_coverage_sparse_rows_reference(backend):
    # few rows improve per step: exercises the incremental update path
    g = torch.Generator().manual_seed(9)
    c = torch.rand(200, 30, generator=g) ** 8
    assert max_coverage(c, 30).tolist() == ref_coverage(c, 30)


def test_max_coverage_long_run_with_large_and_small_updates(backend):
    # dense rows: the first picks improve most items (full recompute), later ones few (incremental updates),
    # and the running gains drift over 60 steps; duplicated columns test the lowest-index tie rule
    g = torch.Generator().manual_seed(3)
    c = torch.rand(256, 100, generator=g)
    c = torch.cat([c, c[:, :20]], dim=1)  # columns 100..119 duplicate 0..19
    got = max_coverage(c, 60).tolist()
    assert got == ref_coverage(c, 60)
    assert all(j < 100 or j - 100 in got[: got.index(j)] for j in got)  # a duplicate never precedes its twin


def test_max_coverage_negative_entries_never_cover(backend):
    g = torch.Generator().manual_seed(4)
    c = torch.randn(300, 25, generator=g)  # half the entries negative; 300 rows: more than one row chunk
    assert max_coverage(c, 12).tolist() == ref_coverage(c, 12)


def test_max_coverage_hand_made(backend):
    c = torch.tensor(
        [
            [1.0, 0.0, 0.0, 0.0],
            [1.0, 0.0, 0.0, 0.0],
            [0.0, 1.0, 1.0, 0.0],
            [0.0, 1.0, 1.0, 0.0],
            [0.0, 1.0, 0.0, 0.0],
        ]
    )
    got = max_coverage(c, 4).tolist()
    assert got[:2] == [1, 0]  # column 1 covers most rows; then column 0 covers the rest
    assert sorted(got) == [0, 1, 2, 3]  # zero-gain columns are still distinct


@pytest.mark.parametrize("seed", range(3))
def test_facility_location_matches_reference(seed, backend):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(45, 10, generator=g)
    sim = (cosine_similarity_matrix(x) + 1) / 2
    sim[0, 5] = 0.99  # make it asymmetric: rows are candidates, columns are covered items
    mod = torch.rand(45, generator=g)
    assert facility_location(sim, 10).tolist() == ref_coverage(sim.T, 10)
    assert facility_location(sim, 10, mod, lam=0.7).tolist() == ref_coverage(sim.T, 10, 0.7 * mod)


def test_facility_location_symmetric_shortcut_gives_the_same_picks(backend):
    g = torch.Generator().manual_seed(7)
    sim = (cosine_similarity_matrix(torch.randn(60, 8, generator=g)) + 1) / 2
    mod = torch.rand(60, generator=g)
    expected = ref_coverage(sim.T, 15, 0.7 * mod)
    assert facility_location(sim, 15, mod, lam=0.7).tolist() == expected
    assert facility_location(sim, 15, mod, lam=0.7, symmetric=True).tolist() == expected


def test_facility_location_k_equals_n(backend):
    sim = torch.eye(6)
    got = facility_location(sim, 6)
    assert sorted(got.tolist()) == list(range(6))
    assert got.tolist() == list(range(6))  # equal gains: lower index first


# ----------------------------------------------------------------------------------------------------------
# density-peak clustering
# ----------------------------------------------------------------------------------------------------------


def test_density_peak_clusters_separated_blobs():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    x = torch.cat([c + 0.1 * torch.randn(10, 2, generator=g) for c in centres])
    assign = density_peak_clusters(x, 3, knn=5)
    assert assign.dtype == torch.long and assign.shape == (30,)
    groups = [set(assign[i * 10 : (i + 1) * 10].tolist()) for i in range(3)]
    assert all(len(s) == 1 for s in groups)
    assert len(set.union(*groups)) == 3
    merged = merge_by_assignment(x, assign)
    for i in range(3):
        torch.testing.assert_close(merged[assign[i * 10]], x[i * 10 : (i + 1) * 10].mean(0))
    assert torch.equal(assign, density_peak_clusters(x, 3, knn=5))


def test_density_peak_reference_small():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(25, 6, generator=g)
    n, d = x.shape
    dist = torch.cdist(x.double(), x.double()) / math.sqrt(d)
    dens = torch.exp(-(dist.sort(dim=1).values[:, :4] ** 2).mean(1))
    delta = []
    for i in range(n):
        cand = [dist[i, j].item() for j in range(n) if dens[j] > dens[i]]
        delta.append(min(cand) if cand else dist.max().item())
    score = torch.tensor(delta, dtype=torch.float64) * dens
    centres = sorted(range(n), key=lambda i: (-score[i].item(), i))[:5]
    want = [
        centres.index(i) if i in centres else min(range(5), key=lambda c: dist[centres[c], i].item()) for i in range(n)
    ]
    assert density_peak_clusters(x, 5, knn=4).tolist() == want


def test_merge_by_assignment_means_and_empty():
    x = torch.arange(12.0).reshape(4, 3).half()
    out = merge_by_assignment(x, torch.tensor([1, 1, 0, 0]), n_clusters=3)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), torch.tensor([[7.5, 8.5, 9.5], [1.5, 2.5, 3.5], [0.0, 0.0, 0.0]]))


# ----------------------------------------------------------------------------------------------------------
# attention
# ----------------------------------------------------------------------------------------------------------


def naive_attention(q, k, mask_add, scale):
    n_rep = q.shape[1] // k.shape[1]
    kk = k.repeat_interleave(n_rep, dim=1)
    return torch.softmax(q.double() @ kk.double().transpose(-1, -2) * scale + mask_add, dim=-1)


@pytest.mark.parametrize("h_kv", [4, 2, 1])
def test_attention_rows_matches_naive(h_kv):
    g = torch.Generator().manual_seed(0)
    b, h_q, n_q, length, d = 2, 4, 3, 11, 8
    q = torch.randn(b, h_q, n_q, d, generator=g)
    k = torch.randn(b, h_kv, length, d, generator=g)
    got = attention_rows(q, k)
    assert got.shape == (b, h_q, n_q, length)
    torch.testing.assert_close(got.double(), naive_attention(q, k, 0.0, d**-0.5), atol=1e-6, rtol=1e-5)

    key_mask = torch.ones(b, length, dtype=torch.bool)
    key_mask[0, :3] = False
    key_mask[1, 7] = False
    qpos = torch.tensor([[4, 8, 10], [10, 10, 5]])
    allowed = key_mask[:, None, None, :] & (torch.arange(length)[None, None, None, :] <= qpos[:, None, :, None])
    add = torch.zeros(allowed.shape, dtype=torch.float64).masked_fill(~allowed, -math.inf)
    got = attention_rows(q, k, key_mask=key_mask, query_positions=qpos, scale=0.3)
    torch.testing.assert_close(got.double(), naive_attention(q, k, add, 0.3), atol=1e-6, rtol=1e-5)
    assert torch.all(got.masked_select(~allowed.expand_as(got)) == 0)


def test_attention_rows_half_input_and_fully_masked_row():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 2, 2, 4, generator=g).half()
    k = torch.randn(1, 1, 5, 4, generator=g).half()
    mask = torch.tensor([[False, False, True, True, True]])
    got = attention_rows(q, k, key_mask=mask, query_positions=torch.tensor([1, 4]))
    assert got.dtype == torch.float32
    assert torch.all(got[:, :, 0] == 0)  # query 0 sees keys 0..1, both masked
    torch.testing.assert_close(got[:, :, 1].sum(-1), torch.ones(1, 2))
    assert head_mean(got).shape == (1, 2, 5)
    torch.testing.assert_close(head_mean(got), got.mean(1))


# ----------------------------------------------------------------------------------------------------------
# stats
# ----------------------------------------------------------------------------------------------------------


def test_minmax_normalise():
    torch.testing.assert_close(minmax_normalise(torch.tensor([2.0, 4.0, 3.0]), eps=0.0), torch.tensor([0, 1, 0.5]))
    assert torch.all(minmax_normalise(torch.full((5,), 3.0)) == 1)
    rows = minmax_normalise(torch.tensor([[1.0, 1.0], [0.0, 2.0]]), dim=1)
    assert rows[0].tolist() == [1.0, 1.0] and rows[1, 0] == 0


def test_matrix_entropy_known_values():
    n_heads = 4
    # Heads c * e_i: after centring, A = c^2 / H * (I - J / H) with eigenvalues c^2 / H (x3) and 0.
    # Choose c^2 = H / e so the three eigenvalues are 1/e: H = (3/e + 1e-10 * log(1e10)) / log 4.
    c = math.sqrt(n_heads / math.e)
    r_orth = c * torch.eye(n_heads)
    want_orth = (3 / math.e + 1e-10 * math.log(1e10)) / math.log(n_heads)
    # Identical heads centre to zero: all four eigenvalues clamp to 1e-10.
    r_same = torch.ones(n_heads, 4)
    want_same = 4 * 1e-10 * math.log(1e10) / math.log(n_heads)
    got = matrix_entropy_per_token(torch.stack([r_orth, r_same]).half())
    assert got.shape == (2,)
    assert got[0].item() == pytest.approx(want_orth, rel=1e-3)  # fp16 input rounds c
    assert got[1].item() == pytest.approx(want_same, rel=1e-6)


def test_matrix_entropy_matches_covariance_spectrum():
    g = torch.Generator().manual_seed(0)
    r = torch.randn(3, 8, 5, generator=g, dtype=torch.float64)
    got = matrix_entropy_per_token(r)
    for i in range(3):
        rc = r[i] - r[i].mean(0)
        eig = torch.linalg.eigvalsh(rc.T @ rc / 8).clamp(min=1e-10)  # [d, d] primal: same non-zero spectrum
        # primal has d = 5 eigenvalues, dual has H = 8 (3 extra clamped zeros)
        h = -(eig * eig.log()).sum() + 3 * 1e-10 * math.log(1e10)
        assert got[i].item() == pytest.approx((h / math.log(8)).item(), rel=1e-5, abs=1e-8)


def test_entropy():
    p = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]])
    torch.testing.assert_close(entropy(p), torch.tensor([math.log(2), 0.0]))
    torch.testing.assert_close(entropy(torch.full((4,), 0.25), normalised=True), torch.tensor(1.0))
    torch.testing.assert_close(entropy(p.T, dim=0), entropy(p))


def test_farthest_neighbour_general_matrix():
    # a diagonal that is not the column minimum falls back to the plain second-smallest rule
    g = torch.Generator().manual_seed(7)
    a = torch.rand(12, 12, generator=g)
    dist = (a + a.T) / 2
    before = dist.clone()
    assert greedy_max_min(None, 5, distances=dist).tolist() == ref_max_min(dist, 5)
    dist.fill_diagonal_(0.0)
    assert greedy_max_min(None, 5, distances=dist).tolist() == ref_max_min(dist, 5)
    before.fill_diagonal_(0.0)
    assert torch.equal(dist, before)  # the caller's matrix is left as it was


@pytest.mark.parametrize("kind", ["nan", "inf"])
def test_coverage_rejects_non_finite_rows_the_same_way_on_both_backends(backend, kind):
    torch.manual_seed(0)
    C = torch.rand(12, 9)
    C[:, 4] = float(kind)  # one feature row gone bad: its column of the coverage matrix
    with pytest.raises(ValueError, match="NaN or inf .*columns \\[4\\]"):
        max_coverage(C, 5)
    sim = torch.rand(9, 9)
    sim[2, 5] = float(kind)
    with pytest.raises(ValueError, match="NaN or inf"):
        facility_location(sim, 3)
    with pytest.raises(ValueError, match="NaN or inf .*bonus"):
        facility_location(torch.rand(9, 9), 3, modular=torch.full((9,), float(kind)), lam=0.5)

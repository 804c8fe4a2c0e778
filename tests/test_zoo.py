"""ZOO-Prune: budgets on the three families, seeding, exactness, estimators, low rank, fusion, errors."""

from __future__ import annotations

import pytest
import torch
from conftest import build, make_inputs
from torch import nn

import tokensieve
from tokensieve.adapters.base import get_adapter
from tokensieve.budget import split_budget
from tokensieve.context import ImageContext
from tokensieve.methods.zoo import Zoo
from tokensieve.ops.zoo_sensitivity import LowRankLinear, projector_copy
from tokensieve.testing import image_context


class _MLP(nn.Module):
    """A LLaVA-style projector: linear_1, act, linear_2."""

    def __init__(self, d_in: int, hidden: int, d_out: int, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.linear_1 = nn.Linear(d_in, hidden)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


def _ctx(x: torch.Tensor, module: nn.Module, groups=None, always=None, project=None) -> ImageContext:
    n = x.shape[0]
    project = project or module
    with torch.no_grad():
        z = project(x)
    return image_context(
        z,
        grid_rc=torch.zeros(n, 2, dtype=torch.long),
        groups=groups,
        always_keep=always,
        pre_features=x,
        project=project,
        projector_module=module,
    )


def _random_ctx(n: int = 48, d_in: int = 16, hidden: int = 32, d_out: int = 24, seed: int = 0) -> ImageContext:
    module = _MLP(d_in, hidden, d_out, seed)
    x = torch.randn(n, d_in, generator=torch.Generator().manual_seed(seed + 1))
    return _ctx(x, module)


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra = a.argsort().argsort().double()
    rb = b.argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


# ----- through the sieve on the tiny families ---------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_5_vl"])
def test_kept_count_through_the_sieve(family):
    model, _ = build(family)
    inputs = make_inputs(family)
    keep = 5 if family == "llava" else 0.5
    with tokensieve.sieve(model, "zoo", keep=keep) as s, torch.no_grad():
        model(**inputs)
    for b in range(2):
        info = s.trace.images[(b, 0)]
        n = info["n_tokens"]
        newlines = int((info["grid_rc"][:, 0] < 0).sum())
        k = 5 if family == "llava" else int(0.5 * n)
        assert s.trace.kept(b, 0).numel() == k + newlines, (family, b)
        if family == "llava_next":
            assert newlines > 0
            kept = s.trace.kept(b, 0)
            assert bool((info["grid_rc"][kept, 0] < 0).sum() == newlines)  # every newline survives


def test_keep_all_is_exact():
    model, _ = build("llava_next")  # newline tokens and crops: the most involved layout
    inputs = make_inputs("llava_next")
    valid = inputs["attention_mask"].bool()
    with torch.no_grad():
        reference = model(**inputs).logits
        with tokensieve.sieve(model, "zoo", keep=1.0):
            pruned = model(**inputs).logits
    assert torch.allclose(pruned[valid], reference[valid], atol=1e-5)  # the framework's masked path, no drops


def test_keep_all_direct_returns_every_token():
    ctx = _random_ctx(n=12)
    assert torch.equal(torch.sort(Zoo().select(ctx, 12)).values, torch.arange(12))


# ----- direct calls -------------------------------------------------------------------------------------------------
def test_counts_and_per_crop_budget_with_newlines():
    n_crops, per_crop = 3, 10
    base = _random_ctx(n=n_crops * per_crop + 4)
    groups = torch.cat([torch.arange(n_crops).repeat_interleave(per_crop), torch.zeros(4, dtype=torch.long)])
    always = torch.zeros(groups.numel(), dtype=torch.bool)
    always[-4:] = True
    ctx = _ctx(base.pre_features, base.projector_module, groups=groups, always=always)
    for k in (1, 7, 8, 20):
        keep = Zoo().select(ctx, k)
        assert keep.numel() == k + 4 and torch.unique(keep).numel() == k + 4
        assert set(range(ctx.n - 4, ctx.n)) <= set(keep.tolist())
        per = torch.bincount(groups[keep[~always[keep]]], minlength=n_crops).tolist()
        assert per == split_budget(k, [per_crop] * n_crops)
    assert split_budget(7, [10, 10, 10]) == [3, 2, 2]
    assert split_budget(9, [1, 10, 10]) == [1, 4, 4]  # the small crop passes its excess on


def test_same_seed_same_tokens_and_seeds_differ():
    ctx = _random_ctx()
    a = Zoo(m=4, seed=0).sensitivity(ctx)
    assert torch.equal(a, Zoo(m=4, seed=0).sensitivity(ctx))
    assert not torch.equal(a, Zoo(m=4, seed=1).sensitivity(ctx))
    assert torch.equal(Zoo(m=4, seed=0).select(ctx, 10), Zoo(m=4, seed=0).select(ctx, 10))
    picks = {tuple(Zoo(m=2, seed=s).select(ctx, 10).tolist()) for s in range(6)}
    assert len(picks) > 1


def test_flat_jacobian_token_is_never_first():
    """Token 0 sits deep in GELU's flat negative tail: its Jacobian is zero, so S(0) = 0 for every estimator."""
    d_in, n = 8, 20
    module = _MLP(d_in, 32, 16)
    with torch.no_grad():
        module.linear_1.weight[:, 0] = module.linear_1.weight[:, 0].abs() + 0.5
        module.linear_1.bias.zero_()
    x = torch.randn(n, d_in, generator=torch.Generator().manual_seed(3))
    x[0] = 0.0
    x[0, 0] = -200.0  # every pre-activation <= -100
    ctx = _ctx(x, module)
    for estimator in ("montecarlo", "exact", "jvp"):
        method = Zoo(estimator=estimator)
        s = method.sensitivity(ctx)
        assert float(s[0]) == 0.0 and bool((s[1:] > 0).all()), estimator
        assert int(method.select(ctx, 1)[0]) != 0
        assert 0 not in method.select(ctx, n - 1).tolist()  # zero weight: picked last


def test_exact_agrees_with_montecarlo_and_jvp():
    ctx = _random_ctx(n=64, d_in=64, hidden=128, d_out=64, seed=5)
    exact = Zoo(estimator="exact").sensitivity(ctx)
    assert torch.equal(exact, Zoo(estimator="exact", seed=7).sensitivity(ctx))  # deterministic, seed-free
    mc = Zoo(m=512).sensitivity(ctx)
    jvp = Zoo(estimator="jvp", m=512).sensitivity(ctx)
    assert _spearman(exact, mc) > 0.95
    assert _spearman(exact, jvp) > 0.98
    assert torch.allclose(jvp, exact, rtol=0.05)  # the same quantity


def test_chunking_does_not_change_scores():
    ctx = _random_ctx()
    for estimator in ("montecarlo", "jvp", "exact"):
        a = Zoo(estimator=estimator, m=8).sensitivity(ctx)
        b = Zoo(estimator=estimator, m=8, chunk_rows=40).sensitivity(ctx)
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), estimator


def test_lowrank():
    ctx = _random_ctx(d_in=16, hidden=32, d_out=24)
    full = Zoo().sensitivity(ctx)
    assert torch.equal(Zoo(lowrank=32).sensitivity(ctx), full)  # full rank: the linears stay dense
    # Weights of rank 6: a rank-6 SVD copy reproduces the projector up to rounding.
    module = ctx.projector_module
    with torch.no_grad():
        for lin in (module.linear_1, module.linear_2):
            u, s, vh = torch.linalg.svd(lin.weight, full_matrices=False)
            lin.weight.copy_((u[:, :6] * s[:6]) @ vh[:6])
    ctx = _ctx(ctx.pre_features, module)
    copy = projector_copy(module, 6, torch.float32)
    assert isinstance(copy.linear_1, LowRankLinear) and isinstance(copy.linear_2, LowRankLinear)
    for estimator in ("montecarlo", "exact"):
        dense = Zoo(estimator=estimator).sensitivity(ctx)
        assert torch.allclose(Zoo(estimator=estimator, lowrank=6).sensitivity(ctx), dense, rtol=1e-3), estimator
    # The copy follows the weights the module holds now (rebuilt after an in-place load).
    with torch.no_grad():
        module.linear_1.weight.mul_(2.0)
    assert projector_copy(module, 6, torch.float32) is not copy
    assert torch.allclose(projector_copy(module, 6, torch.float32).linear_1.weight, module.linear_1.weight, atol=1e-5)


def test_fusion_options_differ():
    ctx = _random_ctx(n=64)
    # seed 1: with seed 0's bank both rules happen to keep the same 24 of these 64 random tokens
    product = Zoo(fusion="product", seed=1).select(ctx, 24)
    total = Zoo(fusion="sum", seed=1).select(ctx, 24)
    assert product.numel() == total.numel() == 24
    assert product[0] == total[0]  # both start at argmax S_hat
    assert set(product.tolist()) != set(total.tolist())


def test_half_precision_copy_runs():
    ctx = _random_ctx()
    s32 = Zoo().sensitivity(ctx)
    s16 = Zoo(dtype="bfloat16", h=0.1).sensitivity(ctx)
    assert s16.dtype == torch.float32 and _spearman(s32, s16) > 0.8
    assert Zoo(dtype="float16").select(ctx, 10).numel() == 10


def test_qwen_merger_jvp_and_exact_error():
    model, _ = build("qwen2_5_vl")
    adapter = get_adapter(model)
    merger = adapter.projector_module()
    d_in = merger.hidden_size
    x = torch.randn(6, d_in, generator=torch.Generator().manual_seed(0))
    ctx = _ctx(x, merger, project=adapter.project_fn())
    with pytest.raises(ValueError, match="jvp"):
        Zoo(estimator="exact").select(ctx, 2)
    for estimator in ("montecarlo", "jvp"):
        assert Zoo(estimator=estimator).select(ctx, 2).numel() == 2
    # A copy (low rank / other dtype) is called the way the adapter calls the merger.
    assert torch.allclose(Zoo(lowrank=10_000).sensitivity(ctx), Zoo().sensitivity(ctx))


def test_bad_options_are_rejected():
    for kwargs in ({"estimator": "adjoint"}, {"fusion": "max"}, {"dtype": "int8"}, {"m": 0}, {"lowrank": 0}):
        with pytest.raises(ValueError):
            Zoo(**kwargs)

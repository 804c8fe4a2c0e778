"""The fast paths of KV selection give the same selections as the plain torch formulation (no timing here:
speed lives in ``tokensieve.kv.speed``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tokensieve.kv import ops
from tokensieve.kv.attend import attend, grouped_sdpa
from tokensieve.kv.families import model_info
from tokensieve.kv.methods.base import Call, Piece
from tokensieve.kv.methods.tokenselect import TokenSelect
from tokensieve.kv.testing import tiny_causal_lm


@pytest.mark.parametrize("g", [1, 2, 4, 7])
def test_group_scores_kernel_equals_matmul_and_selects_the_same_tokens(g, monkeypatch):
    gen = torch.Generator().manual_seed(g)
    buf = torch.randn(3, 3000, 64, generator=gen)
    keys = buf[:, 5:2905]  # a slice of a growable per-slot buffer, as TokenSelect passes it
    fp = torch.randn(3, g, 64, generator=gen)
    fast = ops.group_scores(keys, fp)
    monkeypatch.setattr(ops, "USE_NUMBA", False)
    ref = ops.group_scores(keys, fp)
    want = torch.matmul(fp, keys.transpose(-1, -2))
    assert fast.shape == ref.shape == (3, g, 2900)
    assert torch.allclose(fast, want, atol=1e-4) and torch.allclose(ref, want, atol=1e-4)
    vote = lambda s: torch.softmax(s, -1).sum((0, 1)).topk(300).indices.sort().values  # noqa: E731
    assert torch.equal(vote(fast), vote(want)) and torch.equal(vote(ref), vote(want))


@pytest.mark.parametrize("shared", [True, False])
def test_grouped_sdpa_equals_repeated_kv(shared):
    """Packing each GQA group's heads as query rows equals SDPA on repeat_interleave'd K/V (HF's h // g)."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 8, 3, 16, generator=gen)
    k, v = torch.randn(1, 2, 20, 16, generator=gen), torch.randn(1, 2, 20, 16, generator=gen)
    mask = torch.rand(3, 20, generator=gen) > 0.3 if shared else torch.rand(8, 3, 20, generator=gen) > 0.3
    mask[..., 0] = True
    want = F.scaled_dot_product_attention(q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1),
                                          attn_mask=mask[None, None] if shared else mask[None], scale=0.3)
    got = grouped_sdpa(q, k, v, mask, 0.3)
    assert torch.allclose(got, want, atol=1e-6)
    assert torch.allclose(grouped_sdpa(q, k, v, None, 0.3),
                          F.scaled_dot_product_attention(q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1),
                                                         scale=0.3), atol=1e-6)


def test_shared_selection_attention_equals_dense_on_the_gathered_keys():
    """A decode piece with a shared idx (and one masked slot) equals SDPA over exactly those keys."""
    m = tiny_causal_lm("llama")
    gen = torch.Generator().manual_seed(1)
    info = model_info(m)
    n, h, hk, d = 50, info.n_heads, info.n_kv_heads, info.head_dim
    q, k, v = torch.randn(1, h, 1, d, generator=gen), torch.randn(1, hk, n, d), torch.randn(1, hk, n, d)
    pos = torch.arange(n)
    call = Call(q=q, k=k, v=v, q_pos=pos[-1:], k_rope=pos, q_rope=pos[-1:], phase="decode", layer=0, keep=10,
                n_context=n, scaling=0.2, model=m, info=info, state={}, slot=(0, 0))
    idx = torch.tensor([[0, 3, 7, 7, 20, 49]])
    valid = torch.tensor([[True, True, True, False, True, True]])
    got = attend(call, [Piece(0, 1, idx=idx, valid=valid)])
    sel = torch.tensor([0, 3, 7, 20, 49])
    rep = h // hk
    want = F.scaled_dot_product_attention(q, k[:, :, sel].repeat_interleave(rep, 1),
                                          v[:, :, sel].repeat_interleave(rep, 1), scale=0.2)
    assert torch.allclose(got, want, atol=1e-6)


def test_tokenselect_fast_vote_matches_torch_vote(monkeypatch):
    gen = torch.Generator().manual_seed(3)
    fp, keys = torch.randn(8, 32, generator=gen), torch.randn(2, 4000, 32, generator=gen)
    ts = TokenSelect()
    fast = ts.vote(fp, keys).topk(200).indices
    monkeypatch.setattr(ops, "USE_NUMBA", False)
    assert torch.equal(fast, ts.vote(fp, keys).topk(200).indices)


def test_head_scores_kernel_equals_matvec_and_selects_the_same_tokens(monkeypatch):
    gen = torch.Generator().manual_seed(4)
    buf, q = torch.randn(6, 5000, 32, generator=gen), torch.randn(6, 32, generator=gen)
    fast = ops.head_scores(buf, 4100, q)
    monkeypatch.setattr(ops, "USE_NUMBA", False)
    ref = ops.head_scores(buf, 4100, q)
    want = torch.einsum("hnd,hd->hn", buf[:, :4100], q)
    assert fast.shape == (6, 4100) and torch.allclose(fast, want, atol=1e-4) and torch.allclose(ref, want, atol=1e-4)
    assert torch.equal(fast.topk(256, -1).indices, want.topk(256, -1).indices)


@pytest.mark.parametrize("score_rope", ["absolute", "fixed_distance"])
def test_incremental_scoring_keys_equal_a_fresh_computation(score_rope):
    """The per-slot scoring-key buffers (converted / un-rotated once per new cache entry) give the same plan
    as computing them from scratch, step after step."""
    m = tiny_causal_lm("llama")
    info = model_info(m)
    gen = torch.Generator().manual_seed(6)
    k, v = torch.randn(1, info.n_kv_heads, 90, info.head_dim, generator=gen), torch.randn(1, info.n_kv_heads, 90, 16)
    ts = TokenSelect(n_init=2, n_local=8, score_rope=score_rope, score_dtype="bfloat16")
    state: dict = {}
    for n in (70, 71, 90):
        q = torch.randn(1, info.n_heads, 1, info.head_dim, generator=gen)
        pos = torch.arange(n)
        kw = dict(q=q, k=k[:, :, :n], v=v[:, :, :n], q_pos=pos[-1:], k_rope=pos, q_rope=pos[-1:], phase="decode",
                  layer=0, keep=30, n_context=n, scaling=0.25, model=m, info=info, slot=(0, 0))
        kept = ts.plan(Call(state=state, **kw))[0].idx
        fresh = ts.plan(Call(state={}, **kw))[0].idx
        assert torch.equal(kept, fresh)


def test_group_scores_with_several_threads_equals_one_thread():
    """With torch threads > 1 the kernel runs one KV head per worker; same values as one thread."""
    gen = torch.Generator().manual_seed(7)
    keys, fp = torch.randn(4, 1500, 32, generator=gen), torch.randn(4, 4, 32, generator=gen)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.group_scores(keys, fp)
        torch.set_num_threads(2)
        two = ops.group_scores(keys, fp)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(one, two)

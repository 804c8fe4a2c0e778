"""TokenSelect's compacted attention positions against an oracle written from the official code's position
handling (pzs19/TokenSelect @ 8e1e97f, patcher/token_retrieval.py): keys are cached pre-RoPE (``get_rope``
returns None), the gathered list goes to FlashInfer with ``pos_encoding_mode="ROPE_LLAMA"``, which rotates the
key at list index j by R(j) and the query by R(kv_len - 1) at decode (``q_rope_offset`` unset) or by
R(kv_len - qo_len + i) in a causal prefill chunk (list-index causality); query head h reads KV head h // g.
Written without calling tokensieve's method code."""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from tokensieve.kv import KVMethodError, KVSieve
from tokensieve.kv.attend import attend
from tokensieve.kv.families import model_info
from tokensieve.kv.methods.base import Call
from tokensieve.kv.methods.tokenselect import TokenSelect
from tokensieve.kv.testing import tiny_causal_lm

_M: dict = {}


def model():
    if "m" not in _M:
        _M["m"] = tiny_causal_lm("llama")
    return _M["m"]


def rot(m, x, pos):
    """HF rotation of x [1, h, n, d] at positions pos [n]."""
    cos, sin = m.model.rotary_emb(x, pos[None])
    return apply_rotary_pos_emb(x, x, cos, sin)[0]


def official_retrieval(m, q_pre, k_pre, n_init, n_local, topk):
    """retrieval_indices: query rotated at n_local + i (QUERY_ROTATE), mean over the chunk, per-head dot with
    the pre-RoPE keys of [n_init, N - n_local) under h mod H_kv, softmax, sum, topk, sort, + n_init."""
    n, n_kv, c = k_pre.shape[2], k_pre.shape[1], q_pre.shape[2]
    fp = rot(m, q_pre, torch.arange(n_local, n_local + c)).mean(dim=2)[0]  # [H, d]
    cand = k_pre[0, :, n_init : n - n_local]
    scores = torch.stack([fp[h] @ cand[h % n_kv].T for h in range(fp.shape[0])])
    top = torch.softmax(scores, -1).sum(0).topk(topk).indices.sort().values + n_init
    return torch.cat([torch.arange(n_init), top, torch.arange(n - n_local, n)])


def flashinfer_rope_llama(m, q_pre, k_pre, v, retrieved, scale):
    """Causal attention on the gathered list with RoPE at list positions: [1, H, c, d]."""
    n_heads, c = q_pre.shape[1], q_pre.shape[2]
    g = n_heads // k_pre.shape[1]
    kv_len = retrieved.numel()
    k = rot(m, k_pre[:, :, retrieved], torch.arange(kv_len))
    q = rot(m, q_pre, torch.arange(kv_len - c, kv_len))
    out = torch.empty_like(q)
    allowed = torch.arange(kv_len)[None, :] <= torch.arange(kv_len - c, kv_len)[:, None]  # [c, kv_len]
    for h in range(n_heads):
        logits = (q[0, h] @ k[0, h // g].T * scale).masked_fill(~allowed, float("-inf"))
        out[0, h] = torch.softmax(logits, -1) @ v[0, h // g, retrieved]
    return out


def _case(m, n, c, seed):
    info = model_info(m)
    g = torch.Generator().manual_seed(seed)
    q_pre = torch.randn(1, info.n_heads, c, info.head_dim, generator=g)
    k_pre = torch.randn(1, info.n_kv_heads, n, info.head_dim, generator=g)
    v = torch.randn(1, info.n_kv_heads, n, info.head_dim, generator=g)
    pos = torch.arange(n)
    q_post, k_post = rot(m, q_pre, pos[n - c :]), rot(m, k_pre, pos)
    call = Call(q=q_post, k=k_post, v=v, q_pos=pos[n - c :], k_rope=pos, q_rope=pos[n - c :],
                phase="decode" if c == 1 else "extend", layer=0, keep=0, n_context=n, scaling=0.25, model=m,
                info=info, state={}, slot=(0, 0))
    return q_pre, k_pre, v, call


@pytest.mark.parametrize("n,c,seed", [(90, 1, 0), (200, 1, 1), (120, 16, 2)])
def test_compact_positions_match_official_flashinfer_rope(n, c, seed):
    """Decode (c = 1) and a prefill chunk of c = n_local queries (the official 512/512 pairing, scaled)."""
    m = model()
    n_init, n_local, keep = 4, 16, 44
    q_pre, k_pre, v, call = _case(m, n, c, seed)
    call.keep = keep
    retrieved = official_retrieval(m, q_pre, k_pre, n_init, n_local, keep - n_init - n_local)
    want = flashinfer_rope_llama(m, q_pre, k_pre, v, retrieved, 0.25)
    ts = TokenSelect(n_init=n_init, n_local=n_local, chunk_size=c)
    assert ts.positions == "compact"  # the official default
    pieces = ts.plan(call)
    assert len(pieces) == 1 and torch.equal(pieces[0].idx[0], retrieved)
    got = attend(call, pieces)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    orig = attend(call, TokenSelect(n_init=n_init, n_local=n_local, chunk_size=c, positions="original").plan(call))
    assert not torch.allclose(orig, want, atol=1e-3)  # the positions do matter here


def test_compact_masks_reused_slots_and_numbers_the_rest_contiguously():
    """Selection Cache hit: cached slots now inside the local window are masked; the attended list is
    numbered 0..L-1 without holes, the query at L - 1."""
    m = model()
    q_pre, k_pre, v, call = _case(m, 100, 1, 3)
    call.keep = 40
    ts = TokenSelect(n_init=4, n_local=16, theta=-1.0)
    ts.plan(call)  # fills the cache
    k_pre2 = torch.cat([k_pre, torch.randn(1, k_pre.shape[1], 6, k_pre.shape[-1])], 2)
    v2 = torch.cat([v, torch.randn(1, v.shape[1], 6, v.shape[-1])], 2)
    pos = torch.arange(106)
    call2 = Call(q=rot(m, q_pre, pos[-1:]), k=rot(m, k_pre2, pos), v=v2, q_pos=pos[-1:], k_rope=pos,
                 q_rope=pos[-1:], phase="decode", layer=0, keep=40, n_context=100, scaling=0.25, model=m,
                 info=call.info, state=call.state, slot=(0, 0))
    piece = ts.plan(call2)[0]
    valid = piece.valid[0]
    attended = piece.idx[0][valid]
    want = flashinfer_rope_llama(m, q_pre, k_pre2, v2, attended, 0.25)
    assert torch.allclose(attend(call2, [piece]), want, atol=1e-5)


def test_compact_keep_at_least_context_is_dense_and_generation_runs():
    m = model()
    x = torch.randint(1, 128, (1, 100), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, ref_gen = m(x).logits, m.generate(x, max_new_tokens=4, do_sample=False)
        with KVSieve(m, "tokenselect", keep=200, n_init=4, n_local=16, chunk_size=16, positions="compact"):
            assert torch.equal(m(x).logits, ref)
            assert torch.equal(m.generate(x, max_new_tokens=4, do_sample=False), ref_gen)
        outs = {}
        for p in ("compact", "original"):
            with KVSieve(m, "tokenselect", keep=40, n_init=4, n_local=16, chunk_size=16, positions=p) as s:
                outs[p] = m(x).logits
            assert s.trace.kv_selected(1, 0).shape == (1, 1, 40)
    assert not torch.allclose(outs["compact"], outs["original"])


def test_positions_errors():
    with pytest.raises(KVMethodError, match="positions"):
        KVSieve(model(), "tokenselect", keep=40, n_init=4, n_local=16, positions="reindex")

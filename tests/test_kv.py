"""KV sieve framework, dense/oracle/streaming baselines and TokenSelect on tiny random models."""

from __future__ import annotations

import pytest
import torch
from transformers import AttentionInterface, GPT2Config, GPT2LMHeadModel

import tokensieve
from tokensieve.kv import (
    KVBudgetError,
    KVMethodError,
    KVSieve,
    UnsupportedKVModelError,
    is_kv_method,
    list_kv_methods,
)
from tokensieve.kv.methods.tokenselect import TokenSelect
from tokensieve.kv.testing import tiny_causal_lm

TS = {"n_init": 4, "n_local": 16, "chunk_size": 16}
_MODELS: dict = {}


def model(family="llama", attn="sdpa"):
    if (family, attn) not in _MODELS:
        _MODELS[family, attn] = tiny_causal_lm(family, attn=attn)
    return _MODELS[family, attn]


def ids(n=100, seed=1, b=1):
    return torch.randint(1, 128, (b, n), generator=torch.Generator().manual_seed(seed))


def test_registry_lists_methods():
    assert {"dense", "oracle", "streaming", "tokenselect"} <= set(list_kv_methods())
    assert is_kv_method("tokenselect") and not is_kv_method("fastv") and not is_kv_method(3)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("method,hp", [("tokenselect", TS), ("oracle", {}), ("streaming", {})])
def test_keep_at_least_context_is_dense_exactly(attn, method, hp):
    m, x = model(attn=attn), ids()
    with torch.no_grad():
        ref = m(x).logits
        ref_gen = m.generate(x, max_new_tokens=4, do_sample=False)
        with KVSieve(m, method, keep=200, **hp):
            out = m(x).logits
            gen = m.generate(x, max_new_tokens=4, do_sample=False)
    assert torch.equal(ref, out) and torch.equal(ref_gen, gen)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_selection_changes_logits_and_traces_shared_set(attn):
    m, x = model(attn=attn), ids()
    with torch.no_grad():
        ref = m(x).logits
        with KVSieve(m, "tokenselect", keep=40, **TS) as s:
            out = m(x).logits
    assert not torch.allclose(ref, out)
    sel = s.trace.kv_selected(layer=1, step=0)
    assert sel.shape == (1, 1, 40) and sel.dtype == torch.long
    assert sel[0, 0, :4].tolist() == [0, 1, 2, 3] and sel[0, 0, -16:].tolist() == list(range(84, 100))
    assert torch.equal(sel.sort(-1).values, sel) and sel.unique().numel() == 40


def _vote_by_hand(fp, keys, head_map):
    n_heads, n_kv = fp.shape[0], keys.shape[0]
    g = n_heads // n_kv
    total = torch.zeros(keys.shape[1])
    for h in range(n_heads):
        kv = h % n_kv if head_map == "mod" else h // g
        s = [float(fp[h] @ keys[kv, i]) for i in range(keys.shape[1])]
        e = [torch.exp(torch.tensor(v - max(s))) for v in s]
        total += torch.stack(e) / sum(e)
    return total


@pytest.mark.parametrize("head_map", ["mod", "div"])
def test_head_mapping_and_soft_vote_match_hand_computed(head_map):
    fp = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 1.0], [-1.0, 1.0]])  # H = 4
    keys = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], [[2.0, 0.0], [0.0, -1.0], [0.5, 0.5]]])  # H_kv = 2
    got = TokenSelect(head_map=head_map).vote(fp, keys)
    assert torch.allclose(got, _vote_by_hand(fp, keys, head_map), atol=1e-6)
    other = TokenSelect(head_map="div" if head_map == "mod" else "mod").vote(fp, keys)
    assert not torch.allclose(got, other)


def test_batch_with_left_padding_is_batch_invariant():
    m = model()
    a, b = ids(90, seed=2), ids(70, seed=3)
    pad = torch.zeros(1, 20, dtype=torch.long)
    batch = torch.cat([a, torch.cat([pad, b], 1)])
    mask = torch.ones_like(batch)
    mask[1, :20] = 0
    hp = dict(keep=40, **TS)
    with torch.no_grad():
        singles = []
        for x in (a, b):
            with KVSieve(m, "tokenselect", **hp) as s:
                gen = m.generate(x, max_new_tokens=5, do_sample=False)
            singles.append((gen[0, x.shape[1]:], s.trace.kv_selected(1, 0)[0], s.trace.kv_selected(0, 3)[0]))
        with KVSieve(m, "tokenselect", **hp) as s:
            gen = m.generate(batch, attention_mask=mask, max_new_tokens=5, do_sample=False)
    for row, (tokens, sel0, sel3) in enumerate(singles):
        assert torch.equal(gen[row, 90:], tokens)
        off = 20 if row == 1 else 0
        assert torch.equal(s.trace.kv_selected(1, 0)[row], sel0 + off)
        assert torch.equal(s.trace.kv_selected(0, 3)[row], sel3 + off)


def test_generate_greedy_and_sampling():
    m, x = model(), ids()
    with torch.no_grad(), KVSieve(m, "tokenselect", keep=40, **TS) as s:
        greedy = m.generate(x, max_new_tokens=6, do_sample=False)
        torch.manual_seed(0)
        sample1 = m.generate(x, max_new_tokens=6, do_sample=True, top_k=20)
        torch.manual_seed(0)
        sample2 = m.generate(x, max_new_tokens=6, do_sample=True, top_k=20)
    assert greedy.shape == sample1.shape == (1, 106) and torch.equal(sample1, sample2)
    assert s.trace.n_steps(0) >= 5 and s.trace.kv_selected(0, 5).shape == (1, 1, 40)


def test_hooks_removed_after_exception():
    m, x = model(), ids()
    before = dict(AttentionInterface._global_mapping)
    with torch.no_grad():
        ref = m(x).logits
        with pytest.raises(RuntimeError, match="boom"), KVSieve(m, "tokenselect", keep=40, **TS):
            m(x)
            raise RuntimeError("boom")
        assert m.config._attn_implementation == "sdpa"
        assert dict(AttentionInterface._global_mapping) == before
        assert torch.equal(m(x).logits, ref)


@pytest.mark.parametrize("keep", [0, -3, "2048", True, 1.5, float("nan")])
def test_bad_keep_raises_before_forward(keep):
    with pytest.raises(KVBudgetError, match="keep"):
        KVSieve(model(), "tokenselect", keep=keep)


def test_errors_name_the_fix():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32)).eval()
    with pytest.raises(UnsupportedKVModelError, match="Llama, Qwen2, Qwen3, DeepseekV32"):
        KVSieve(gpt2, "tokenselect", keep=64)
    with pytest.raises(KVMethodError, match="available"):
        KVSieve(model(), "nope", keep=64)
    with pytest.raises(KVMethodError, match="valid"):
        KVSieve(model(), "tokenselect", keep=64, n_sinks=3)
    with pytest.raises(KVMethodError, match="keep > 20"):
        KVSieve(model(), "tokenselect", keep=20, **TS)
    with pytest.raises(KVMethodError, match="head_map"):
        KVSieve(model(), "tokenselect", keep=64, head_map="x")


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_other_families_run(family):
    m, x = model(family), ids()
    with torch.no_grad():
        ref = m(x).logits
        with KVSieve(m, "tokenselect", keep=200, **TS):
            assert torch.equal(m(x).logits, ref)
        with KVSieve(m, "tokenselect", keep=40, **TS) as s:
            m.generate(x, max_new_tokens=3, do_sample=False)
    assert s.trace.kv_selected(1, 2).shape == (1, 1, 40)


def test_selection_cache_theta_bounds():
    m, x = model(), ids()
    runs = {}
    with torch.no_grad():
        for theta in (None, 1.5, -1.0):
            with KVSieve(m, "tokenselect", keep=40, theta=theta, **TS) as s:
                runs[theta] = (m.generate(x, max_new_tokens=5, do_sample=False), s.trace)
    assert torch.equal(runs[None][0], runs[1.5][0])
    assert runs[1.5][1].stats.get("ts_hits", 0) == 0 and runs[1.5][1].stats["ts_lookups"] > 0
    st = runs[-1.0][1].stats
    n_layers = 2
    assert st["ts_hits"] == st["ts_lookups"] - n_layers  # every lookup but the first per layer reuses
    t = runs[-1.0][1]
    first = t.kv_selected(0, 0)[0, 0, 4:24]
    later = t.kv_selected(0, 3)[0, 0, 4:24]
    assert torch.equal(first[first >= 0], later[later >= 0][: (first >= 0).sum()])


def test_oracle_decode_matches_independent_topk():
    """Layer 0's input does not depend on the sieve, so HF's own eager attention weights give the exact top-k."""
    m, x = model(attn="eager"), ids()
    with torch.no_grad(), KVSieve(m, "oracle", keep=24) as s:
        gen = m.generate(x, max_new_tokens=2, do_sample=False)
    with torch.no_grad():
        weights = m(gen[:, :101], output_attentions=True).attentions[0][0, :, -1]  # [H, 101]
    want = weights.topk(24, dim=-1).indices.sort(-1).values
    assert torch.equal(s.trace.kv_selected(0, 1)[0].sort(-1).values, want)


def test_tokenselect_decode_plan_matches_official_steps():
    """Oracle written from the official retrieval_indices: pre-RoPE keys, query rotated at n_local, h mod H_kv,
    softmax over [n_init, N - n_local), sum over heads, topk, sort, + n_init, then sinks and local window."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from tokensieve.kv.families import model_info
    from tokensieve.kv.methods.base import Call

    m = model()
    g = torch.Generator().manual_seed(5)
    n, n_init, n_local, keep = 80, 4, 16, 40
    q_pre, k_pre = torch.randn(1, 4, 1, 16, generator=g), torch.randn(1, 2, n, 16, generator=g)
    pos = torch.arange(n)
    cos, sin = m.model.rotary_emb(k_pre, pos[None])
    _, k_post = apply_rotary_pos_emb(k_pre, k_pre, cos, sin)
    q_post, _ = apply_rotary_pos_emb(q_pre, q_pre, cos[:, -1:], sin[:, -1:])
    cos_l, sin_l = m.model.rotary_emb(q_pre, torch.tensor([[n_local]]))
    q_fp, _ = apply_rotary_pos_emb(q_pre, q_pre, cos_l, sin_l)
    cand = k_pre[0, :, n_init : n - n_local]
    scores = torch.stack([q_fp[0, h, 0] @ cand[h % 2].T for h in range(4)])
    top = torch.softmax(scores, -1).sum(0).topk(keep - n_init - n_local).indices.sort().values + n_init
    want = torch.cat([torch.arange(n_init), top, torch.arange(n - n_local, n)])
    call = Call(q=q_post, k=k_post, v=k_post, q_pos=torch.tensor([n - 1]), k_rope=pos, q_rope=pos[-1:],
                phase="decode", layer=0, keep=keep, n_context=n, scaling=0.25, model=m, info=model_info(m),
                state={}, slot=(0, 0))
    piece = TokenSelect(n_init=n_init, n_local=n_local).plan(call)[0]
    assert torch.equal(piece.idx[0], want)


def test_top_level_sieve_routes_kv_methods():
    m, x = model(), ids()
    with torch.no_grad():
        with KVSieve(m, "tokenselect", keep=40, **TS) as direct:
            ref = m(x).logits
        with tokensieve.sieve(m, "tokenselect", keep=40, **TS) as routed:
            out = m(x).logits
    assert isinstance(routed, KVSieve) and torch.equal(ref, out)
    assert torch.equal(direct.trace.kv_selected(layer=1, step=0), routed.trace.kv_selected(layer=1, step=0))
    with pytest.raises(tokensieve.UnsupportedModelError):  # a visual method on a causal LM still says so
        tokensieve.sieve(m, "fastv", keep=4)

"""HISA inside DeepseekV32 without the flat indexer (flat_reference=False): same selections, flat scores never
computed, the HF indexer cache kept consistent, and the wrapper gone on exit."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tokensieve.kv import KVSieve
from tokensieve.kv.testing import shared_deepseek_v32, token_ids

ds, ids = shared_deepseek_v32, token_ids


def _indexers(m):
    return [mod for mod in m.modules() if type(mod).__name__ == "DeepseekV32Indexer"]


@pytest.mark.parametrize("blocks_m", [3, 32])  # hierarchical regime, and blocks covering the context
def test_skipping_the_flat_indexer_gives_the_same_selection_and_output(blocks_m, monkeypatch):
    m, x = ds(), ids()
    relu_calls = []
    real_relu = F.relu
    monkeypatch.setattr(F, "relu", lambda *a, **k: relu_calls.append(1) or real_relu(*a, **k))
    runs = {}
    with torch.no_grad():
        for ref in (True, False):
            relu_calls.clear()
            with KVSieve(m, "hisa", keep=16, block=8, m=blocks_m, flat_reference=ref) as s:
                logits = m(x).logits
                gen = m.generate(x, max_new_tokens=4, do_sample=False)
            runs[ref] = (logits, gen, s.trace, len(relu_calls))
    (l1, g1, t1, n1), (l2, g2, t2, n2) = runs[True], runs[False]
    assert torch.equal(l1, l2) and torch.equal(g1, g2)
    for layer in (1,):
        for step in range(4):
            assert torch.equal(t1.kv_selected(layer, step), t2.kv_selected(layer, step))
    assert n1 > 0 and n2 == 0  # the flat indexer's ReLU(q.k) scores are never computed without the reference
    assert "hisa_iou_n" in t1.stats and "hisa_iou_n" not in t2.stats
    assert all("forward" not in mod.__dict__ for mod in _indexers(m))


def test_skip_wrapper_removed_after_exception_and_model_unchanged():
    m, x = ds(), ids(60)
    with torch.no_grad():
        ref = m.generate(x, max_new_tokens=3, do_sample=False)
        with pytest.raises(RuntimeError, match="boom"), KVSieve(m, "hisa", keep=16, block=8, m=3,
                                                                 flat_reference=False):
            m(x)
            raise RuntimeError("boom")
        assert all("forward" not in mod.__dict__ for mod in _indexers(m))
        assert torch.equal(m.generate(x, max_new_tokens=3, do_sample=False), ref)


def test_hisa_indices_stay_in_range_when_the_last_block_is_padded():
    """T = 60 with B = 8: causal prefill queries that see fewer than k candidates pick -inf slots, which must
    never point into the zero padding of the last block."""
    from tokensieve.kv.ops import hisa_topk

    g = torch.Generator().manual_seed(0)
    q, w, k = torch.randn(60, 4, 16, generator=g), torch.rand(60, 4, generator=g), torch.randn(60, 16, generator=g)
    vis = torch.tril(torch.ones(60, 60, dtype=torch.bool))
    sel = hisa_topk(q, w, k, vis, 16, 8, 3, 0.25)
    assert sel.shape == (60, 16) and int(sel.max()) < 60
    row = sel[59]  # the last query sees everything: 16 distinct visible keys inside <= 3 blocks
    assert row.unique().numel() == 16 and len((row // 8).unique()) <= 3


def test_pooled_keys_maintained_incrementally_equal_block_means():
    from tokensieve.kv.ops import PooledKeys, pool_keys

    g = torch.Generator().manual_seed(2)
    k = torch.randn(300, 8, generator=g)
    pk = PooledKeys(32)
    for t in (70, 71, 140, 300):
        means = pk.update(k[:t])
        assert torch.allclose(means, pool_keys(k[:t], 32)[0], atol=1e-6)
    k2 = k.clone()
    k2[200:] = torch.randn(100, 8, generator=g)  # same length, other rows (a beam reorder): recomputed
    assert torch.allclose(pk.update(k2), pool_keys(k2, 32)[0], atol=1e-6)

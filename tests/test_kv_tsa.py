"""Token Sparse Attention: compact attention equals masked dense, coverage bounds, drift layers, dense cases."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tokensieve.kv import KVSieve
from tokensieve.kv.attend import attend_compact
from tokensieve.kv.families import model_info
from tokensieve.kv.methods.base import Call
from tokensieve.kv.methods.tsa import TSA
from tokensieve.kv.testing import tiny_causal_lm

_M: dict = {}


def model():
    if "m" not in _M:
        _M["m"] = tiny_causal_lm(layers=4)
    return _M["m"]


def _call(n=120, seed=0, keep=16):
    m = model()
    g = torch.Generator().manual_seed(seed)
    q, k, v = torch.randn(1, 4, n, 16, generator=g), torch.randn(1, 2, n, 16, generator=g), torch.randn(1, 2, n, 16,
                                                                                                     generator=g)
    return Call(q=q, k=k, v=v, q_pos=torch.arange(n), k_rope=torch.arange(n), q_rope=torch.arange(n),
                phase="prefill", layer=2, keep=keep, n_context=n, scaling=0.25, model=m, info=model_info(m),
                state={}, slot=(2, 0))


def test_compact_causal_attention_equals_dense_masked_to_selection():
    call = _call()
    g = torch.Generator().manual_seed(1)
    idx = torch.stack([torch.randperm(100, generator=g)[:40].sort().values for _ in range(4)])
    idx = torch.cat([idx, torch.arange(100, 120).expand(4, 20)], dim=1)
    out = attend_compact(call, idx)[0]
    inset = torch.zeros(4, 120, dtype=torch.bool).scatter_(1, idx, True)
    causal = torch.ones(120, 120, dtype=torch.bool).tril()
    mask = inset[:, None, :] & inset[:, :, None] & causal
    k = call.k.repeat_interleave(2, dim=1)
    v = call.v.repeat_interleave(2, dim=1)
    want = F.scaled_dot_product_attention(call.q, k, v, attn_mask=mask[None], scale=0.25)[0]
    assert torch.allclose(out[inset], want[inset], atol=1e-5)
    assert torch.equal(out[~inset], torch.zeros_like(out[~inset]))


def test_coverage_bounds_set_equal_length_per_head():
    big = TSA(tau=0.9, window=20).select(_call(keep=16))
    assert big.shape == (4, 16 + 20)  # the min_tokens floor
    small = TSA(tau=1e-9, window=20).select(_call(keep=16))
    assert small.shape == (4, 119)  # n_sparse = 0 + 1
    for s in (big, small):
        assert torch.equal(s, s.sort(-1).values) and (s[:, -20:] == torch.arange(100, 120)).all()


def test_drift_profile_picks_low_drift_layers_and_dense_cases():
    m = model()
    x = torch.randint(1, 128, (1, 200), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = m(x).logits
        with KVSieve(m, "tsa", keep=16, window=20, tau=0.0):
            assert torch.equal(m(x).logits, ref)
        with KVSieve(m, "tsa", keep=400, window=20):
            assert torch.equal(m(x).logits, ref)
        with KVSieve(m, "tsa", keep=16, window=20, tau=0.05) as s:
            gen = m.generate(x, max_new_tokens=2, do_sample=False)
    drift = torch.tensor(s.method.extra["drift"])
    assert s.method.sparse_layers == torch.nonzero(drift <= drift.quantile(0.5)).view(-1).tolist()
    layer = s.method.sparse_layers[0]
    assert s.trace.kv_selected(layer, 0).shape[1] == 4  # per head
    assert s.trace.kv_selected(layer, 1).shape == (1, 1, 201)  # decode is dense
    assert gen.shape == (1, 202)

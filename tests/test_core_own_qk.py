"""The ``own_qk`` signal: layer K's own queries/keys after RoPE, from its input, at its pre-hook (no second run
of the layer, no cache write), checked against q/k computed by hand from the layer's modules."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from conftest import build, make_inputs

import tokensieve
from tokensieve.methods.base import LLMMethod
from tokensieve.methods.random import Random

LAYER = 2


@dataclass
class _OwnQKSpy(LLMMethod):
    name = "_test_own_qk"
    needs = frozenset({"hidden", "own_qk"})
    seen: ClassVar[list] = []

    def select(self, ctx, k):
        _OwnQKSpy.seen.append((ctx.sample, ctx.capture(ctx.layer), ctx.image_rows(ctx.layer)))
        return torch.arange(k)


def _layer_inputs(model, inputs, layer: int):
    """Input hidden states and (cos, sin) of decoder ``layer`` in an unsieved forward."""
    seen = {}
    block = model.model.language_model.layers[layer]
    handle = block.register_forward_pre_hook(
        lambda m, a, kw: seen.update(hidden=a[0] if a else kw["hidden_states"], rope=kw["position_embeddings"]),
        with_kwargs=True,
    )
    with torch.no_grad():
        model(**inputs)
    handle.remove()
    return seen["hidden"], seen["rope"]


def _hand_qk(model, hidden, rope, layer: int):
    block = model.model.language_model.layers[layer]
    attn = block.self_attn
    cfg = model.model.language_model.config
    d = attn.head_dim
    with torch.no_grad():
        x = block.input_layernorm(hidden)
        b, n, _ = x.shape
        q = attn.q_proj(x).view(b, n, cfg.num_attention_heads, d).transpose(1, 2)
        k = attn.k_proj(x).view(b, n, cfg.num_key_value_heads, d).transpose(1, 2)
        apply = sys.modules[type(attn).__module__].apply_rotary_pos_emb
        return apply(q, k, *rope)


@pytest.mark.parametrize("family_name", ["llava", "qwen2_5_vl"])
def test_own_qk_matches_hand_computation(family_name):
    model, _ = build(family_name)
    inputs = make_inputs(family_name)
    hidden, rope = _layer_inputs(model, inputs, LAYER)
    q_ref, k_ref = _hand_qk(model, hidden, rope, LAYER)
    calls = []
    block = model.model.language_model.layers[LAYER]
    handle = block.register_forward_hook(lambda *a: calls.append(1))
    _OwnQKSpy.seen.clear()
    try:
        with tokensieve.sieve(model, _OwnQKSpy(keep=3, layer=LAYER)), torch.no_grad():
            cache = model(**inputs, use_cache=True).cache
    finally:
        handle.remove()
    assert calls == [1]  # the layer ran once
    assert len(_OwnQKSpy.seen) == 2
    for b, cap, rows in _OwnQKSpy.seen:
        assert cap.queries.shape == q_ref[b].shape and cap.keys.shape == k_ref[b].shape
        assert torch.allclose(cap.queries, q_ref[b], atol=1e-5)
        assert torch.allclose(cap.keys, k_ref[b], atol=1e-5)
        assert torch.equal(cap.hidden, hidden[b])
        assert rows.numel() == int((inputs["input_ids"][b] == model.config.image_token_id).sum())
    kept = 3 + int(
        (inputs["attention_mask"].bool() & (inputs["input_ids"] != model.config.image_token_id)).sum(1).max()
    )
    assert cache.layers[LAYER].keys.shape[-2] == kept  # the cache holds layer K's pruned rows, once


def test_own_qk_after_an_earlier_stage_uses_the_pruned_layout():
    """Layer K's q/k come from its own (already pruned) input rows, with the positions those rows use (the
    ``original`` policy keeps each row's prompt column as its position on LLaVA)."""
    model, _ = build("llava")
    inputs = make_inputs("llava")
    _OwnQKSpy.seen.clear()
    first = Random(keep=6, layer=1, seed=2, positions="original")
    with tokensieve.sieve(model, [first, _OwnQKSpy(keep=3, layer=LAYER)]) as s, torch.no_grad():
        model(**inputs)
    assert s.trace.kept(0, 0, stage=0).numel() == 6
    rotary = model.model.language_model.rotary_emb
    for b, cap, rows in _OwnQKSpy.seen:
        assert int(cap.valid.sum()) == int(inputs["attention_mask"][b].sum()) - 16 + 6
        assert rows.numel() == 6 and bool((rows >= 0).all())
        rope = rotary(cap.hidden[None], cap.cols[None])
        q_ref, k_ref = _hand_qk(model, cap.hidden[None], rope, LAYER)
        valid = cap.valid
        assert torch.allclose(cap.queries[:, valid], q_ref[0][:, valid], atol=1e-5)
        assert torch.allclose(cap.keys[:, valid], k_ref[0][:, valid], atol=1e-5)

"""generate() modes under a sieve: uncached re-prefill, beams, sampling work; static caches and assisted
decoding fail clearly before any forward pass."""

from __future__ import annotations

import pytest
import torch
from conftest import build, make_inputs

import tokensieve
from tokensieve import SieveUsageError
from tokensieve.methods.random import Random

STEPS = 4


def _generate(model, inputs, **kw):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=STEPS, min_new_tokens=STEPS, **kw)


def _keep_all_and_pruned(model, inputs, method, **kw):
    torch.manual_seed(0)
    reference = _generate(model, inputs, **kw)
    with tokensieve.sieve(model, Random(keep=1.0)):
        torch.manual_seed(0)
        keep_all = _generate(model, inputs, **kw)
    with tokensieve.sieve(model, method) as s:
        torch.manual_seed(0)
        pruned = _generate(model, inputs, **kw)
    return reference, keep_all, pruned, s


def _stages(where: str):
    return {"projector": [Random(keep=0.4)], "llm": [Random(keep=0.3, layer=2)]}[where]


@pytest.mark.parametrize("where", ["projector", "llm"])
def test_use_cache_false_matches_cached_decoding(family, where):
    """Uncached generation re-prefills prompt + generated tokens each step; its pruned tokens are the cached ones."""
    model, _ = build(family)
    inputs = make_inputs(family)
    reference, keep_all, uncached, s = _keep_all_and_pruned(model, inputs, _stages(where), use_cache=False)
    assert torch.equal(keep_all, reference)
    assert len(s.traces) == STEPS  # one prefill per step
    assert all(torch.equal(t.kept(1, 0), s.traces[0].kept(1, 0)) for t in s.traces)
    with tokensieve.sieve(model, _stages(where)):
        cached = _generate(model, inputs, do_sample=False)
    assert torch.equal(uncached, cached)


@pytest.mark.parametrize("where", ["projector", "llm"])
def test_beam_search(family, where):
    """Beams repeat each sample: every expanded row maps back to its image (same tokens kept per beam)."""
    model, _ = build(family)
    inputs = make_inputs(family)
    reference, keep_all, beams, s = _keep_all_and_pruned(model, inputs, _stages(where), num_beams=2, do_sample=False)
    assert torch.equal(keep_all, reference)
    assert s.trace.num_images() == 4  # 2 samples x 2 beams
    for b in range(2):
        assert torch.equal(s.trace.kept(2 * b, 0), s.trace.kept(2 * b + 1, 0))
    with tokensieve.sieve(model, _stages(where)):
        uncached = _generate(model, inputs, num_beams=2, do_sample=False, use_cache=False)
    assert torch.equal(beams, uncached)


def test_sampling(family):
    model, _ = build(family)
    inputs = make_inputs(family)
    reference, keep_all, _, _ = _keep_all_and_pruned(model, inputs, Random(keep=0.4), do_sample=True)
    assert torch.equal(keep_all, reference)
    with tokensieve.sieve(model, Random(keep=0.4)):
        torch.manual_seed(1)
        cached = _generate(model, inputs, do_sample=True, top_k=5)
        torch.manual_seed(1)
        uncached = _generate(model, inputs, do_sample=True, top_k=5, use_cache=False)
    assert torch.equal(cached, uncached)


def _forward_calls(model):
    calls = []
    handle = model.model.register_forward_pre_hook(lambda *a: calls.append(1))
    return calls, handle


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(cache_implementation="static"), "static"),
        (dict(prompt_lookup_num_tokens=2), "prompt_lookup_num_tokens"),
        (dict(assistant_model="self"), "assistant_model"),
        (dict(past_key_values="static"), "StaticCache"),
    ],
    ids=["cache_implementation", "prompt_lookup", "assistant_model", "StaticCache"],
)
def test_unsupported_modes_fail_before_any_forward(kwargs, match):
    from transformers import StaticCache

    model, _ = build("llava")
    inputs = make_inputs("llava")
    kwargs = dict(kwargs)
    if kwargs.get("assistant_model") == "self":
        kwargs["assistant_model"] = model
    if kwargs.get("past_key_values") == "static":
        kwargs["past_key_values"] = StaticCache(config=model.config, max_cache_len=64)
    calls, handle = _forward_calls(model)
    try:
        with tokensieve.sieve(model, "divprune", keep=4), pytest.raises(SieveUsageError, match=match):
            model.generate(**inputs, max_new_tokens=2, **kwargs)
    finally:
        handle.remove()
    assert calls == []


def test_static_cache_in_a_plain_forward_fails_before_the_model_runs():
    from transformers import StaticCache

    model, _ = build("llava")
    inputs = make_inputs("llava")
    cache = StaticCache(config=model.config, max_cache_len=64)
    with tokensieve.sieve(model, "divprune", keep=4), pytest.raises(SieveUsageError, match="StaticCache"):
        model(**inputs, cache=cache, use_cache=True)
    assert all(int(layer.keys.abs().sum()) == 0 for layer in cache.layers if getattr(layer, "keys", None) is not None)

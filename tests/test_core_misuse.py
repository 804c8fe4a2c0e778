"""Misuse never gives a silently wrong answer: threads, compiled models, nested or out-of-order sieves,
output_attentions / output_hidden_states under pruning, bad seeds and layers."""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import build, make_inputs

import tokensieve
from tokensieve import MethodError, SieveUsageError, UnsupportedModelError
from tokensieve.methods.random import Random
from tokensieve.testing import tiny_llava

PATCHED = ("get_image_features", "generate", "_tokensieve_active")


def _hook_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _patched(model) -> list[str]:
    return [name for name in PATCHED if name in model.__dict__ or name in model.model.__dict__]


def _single(inputs, b: int) -> dict:
    return {k: v[b : b + 1] for k, v in inputs.items()}


def test_two_threads_share_one_sieved_model():
    model, _ = build("llava")
    inputs = make_inputs("llava", batch=3)
    rows = [_single(inputs, b) for b in range(3)]
    method = Random(keep=0.25, layer=2)
    with tokensieve.sieve(model, method), torch.no_grad():
        expected = [model(**row).logits for row in rows]
        results: dict = {}
        errors: list = []

        def worker(t: int) -> None:
            try:
                for i in range(8):
                    b = (t + i) % 3
                    with torch.no_grad():
                        results[(t, i)] = (b, model(**rows[b]).logits)
            except Exception as err:  # pragma: no cover - reported below
                errors.append(err)

        threads = [threading.Thread(target=worker, args=(t,)) for t in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert errors == []
    assert len(results) == 24
    for b, logits in results.values():
        assert torch.equal(logits, expected[b])


def test_compiled_model_is_refused():
    model, _ = tiny_llava(layers=1)
    with pytest.raises(UnsupportedModelError, match="torch.compile"):
        tokensieve.sieve(torch.compile(model), "divprune", keep=4)
    model.model.language_model.compile()
    with pytest.raises(UnsupportedModelError, match="compiled in place"):
        tokensieve.sieve(model, "divprune", keep=4)


def test_nested_sieves_fail_clearly_and_leave_the_outer_one_working(family):
    model, _ = build(family)
    inputs = make_inputs(family)
    with torch.no_grad():
        model(**inputs)  # transformers installs its output recorders at the first call
    before = _hook_count(model)
    with tokensieve.sieve(model, "divprune", keep=0.5) as outer:
        hooks = _hook_count(model)
        with pytest.raises(SieveUsageError, match="nested"):
            with tokensieve.sieve(model, "random", keep=2):
                pass
        assert _hook_count(model) == hooks
        with torch.no_grad():
            model(**inputs)
        assert outer.trace.kept(0, 0).numel() == outer.trace.images[(0, 0)]["n_tokens"] // 2
    assert _hook_count(model) == before and _patched(model) == []


def test_sieves_exited_out_of_order_leave_nothing_behind():
    model, _ = build("llava")
    inputs = make_inputs("llava")
    with torch.no_grad():
        reference = model(**inputs).logits
    before = _hook_count(model)
    a, b = tokensieve.sieve(model, "divprune", keep=4), tokensieve.sieve(model, "random", keep=2)
    a.__enter__()
    with pytest.raises(SieveUsageError):
        b.__enter__()
    a.__exit__(None, None, None)
    b.__enter__()
    a.__exit__(None, None, None)  # a second exit of a dead sieve must not touch the live one
    with torch.no_grad():
        model(**inputs)
    assert b.trace.kept(0, 0).numel() == 2
    assert len(a.traces) == 0
    b.__exit__(None, None, None)
    assert _hook_count(model) == before and _patched(model) == []
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, reference)


def test_no_image_records_are_kept_between_calls():
    model, _ = build("llava")
    inputs = make_inputs("llava")
    with tokensieve.sieve(model, "divprune", keep=4) as s, torch.no_grad():
        for _ in range(3):
            model(**inputs)
            assert s._states.get().records == []
        model.generate(**inputs, max_new_tokens=2)
        assert s._states.get().records == []


@pytest.mark.parametrize("where", ["projector", "llm"])
def test_output_hidden_states_and_attentions_are_realigned(where):
    model, _ = build("llava", "eager")
    inputs = make_inputs("llava")
    length = inputs["input_ids"].shape[1]
    method = Random(keep=4) if where == "projector" else Random(keep=4, layer=2)
    with torch.no_grad():
        full = model(**inputs, output_hidden_states=True, output_attentions=True)
    with tokensieve.sieve(model, method) as s, torch.no_grad():
        out = model(**inputs, output_hidden_states=True, output_attentions=True)
        gen = model.generate(**inputs, max_new_tokens=2, output_attentions=True, return_dict_in_generate=True)
    assert all(h.shape[1] == length for h in out.hidden_states)
    assert all(a.shape[-2:] == (length, length) for a in out.attentions)
    image_cols = torch.nonzero(inputs["input_ids"][0] == model.config.image_token_id).flatten()
    kept = image_cols[s.trace.kept(0, 0)]
    dropped = image_cols[~torch.isin(image_cols, kept)]
    start = 0 if where == "projector" else 3  # hidden_states[i] is the output of layer i - 1
    for i, h in enumerate(out.hidden_states):
        if i >= start:
            assert bool((h[0, dropped] == 0).all())
        else:  # before pruning: the unpruned model's values, column by column
            assert torch.allclose(h[0, kept], full.hidden_states[i][0, kept], atol=1e-5)
    last = int(inputs["attention_mask"][0].nonzero().max())
    row = out.attentions[-1][0, :, last]
    assert torch.allclose(row.sum(-1), torch.ones(row.shape[0]), atol=1e-5)
    assert bool((row[:, dropped] == 0).all())
    step = gen.attentions[1]  # first decoding step: keys = prompt columns + 1 generated token
    assert all(a.shape[-1] == length + 1 for a in step)


def test_large_seed_works_and_bad_seeds_fail_at_construction():
    model, _ = build("llava")
    inputs = make_inputs("llava")
    kept = []
    for seed in (2**62, 2**62, 0):
        with tokensieve.sieve(model, "random", keep=4, seed=seed) as s, torch.no_grad():
            model(**inputs)
        kept.append(s.trace.kept(0, 0))
    assert torch.equal(kept[0], kept[1]) and not torch.equal(kept[0], kept[2])
    for seed in (-1, 2**63, 1.5, "3", True):
        with pytest.raises(MethodError, match="seed"):
            tokensieve.sieve(model, "random", keep=4, seed=seed)


@pytest.mark.parametrize("name", ["fastv", "dart", "random"])
def test_bad_layer_fails_at_construction(name):
    model, _ = build("llava")
    with pytest.raises(MethodError, match="layer"):
        tokensieve.sieve(model, name, keep=4, layer="2")
    with pytest.raises(MethodError, match="layer"):
        tokensieve.sieve(model, name, keep=4, layer=2.5)
    # layer=None is the default: the paper's layer scaled with depth (fastv, dart), the projector stage (random)
    with tokensieve.sieve(model, name, keep=4, layer=None) as s:
        assert s.plan is not None

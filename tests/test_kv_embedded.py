"""The shipped long-context LM: loads as a small Llama, retrieves densely on the seeded check sample recorded in
meta.json (every task above its floor), and a StreamingLLM-style window at a small keep fails where dense succeeds
(selection matters)."""

from __future__ import annotations

import random

import pytest

from tokensieve.kv.embedded import MODEL_DIR, dense_accuracy, embedded_meta, load_embedded
from tokensieve.kv.methods import make_kv_method
from tokensieve.kv.tasks import TASKS, make_sample

pytestmark = pytest.mark.skipif(not (MODEL_DIR / "model.safetensors").exists(), reason="embedded KV model not built")

IN_DISTRIBUTION = (512, 1024, 2048)
# meta.json "check" (n=10) measured 1.0 on every task at 512 and 1024;
# an untrained model scores ~0 (an answer is 1 of 256 tokens)
FLOORS = {"single": 0.8, "multikey": 0.8, "multivalue": 0.6, "vartrack": 0.8}


@pytest.fixture(scope="module")
def model():
    return load_embedded()


def test_embedded_model_loads_and_is_small(model):
    assert type(model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in model.parameters()) < 2_000_000
    assert (MODEL_DIR / "model.safetensors").stat().st_size < 8_000_000


@pytest.mark.xfail(strict=True, reason="NOT MET YET: multivalue 0.80-0.90 at 512-4096 and vartrack 0.93 at "
                   "2048 against the issue's 95% bar (meta.json, n=30); single 1.00 and multikey 0.97-1.00 meet "
                   "it (docs/kv/embedded_model.md)")
def test_meta_claims_the_accuracy_bar_in_distribution():
    acc = embedded_meta()["dense_accuracy"]
    for length in IN_DISTRIBUTION:
        for task in TASKS:
            assert acc[f"{task}@{length}"] >= 0.95, f"{task}@{length}: {acc[f'{task}@{length}']}"


def test_dense_accuracy_on_the_check_sample(model):
    check = embedded_meta()["check"]
    got = dense_accuracy(model, check["lengths"], check["n"], check["seed"])
    assert got == check["dense_accuracy"]  # deterministic: the figures written at training time reproduce
    for length in check["lengths"]:
        for task, floor in FLOORS.items():
            assert got[f"{task}@{length}"] >= floor, got


def test_streaming_window_fails_where_dense_succeeds(model):
    from tokensieve.kv.bench import greedy_exact_match

    rng = random.Random(7)
    samples = [make_sample("single", 1024, rng) for _ in range(12)]
    dense = sum(greedy_exact_match(model, make_kv_method("dense"), 1024, s.prompt, s.answer) for s in samples)
    window = make_kv_method("streaming", n_sink=4)
    streaming = sum(greedy_exact_match(model, window, 32, s.prompt, s.answer) for s in samples)
    assert dense >= 10 and streaming <= 3, (dense, streaming)

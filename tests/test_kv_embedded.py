"""The shipped long-context LM: loads as a Llama, and its meta.json numbers reproduce exactly."""

from __future__ import annotations

import pytest

from tokensieve.kv.embedded import MODEL_DIR, dense_accuracy, embedded_meta, load_embedded

pytestmark = pytest.mark.skipif(not (MODEL_DIR / "model.safetensors").exists(), reason="embedded KV model not built")


def test_embedded_model_loads_and_is_small():
    model = load_embedded()
    assert type(model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in model.parameters()) < 2_000_000
    assert (MODEL_DIR / "model.safetensors").stat().st_size < 8_000_000


def test_meta_dense_accuracy_reproduces_at_512():
    meta = embedded_meta()
    model = load_embedded()
    got = dense_accuracy(model, [512], meta.get("eval_n", 40))
    want = {k: v for k, v in meta["dense_accuracy"].items() if k.endswith("@512")}
    assert got == want

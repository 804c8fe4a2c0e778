"""kv-bench's teacher-forced greedy exact match decides exactly as generate(do_sample=False) does."""

from __future__ import annotations

import random

import torch

from tokensieve.kv import KVSieve
from tokensieve.kv.bench import greedy_exact_match, run_cell
from tokensieve.kv.methods import make_kv_method
from tokensieve.kv.tasks import make_sample
from tokensieve.kv.testing import tiny_causal_lm


def test_greedy_exact_match_agrees_with_generate():
    model = tiny_causal_lm(vocab=768, layers=2, seed=3)
    rng = random.Random(0)
    methods = (("dense", {}, 256), ("streaming", {"n_sink": 4}, 24),
               ("tokenselect", {"n_init": 4, "n_local": 8, "chunk_size": 64}, 40))
    for label, hp, keep in methods:
        method = make_kv_method(label, **hp)
        s = make_sample("vartrack", 256, rng, n_distract=4)
        with torch.no_grad(), KVSieve(model, method, keep=keep):
            out = model.generate(torch.tensor([s.prompt]), max_new_tokens=4, do_sample=False, pad_token_id=0)
        greedy = out[0, len(s.prompt):].tolist()
        with torch.no_grad():
            assert greedy_exact_match(model, method, keep, s.prompt, greedy)
            for j in range(4):  # a miss at any step is a miss
                wrong = list(greedy)
                wrong[j] = 512 + (wrong[j] - 511) % 256
                assert not greedy_exact_match(model, method, keep, s.prompt, wrong)


def test_run_cell_fidelity_subset():
    model = tiny_causal_lm(vocab=768, layers=1)
    full = run_cell(model, "streaming", 24, 128, "single", 3)
    sub = run_cell(model, "streaming", 24, 128, "single", 3, fidelity_n=1)
    first = run_cell(model, "streaming", 24, 128, "single", 1)
    assert full["fidelity_n"] == 3 and sub["fidelity_n"] == 1
    assert sub["accuracy"] == full["accuracy"]  # the same paired samples
    assert sub["attn_err"] == first["attn_err"] and sub["topk_recall"] == first["topk_recall"]

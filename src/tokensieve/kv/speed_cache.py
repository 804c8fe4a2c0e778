"""TokenSelect's Selection Cache (Alg. 1, threshold theta): hit rate on real decode steps, and its cost.

- ``cache_hit_rate``: greedy answers of the embedded LM on the retrieval tasks, one sieve per sample; the hit
  rate counts decode steps only (prefill chunks are snapshotted away) and the accuracy is exact match, next
  to the same samples with the cache off (theta None) and dense.
- ``cache_costs``: at Llama-8B shapes, one decode step's plan on a miss (full scoring) and on a hit
  (fingerprint + cosine + index build), interleaved; amortised plan = h * hit + (1 - h) * miss for a hit rate h.
"""

from __future__ import annotations

import random

import torch

from .bench import method_and_hp
from .sieve import KVSieve
from .speed import _shape_model, bench_method, decode_call, interleaved
from .tasks import make_sample


@torch.no_grad()
def _answer(model, prompt: list[int], n_new: int, method, keep: int, hp: dict) -> tuple[list[int], dict]:
    """Greedy answer tokens and the decode-only Selection Cache counts (dense when method is None)."""
    x = torch.tensor([prompt])
    if method is None:
        out = model.generate(x, max_new_tokens=n_new, do_sample=False, pad_token_id=0)
        return out[0, len(prompt):].tolist(), {}
    with KVSieve(model, method, keep=keep, **hp) as s:
        out = model(x, use_cache=True)
        pre = dict(s.trace.stats)
        cache, tok, toks = out.past_key_values, out.logits[:, -1:].argmax(-1), []
        for _ in range(n_new):
            toks.append(int(tok))
            if len(toks) == n_new:
                break
            out = model(tok, past_key_values=cache, use_cache=True)
            cache, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
    st = s.trace.stats
    return toks, {k: st.get(k, 0) - pre.get(k, 0) for k in ("ts_lookups", "ts_hits")}


@torch.no_grad()
def cache_hit_rate(model, thetas: list[float | None], length: int, keep: int, n: int,
                   tasks: tuple[str, ...] = ("multivalue", "vartrack"), seed: int = 0) -> list[dict]:
    """One row per theta (and one for dense): decode hit rate and exact-match accuracy on paired samples."""
    name, hp = method_and_hp("tokenselect")
    rng = random.Random(f"cache-{seed}-{length}")
    samples = [make_sample(t, length, rng, n_distract=8) for t in tasks for _ in range(n)]
    rows = []
    for theta in ["dense", *thetas]:
        ok, lookups, hits = 0, 0, 0
        for s in samples:
            method = None if theta == "dense" else name
            toks, st = _answer(model, s.prompt, len(s.answer), method, keep, {**hp, "theta": theta})
            ok += int(toks == s.answer)
            lookups, hits = lookups + st.get("ts_lookups", 0), hits + st.get("ts_hits", 0)
        rows.append({"bench": "selection_cache", "method": "tokenselect", "theta": theta, "n": length,
                     "keep": keep, "samples": len(samples), "tasks": list(tasks), "accuracy": ok / len(samples),
                     "decode_lookups": lookups, "hit_rate": hits / lookups if lookups else None,
                     "threads": torch.get_num_threads()})
    return rows


@torch.no_grad()
def cache_costs(n: int = 16384, keep: int = 512, heads: int = 32, kv_heads: int = 8, head_dim: int = 128,
                reps: int = 7) -> dict:
    """Plan time of one decode step on a Selection Cache miss and on a hit, interleaved."""
    model = _shape_model(heads, kv_heads, head_dim)
    miss = bench_method("tokenselect", heads, head_dim, theta=None)
    hit = bench_method("tokenselect", heads, head_dim, theta=-1.0)  # cos >= -1 always: every lookup reuses
    c_miss, c_hit = decode_call(model, n, keep), decode_call(model, n, keep)
    hit.plan(c_hit)  # fills the cache; every later plan is a hit
    med = interleaved({"miss": lambda: miss.plan(c_miss), "hit": lambda: hit.plan(c_hit)}, reps)
    return {"bench": "selection_cache_cost", "method": "tokenselect", "n": n, "keep": keep,
            "miss_ms": med["miss"] * 1e3, "hit_ms": med["hit"] * 1e3, "threads": torch.get_num_threads()}

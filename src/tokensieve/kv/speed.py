"""kv-bench timings on this CPU, always interleaved with dense in the same loop (medians of >= 5 rounds).

- ``decode_attention``: one decode step of one attention layer with Llama-8B shapes (H 32, H_kv 8, d 128) at
  context N. Dense = the model's own attention path for that step (transformers' ``sdpa_attention_forward``,
  which with no mask runs SDPA with ``enable_gqa``); also timed in the same rounds: the fastest dense SDPA
  formulation found here (GQA groups packed as query rows, ``dense_packed``) and one pass over the fp32 keys
  (``key_pass``, the memory floor of any selection that scores every key). A method = its selection
  (``plan``) + attention over the selection; per-slot state (pre-RoPE key cache) is warm, as in steady decoding.
- ``indexer``: DSA flat indexer top-k vs HISA at N (decode query), with the IoU of the two selections.
- ``model_latency``: prefill and per-token decode of a random-weight mid-size Llama, method vs dense.
- ``selection_cache``: TokenSelect's Selection Cache over real decode steps (``speed_cache``).

``python -m tokensieve.kv.speed --threads 2`` runs everything (resumable JSONL + markdown, ``speed_report``).
"""

from __future__ import annotations

import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from .attend import attend, grouped_sdpa
from .bench import method_and_hp
from .families import model_info
from .methods import make_kv_method
from .methods.base import Call
from .ops import flat_topk, hisa_topk, pool_keys, selection_iou


def _shape_model(heads: int, kv_heads: int, head_dim: int) -> LlamaForCausalLM:
    cfg = LlamaConfig(vocab_size=16, hidden_size=heads * head_dim, intermediate_size=16, num_hidden_layers=1,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                      max_position_embeddings=1 << 17, rope_theta=500000.0, attn_implementation="sdpa")
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model.model.rotary_emb = type(model.model.rotary_emb)(cfg)  # real buffers; weights stay on meta (unused)
    return model


def interleaved(fns: dict, reps: int) -> dict[str, float]:
    """Median seconds of each callable, run round-robin ``reps`` times (the order rotates every round)."""
    names, times = list(fns), {k: [] for k in fns}
    for r in range(reps):
        for name in names[r % len(names):] + names[: r % len(names)]:
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def _median_pair(fn_a, fn_b, reps: int) -> tuple[float, float]:
    med = interleaved({"a": fn_a, "b": fn_b}, reps)
    return med["a"], med["b"]


def decode_call(model, n: int, keep: int, seed: int = 0) -> Call:
    """Random decode-step tensors at the shapes of ``model`` (one layer, the query at position n - 1)."""
    info = model_info(model)
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, info.n_heads, 1, info.head_dim, generator=g)
    k = torch.randn(1, info.n_kv_heads, n, info.head_dim, generator=g)
    v = torch.randn(1, info.n_kv_heads, n, info.head_dim, generator=g)
    pos = torch.arange(n)
    return Call(q=q, k=k, v=v, q_pos=pos[-1:], k_rope=pos, q_rope=pos[-1:], phase="decode", layer=1, keep=keep,
                n_context=n, scaling=info.head_dim**-0.5, model=model, info=info, state={}, slot=(1, 0))


def bench_method(label: str, heads: int, head_dim: int, **override):
    name, hp = method_and_hp(label)
    if name == "fasa":
        hp.pop("n_fc", None)
    method = make_kv_method(name, **{**hp, **override})
    if name == "fasa":
        table = torch.arange(16)[None, None].expand(2, heads, 16)  # 16 of 64 FCs (timing only)
        method.extra["table"] = torch.cat([table, table + head_dim // 2], -1)
    return method


@torch.no_grad()
def decode_attention(label: str, n: int, keep: int, heads: int = 32, kv_heads: int = 8, head_dim: int = 128,
                     reps: int = 7, seed: int = 0, **override) -> dict:
    model = _shape_model(heads, kv_heads, head_dim)
    method = bench_method(label, heads, head_dim, **override)
    call = decode_call(model, n, keep, seed)
    q, k, v = call.q, call.k, call.v
    module = model.model.layers[0].self_attn
    method.plan(call)  # warm the per-slot state
    parts = {"select": [], "attend": []}

    def run_method():
        t0 = time.perf_counter()
        pieces = method.plan(call)
        t1 = time.perf_counter()
        attend(call, pieces)
        parts["select"].append(t1 - t0)
        parts["attend"].append(time.perf_counter() - t1)

    med = interleaved({"dense": lambda: sdpa_attention_forward(module, q, k, v, None, scaling=call.scaling),
                       "method": run_method, "dense_packed": lambda: grouped_sdpa(q, k, v, None, call.scaling),
                       "key_pass": lambda: k.sum()}, reps)
    sel, att = statistics.median(parts["select"]), statistics.median(parts["attend"])
    return {"bench": "decode_attention", "method": label, "n": n, "keep": keep, "dense_ms": med["dense"] * 1e3,
            "method_ms": med["method"] * 1e3, "speedup": med["dense"] / med["method"], "select_ms": sel * 1e3,
            "attend_ms": att * 1e3, "select_frac_of_dense": sel / med["dense"],
            "dense_packed_ms": med["dense_packed"] * 1e3, "speedup_vs_packed": med["dense_packed"] / med["method"],
            "select_frac_of_packed": sel / med["dense_packed"], "key_pass_ms": med["key_pass"] * 1e3,
            "shapes": [heads, kv_heads, head_dim], "threads": torch.get_num_threads(), **override}


def _keys(n: int, dim: int, rho: float, g: torch.Generator) -> torch.Tensor:
    e = torch.randn(n, dim, generator=g)
    if rho <= 0:
        return e
    k = torch.empty_like(e)  # locally correlated keys: AR(1) along the sequence
    k[0] = e[0]
    for i in range(1, n):
        k[i] = rho * k[i - 1] + (1 - rho * rho) ** 0.5 * e[i]
    return k


@torch.no_grad()
def indexer(n: int, keep: int = 2048, block: int = 128, m: int = 64, heads: int = 64, dim: int = 128,
            reps: int = 7, rho: float = 0.0, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    k = _keys(n, dim, rho, g)
    q, w = torch.randn(1, heads, dim, generator=g), torch.rand(1, heads, generator=g)
    vis = torch.ones(1, n, dtype=torch.bool)
    pooled = pool_keys(k, block)  # maintained incrementally while decoding
    sc = dim**-0.5
    flat_s, hisa_s = _median_pair(lambda: flat_topk(q, w, k, vis, keep, sc),
                                  lambda: hisa_topk(q, w, k, vis, keep, block, m, sc, pooled=pooled), reps)
    iou = selection_iou(flat_topk(q, w, k, vis, keep, sc), hisa_topk(q, w, k, vis, keep, block, m, sc), vis)
    return {"bench": "indexer", "n": n, "keep": keep, "block": block, "m": m, "rho": rho, "flat_ms": flat_s * 1e3,
            "hisa_ms": hisa_s * 1e3, "speedup": flat_s / hisa_s, "iou": float(iou.mean()),
            "threads": torch.get_num_threads()}


from .speed_model import hisa_model_latency, model_decode_long, model_latency  # noqa: E402  (re-exported)

__all__ = ["decode_attention", "hisa_model_latency", "indexer", "interleaved", "model_decode_long", "model_latency"]


if __name__ == "__main__":
    import sys

    from .speed_report import main

    main(sys.argv[1:])

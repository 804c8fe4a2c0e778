"""kv-bench timings on this CPU, always paired with dense in the same loop (interleaved, medians).

- ``decode_attention``: one decode step of one attention layer with Llama-8B shapes (H 32, H_kv 8, d 128) at
  context N: dense = the model's own sdpa over all N; a method = its selection (``plan``) + attention over the
  selection. Selection state (pre-RoPE key cache) is warm, as in steady decoding.
- ``indexer``: DSA flat indexer top-k vs HISA at N (decode query), with the IoU of the two selections.
- ``model_latency``: prefill and per-token decode of a random-weight mid-size Llama, method vs dense.
"""

from __future__ import annotations

import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from .attend import attend
from .bench import method_and_hp
from .families import model_info
from .methods import make_kv_method
from .methods.base import Call
from .ops import flat_topk, hisa_topk, pool_keys, selection_iou
from .sieve import KVSieve


def _shape_model(heads: int, kv_heads: int, head_dim: int) -> LlamaForCausalLM:
    cfg = LlamaConfig(vocab_size=16, hidden_size=heads * head_dim, intermediate_size=16, num_hidden_layers=1,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                      max_position_embeddings=1 << 17, rope_theta=500000.0, attn_implementation="sdpa")
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model.model.rotary_emb = type(model.model.rotary_emb)(cfg)  # real buffers; weights stay on meta (unused)
    return model


def _median_pair(fn_a, fn_b, reps: int) -> tuple[float, float]:
    a, b = [], []
    for _ in range(reps):
        for fn, acc in ((fn_a, a), (fn_b, b)):
            t0 = time.perf_counter()
            fn()
            acc.append(time.perf_counter() - t0)
    return statistics.median(a), statistics.median(b)


@torch.no_grad()
def decode_attention(label: str, n: int, keep: int, heads: int = 32, kv_heads: int = 8, head_dim: int = 128,
                     reps: int = 7, seed: int = 0) -> dict:
    model = _shape_model(heads, kv_heads, head_dim)
    name, hp = method_and_hp(label)
    hp.pop("n_fc", None) if name == "fasa" else None
    method = make_kv_method(name, **hp)
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, heads, 1, head_dim, generator=g)
    k, v = torch.randn(1, kv_heads, n, head_dim, generator=g), torch.randn(1, kv_heads, n, head_dim, generator=g)
    pos = torch.arange(n)
    call = Call(q=q, k=k, v=v, q_pos=pos[-1:], k_rope=pos, q_rope=pos[-1:], phase="decode", layer=1, keep=keep,
                n_context=n, scaling=head_dim**-0.5, model=model, info=model_info(model), state={}, slot=(1, 0))
    if name == "fasa":
        table = torch.arange(16)[None, None].expand(2, heads, 16)  # 16 of 64 FCs (timing only)
        method.extra["table"] = torch.cat([table, table + head_dim // 2], -1)
    module = model.model.layers[0].self_attn
    method.plan(call)  # warm the per-slot state
    times = {"select": [], "attend": []}

    def run_method():
        t0 = time.perf_counter()
        pieces = method.plan(call)
        t1 = time.perf_counter()
        attend(call, pieces)
        times["select"].append(t1 - t0)
        times["attend"].append(time.perf_counter() - t1)

    dense_s, method_s = _median_pair(lambda: sdpa_attention_forward(module, q, k, v, None, scaling=call.scaling),
                                     run_method, reps)
    select_s = statistics.median(times["select"])
    return {"bench": "decode_attention", "method": label, "n": n, "keep": keep, "dense_ms": dense_s * 1e3,
            "method_ms": method_s * 1e3, "speedup": dense_s / method_s, "select_ms": select_s * 1e3,
            "select_frac_of_dense": select_s / dense_s, "shapes": [heads, kv_heads, head_dim]}


@torch.no_grad()
def indexer(n: int, keep: int = 2048, block: int = 128, m: int = 64, heads: int = 64, dim: int = 128,
            reps: int = 5, rho: float = 0.0, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    e = torch.randn(n, dim, generator=g)
    if rho > 0:  # locally correlated keys: AR(1) along the sequence
        k = torch.empty_like(e)
        k[0] = e[0]
        for i in range(1, n):
            k[i] = rho * k[i - 1] + (1 - rho * rho) ** 0.5 * e[i]
    else:
        k = e
    q, w = torch.randn(1, heads, dim, generator=g), torch.rand(1, heads, generator=g)
    vis = torch.ones(1, n, dtype=torch.bool)
    pooled = pool_keys(k, block)  # maintained incrementally while decoding
    flat_s, hisa_s = _median_pair(lambda: flat_topk(q, w, k, vis, keep, dim**-0.5),
                                  lambda: hisa_topk(q, w, k, vis, keep, block, m, dim**-0.5, pooled=pooled), reps)
    iou = selection_iou(flat_topk(q, w, k, vis, keep, dim**-0.5), hisa_topk(q, w, k, vis, keep, block, m, dim**-0.5),
                        vis)
    return {"bench": "indexer", "n": n, "keep": keep, "block": block, "m": m, "rho": rho, "flat_ms": flat_s * 1e3,
            "hisa_ms": hisa_s * 1e3, "speedup": flat_s / hisa_s, "iou": float(iou.mean())}


@torch.no_grad()
def model_latency(label: str, n: int, keep: int, new_tokens: int = 8, reps: int = 3, hidden: int = 512,
                  layers: int = 4, heads: int = 8, kv_heads: int = 2) -> dict:
    cfg = LlamaConfig(vocab_size=1024, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=n + 64,
                      attn_implementation="sdpa")
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    name, hp = method_and_hp(label)
    x = torch.randint(1, 1024, (1, n))
    res: dict = {"dense": {"prefill": [], "decode": []}, label: {"prefill": [], "decode": []}}

    def one(tag: str):
        t0 = time.perf_counter()
        out = model(x, use_cache=True)
        t1 = time.perf_counter()
        cache, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        for _ in range(new_tokens):
            out = model(tok, past_key_values=cache, use_cache=True)
            cache, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        res[tag]["prefill"].append(t1 - t0)
        res[tag]["decode"].append((time.perf_counter() - t1) / new_tokens)

    for _ in range(reps):
        one("dense")
        with KVSieve(model, name, keep=keep, **hp):
            one(label)
    med = {t: {p: statistics.median(v) * 1e3 for p, v in d.items()} for t, d in res.items()}
    return {"bench": "model_latency", "method": label, "n": n, "keep": keep, "prefill_ms": med[label]["prefill"],
            "dense_prefill_ms": med["dense"]["prefill"], "decode_ms": med[label]["decode"],
            "dense_decode_ms": med["dense"]["decode"], "model": [hidden, layers, heads, kv_heads]}

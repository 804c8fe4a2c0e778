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
from .sieve import KVSieve


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


@torch.no_grad()
def model_latency(label: str, n: int, keep: int, new_tokens: int = 8, reps: int = 5, hidden: int = 1024,
                  layers: int = 4, heads: int = 16, kv_heads: int = 4) -> dict:
    """Random-weight Llama (hidden 1024, 4 layers, 16 heads, 4 KV heads, d 64): prefill and per-token decode,
    dense and the method interleaved in the same loop."""
    cfg = LlamaConfig(vocab_size=1024, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=n + 64,
                      attn_implementation="sdpa")
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    name, hp = method_and_hp(label)
    x = torch.randint(1, 1024, (1, n), generator=torch.Generator().manual_seed(0))
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

    for r in range(reps):
        for tag in (("dense", label) if r % 2 == 0 else (label, "dense")):
            if tag == "dense":
                one(tag)
            else:
                with KVSieve(model, name, keep=keep, **hp):
                    one(tag)
    med = {t: {p: statistics.median(v) * 1e3 for p, v in d.items()} for t, d in res.items()}
    return {"bench": "model_latency", "method": label, "n": n, "keep": keep, "prefill_ms": med[label]["prefill"],
            "dense_prefill_ms": med["dense"]["prefill"], "decode_ms": med[label]["decode"],
            "dense_decode_ms": med["dense"]["decode"], "model": [hidden, layers, heads, kv_heads],
            "threads": torch.get_num_threads()}


def _deepseek(n: int, keep: int):
    from transformers import DeepseekV32Config, DeepseekV32ForCausalLM

    cfg = DeepseekV32Config(
        vocab_size=1024, hidden_size=256, intermediate_size=512, moe_intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=4, n_group=1,
        topk_group=1, num_experts_per_tok=2, kv_lora_rank=64, q_lora_rank=64, qk_rope_head_dim=16,
        v_head_dim=32, qk_nope_head_dim=32, index_topk=keep, index_head_dim=128, index_n_heads=32, head_dim=16,
        first_k_dense_replace=1, max_position_embeddings=n + 64, attn_implementation="sdpa", pad_token_id=0)
    torch.manual_seed(0)
    return DeepseekV32ForCausalLM(cfg).eval()


@torch.no_grad()
def hisa_model_latency(n: int = 4096, keep: int = 512, block: int = 64, m: int = 16, new_tokens: int = 8,
                       reps: int = 3) -> dict:
    """Random-weight DeepseekV32 (2 layers, indexer 32 heads x 128): per-token decode with the model's own
    flat DSA indexer, HISA with the flat reference (IoU recorded) and HISA alone (``flat_reference=False``)."""
    model = _deepseek(n, keep)
    x = torch.randint(1, 1024, (1, n), generator=torch.Generator().manual_seed(0))
    modes = {"flat": None, "hisa_ref": True, "hisa": False}
    times: dict = {k: [] for k in modes}
    for r in range(reps):
        for mode in list(modes)[r % 3:] + list(modes)[: r % 3]:
            sieve = None if modes[mode] is None else KVSieve(model, "hisa", keep=keep, block=block, m=m,
                                                               flat_reference=modes[mode])
            with sieve if sieve is not None else torch.no_grad():
                out = model(x, use_cache=True)
                cache, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
                t0 = time.perf_counter()
                for _ in range(new_tokens):
                    out = model(tok, past_key_values=cache, use_cache=True)
                    cache, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
                times[mode].append((time.perf_counter() - t0) / new_tokens)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    return {"bench": "hisa_model_latency", "method": "hisa", "n": n, "keep": keep, "block": block, "m": m,
            "flat_decode_ms": med["flat"], "hisa_ref_decode_ms": med["hisa_ref"], "hisa_decode_ms": med["hisa"],
            "threads": torch.get_num_threads()}


if __name__ == "__main__":
    import sys

    from .speed_report import main

    main(sys.argv[1:])

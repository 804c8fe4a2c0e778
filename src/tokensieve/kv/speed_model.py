"""End-to-end kv timings on random-weight models (see ``speed``): a mid-size Llama (prefill + decode at 4K, and
decode at 16K after one untimed prefill) and a DeepseekV32 with HISA in place of its DSA indexer."""

from __future__ import annotations

import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from .bench import method_and_hp
from .sieve import KVSieve


@torch.no_grad()
def model_latency(label: str, n: int, keep: int, new_tokens: int = 8, reps: int = 5, hidden: int = 1024,
                  layers: int = 4, heads: int = 16, kv_heads: int = 4) -> dict:
    """Random-weight Llama (hidden 1024, 4 layers, 16 heads, 4 KV heads, d 64): prefill and per-token decode,
    dense and the method interleaved in the same loop."""
    model = _llama(n, hidden, layers, heads, kv_heads)
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




def _llama(n: int, hidden: int, layers: int, heads: int, kv_heads: int) -> LlamaForCausalLM:
    cfg = LlamaConfig(vocab_size=1024, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=n + 64,
                      attn_implementation="sdpa")
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def _decode(model, cache, tok, steps: int) -> float:
    """Seconds per token of ``steps`` greedy decode steps after one untimed step (which fills per-slot state)."""
    out = model(tok, past_key_values=cache, use_cache=True)
    tok = out.logits[:, -1:].argmax(-1)
    t0 = time.perf_counter()
    for _ in range(steps):
        out = model(tok, past_key_values=cache, use_cache=True)
        tok = out.logits[:, -1:].argmax(-1)
    return (time.perf_counter() - t0) / steps


@torch.no_grad()
def model_decode_long(label: str, n: int = 16384, keep: int = 512, steps: int = 6, reps: int = 5, hidden: int = 1024,
                      layers: int = 4, heads: int = 16, kv_heads: int = 4) -> dict:
    """Per-token decode at context n of the mid-size Llama, method vs dense interleaved, after one dense prefill
    (untimed); the cache is cropped back to n after every run, so every run decodes the same steps."""
    model = _llama(n, hidden, layers, heads, kv_heads)
    name, hp = method_and_hp(label)
    x = torch.randint(1, 1024, (1, n), generator=torch.Generator().manual_seed(0))
    out = model(x, use_cache=True)
    cache, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
    times: dict = {"dense": [], label: []}
    for r in range(reps):
        for tag in (("dense", label) if r % 2 == 0 else (label, "dense")):
            if tag == "dense":
                times[tag].append(_decode(model, cache, tok, steps))
            else:
                with KVSieve(model, name, keep=keep, **hp):
                    times[tag].append(_decode(model, cache, tok, steps))
            cache.crop(n - cache.get_seq_length())  # drop this run's decoded tokens
    med = {t: statistics.median(v) * 1e3 for t, v in times.items()}
    return {"bench": "model_decode_long", "method": label, "n": n, "keep": keep, "decode_ms": med[label],
            "dense_decode_ms": med["dense"], "speedup": med["dense"] / med[label],
            "model": [hidden, layers, heads, kv_heads], "threads": torch.get_num_threads()}

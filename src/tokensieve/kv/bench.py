"""kv-bench: methods x budgets x context lengths on the embedded retrieval LM, resumable JSONL.

Per cell (method, keep, length, task): exact-match accuracy of greedy answers (n samples, paired seeds across
methods), and teacher-forced fidelity at every answer step (attention-output error vs dense, recall of the
exact per-head top-k, captured dense mass), plus analytic KV bytes read per decode step per layer.
Timings live in ``tokensieve.kv.speed`` (random-weight mid-size Llama, paired with dense).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from .fidelity import summary
from .methods import make_kv_method
from .methods.base import KVMethodError
from .sieve import KVSieve
from .tasks import make_sample

DEFAULT_HP = {
    "tokenselect": {"n_init": 4, "n_local": 32, "chunk_size": 32},
    "tokenselect_div": {"n_init": 4, "n_local": 32, "chunk_size": 32, "head_map": "div"},
    "tokenselect_bf16": {"n_init": 4, "n_local": 32, "chunk_size": 32, "score_dtype": "bfloat16"},
    "streaming": {"n_sink": 4},
    "fasa": {"n_fc": 4},
    "fasa_adjacent": {"n_fc": 4, "pairing": "adjacent"},
    "tsa": {"window": 32, "tau": 0.005},
    "oracle": {},
    "dense": {},
}


def method_and_hp(label: str) -> tuple[str, dict]:
    """Bench label -> (registry name, hyperparameters); ``tokenselect_div`` etc. are ablation variants."""
    base = label.split("_")[0]
    return base, dict(DEFAULT_HP.get(label, DEFAULT_HP.get(base, {})))


def kv_bytes_per_step(label: str, n: int, keep: int, heads: int, kv_heads: int, head_dim: int,
                      n_fc: int = 4, elem: int = 2) -> int:
    """Analytic KV bytes read by one decode step of one layer (spec section 8.4)."""
    k = min(keep, n)
    dense = 2 * n * kv_heads * head_dim
    table = {
        "dense": dense, "tsa": dense,
        "oracle": n * kv_heads * head_dim + 2 * k * heads * head_dim,
        "tokenselect": n * kv_heads * head_dim + 2 * k * kv_heads * head_dim,
        "fasa": n * heads * 2 * n_fc + 2 * k * heads * head_dim,
        "streaming": 2 * k * kv_heads * head_dim,
    }
    return table[label.split("_")[0]] * elem


def greedy_exact_match(model, method, keep: int, prompt: list[int], answer: list[int]) -> bool:
    """Greedy decoding under the method reproduces ``answer`` exactly. Teacher-forced with early exit: the
    argmax at each step is compared before the answer token is fed, which is the same decision as
    ``generate(do_sample=False)`` followed by a comparison (both prefill the whole prompt, then decode one
    token per step), without the steps after the first miss or the full-vocabulary prefill logits."""
    with KVSieve(model, method, keep=keep):
        out = model(torch.tensor([prompt]), use_cache=True, logits_to_keep=1)
        for j, tok in enumerate(answer):
            if int(out.logits[0, -1].argmax()) != tok:
                return False
            if j + 1 < len(answer):
                out = model(torch.tensor([[tok]]), past_key_values=out.past_key_values, use_cache=True,
                            logits_to_keep=1)
    return True


def shadow_stats(model, method, keep: int, prompt: list[int], answer: list[int]) -> dict:
    """Teacher-forced fidelity on the dense trajectory: the "A" step and every answer step but the last."""
    with KVSieve(model, method, keep=keep, shadow=True) as sv:
        cache = model(torch.tensor([prompt[:-1]]), use_cache=True, logits_to_keep=1).past_key_values
        for tok in [prompt[-1], *answer[:-1]]:
            cache = model(torch.tensor([[tok]]), past_key_values=cache, use_cache=True,
                          logits_to_keep=1).past_key_values
    return sv.trace.stats


@torch.no_grad()
def run_cell(model, label: str, keep: int, length: int, task: str, n: int, seed: int = 0,
             fidelity_n: int | None = None) -> dict:
    """Accuracy on ``n`` paired samples; fidelity statistics on the first ``fidelity_n`` of them (all: None)."""
    name, hp = method_and_hp(label)
    rng = random.Random(f"{seed}-{length}-{task}")
    samples = [make_sample(task, length, rng, n_distract=8) for _ in range(n)]
    n_fid = n if fidelity_n is None else min(n, fidelity_n)
    ok = 0
    stats: dict = {}
    method = make_kv_method(name, **hp)  # one object per cell: FASA calibrates / TSA profiles drift once
    for i, s in enumerate(samples):
        ok += int(greedy_exact_match(model, method, keep, s.prompt, s.answer))
        if i < n_fid:
            for key, value in shadow_stats(model, method, keep, s.prompt, s.answer).items():
                stats[key] = stats.get(key, 0) + value
    cfg = model.config
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return {"method": label, "keep": keep, "length": length, "task": task, "n": n, "fidelity_n": n_fid,
            "accuracy": ok / n, **summary(stats),
            "kv_bytes_step": kv_bytes_per_step(label, length, keep, cfg.num_attention_heads,
                                               cfg.num_key_value_heads, hd, elem=4),
            "dense_kv_bytes_step": kv_bytes_per_step("dense", length, keep, cfg.num_attention_heads,
                                                     cfg.num_key_value_heads, hd, elem=4)}


def cell_key(row: dict) -> tuple:
    return (row["method"], row["keep"], row["length"], row["task"], row.get("n"))


def read_rows(path: str | Path) -> list[dict]:
    p = Path(path)
    if not p.exists():
        return []
    rows = []
    for line in p.read_text().splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by an interrupt: the cell is re-run
                continue
    return rows


def append_row(path: str | Path, row: dict) -> None:
    """Append one JSON line, first ending a line that an interrupt cut short (so that line alone is lost)."""
    p = Path(path)
    cut = p.exists() and p.stat().st_size > 0 and not p.read_bytes().endswith(b"\n")
    with open(p, "a") as f:
        f.write(("\n" if cut else "") + json.dumps(row) + "\n")


def run_grid(model, methods: list[str], keeps: list[int], lengths: list[int], tasks: list[str], n: int,
             out: str | Path, seed: int = 0, log=print, fidelity_n: int | None = None) -> list[dict]:
    """Run every missing cell and append it to ``out`` (JSONL); finished cells are skipped (resumable)."""
    done = {cell_key(r) for r in read_rows(out)}
    for length in lengths:
        for task in tasks:
            for label in methods:
                for keep in ([length] if label == "dense" else keeps):
                    key = (label, keep, length, task, n)
                    if key in done or keep >= length and label != "dense":
                        continue
                    try:
                        row = run_cell(model, label, keep, length, task, n, seed, fidelity_n)
                    except KVMethodError as err:  # a budget the method cannot run (checked before any forward)
                        log(f"{label:>16} keep={keep:<5} L={length:<5} {task:<10} skipped: {err}")
                        continue
                    append_row(out, row)
                    done.add(key)
                    log(f"{label:>16} keep={keep:<5} L={length:<5} {task:<10} acc={row['accuracy']:.2f} "
                        f"err={row['attn_err']:.3f} recall={row['topk_recall']:.3f}")
    return read_rows(out)

"""``python -m tokensieve.kv.speed``: every kv speed benchmark in one process, a resumable JSONL and a markdown
table (docs/kv/speed_results.md; analysis in docs/kv/speed.md). One command for the final figures on an idle machine:

    PYTHONPATH=src python -m tokensieve.kv.speed --threads 2 --out docs/kv/speed_runs.jsonl \
        --md docs/kv/speed_results.md
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from .bench import append_row, read_rows

DECODE_METHODS = ("tokenselect", "tokenselect_bf16", "fasa", "oracle", "streaming")


def _jobs(lengths: list[int], keep: int, model_dir: str | None) -> list[tuple[dict, object]]:
    from . import speed, speed_cache

    jobs = [({"bench": "decode_attention", "method": m, "n": n, "keep": keep},
             lambda m=m, n=n: speed.decode_attention(m, n, keep)) for n in lengths for m in DECODE_METHODS]
    jobs += [({"bench": "indexer", "n": 32768, "rho": rho}, lambda rho=rho: {"method": "hisa",
              **speed.indexer(32768, rho=rho)}) for rho in (0.0, 0.999)]
    jobs += [({"bench": "selection_cache_cost", "n": max(lengths)},
              lambda: speed_cache.cache_costs(max(lengths), keep))]
    jobs += [({"bench": "model_latency", "method": "tokenselect", "n": 4096},
              lambda: speed.model_latency("tokenselect", 4096, keep))]
    jobs += [({"bench": "hisa_model_latency", "n": 4096}, lambda: speed.hisa_model_latency(4096, keep))]
    jobs += [({"bench": "model_decode_long", "method": "tokenselect", "n": max(lengths)},
              lambda: speed.model_decode_long("tokenselect", max(lengths), keep))]
    if model_dir is not None:
        jobs += [({"bench": "selection_cache", "n": 1024}, lambda: _cache_rows(model_dir))]
    return jobs


def _cache_rows(model_dir: str) -> list[dict]:
    from .embedded import load_embedded
    from .speed_cache import cache_hit_rate

    return cache_hit_rate(load_embedded(model_dir), [None, 0.99, 0.95, 0.9, 0.8, 0.5], length=1024, keep=128, n=10)


def _done(rows: list[dict], key: dict) -> bool:
    return any(all(r.get(k) == v for k, v in key.items()) for r in rows)


def run_all(out: Path, lengths: list[int], keep: int, model_dir: str | None, log=print) -> list[dict]:
    """Run every job missing from ``out`` (resumable: a finished row is not re-run)."""
    for key, job in _jobs(lengths, keep, model_dir):
        key["threads"] = torch.get_num_threads()
        if _done(read_rows(out), key):
            continue
        rows = job()
        for row in rows if isinstance(rows, list) else [rows]:
            row["load_avg_1m"] = os.getloadavg()[0]
            append_row(out, row)
            log(json.dumps(row))
    return read_rows(out)


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def decode_table(rows: list[dict]) -> list[str]:
    lines = ["| method | N | keep | HF sdpa dense ms | method ms (select + attend) | speed-up vs HF sdpa | "
             "selection / HF dense | packed-GQA dense ms | speed-up vs packed | one pass over K ms |",
             "|---" * 10 + "|"]
    for r in sorted((r for r in rows if r.get("bench") == "decode_attention"), key=lambda r: (r["n"], r["method"])):
        lines.append(f"| {r['method']} | {r['n']} | {r['keep']} | {r['dense_ms']:.1f} | {r['method_ms']:.1f} "
                     f"({r['select_ms']:.1f} + {r['attend_ms']:.1f}) | {r['speedup']:.2f}x | "
                     f"{_pct(r['select_frac_of_dense'])} | {r['dense_packed_ms']:.1f} | "
                     f"{r['speedup_vs_packed']:.2f}x | {r['key_pass_ms']:.1f} |")
    return lines


def other_tables(rows: list[dict]) -> list[str]:
    lines = ["", "| indexer N | B | m | keys | flat ms | HISA ms | speed-up | IoU |", "|---" * 8 + "|"]
    for r in (r for r in rows if r.get("bench") == "indexer"):
        keys = "iid" if not r["rho"] else f"AR(1) rho={r['rho']}"
        lines.append(f"| {r['n']} | {r['block']} | {r['m']} | {keys} | {r['flat_ms']:.1f} | {r['hisa_ms']:.1f} | "
                     f"{r['speedup']:.2f}x | {r['iou']:.3f} |")
    lines += ["", "| model (hidden, layers, H, H_kv) | method | N | keep | prefill ms (dense) | "
              "decode ms/token (dense) |", "|---" * 6 + "|"]
    for r in (r for r in rows if r.get("bench") == "model_latency"):
        lines.append(f"| {r['model']} | {r['method']} | {r['n']} | {r['keep']} | {r['prefill_ms']:.0f} "
                     f"({r['dense_prefill_ms']:.0f}) | {r['decode_ms']:.1f} ({r['dense_decode_ms']:.1f}) |")
    for r in (r for r in rows if r.get("bench") == "model_decode_long"):
        lines.append(f"| {r['model']} | {r['method']} | {r['n']} | {r['keep']} | – (one dense prefill, untimed) | "
                     f"{r['decode_ms']:.1f} ({r['dense_decode_ms']:.1f}): {r['speedup']:.2f}x |")
    for r in (r for r in rows if r.get("bench") == "hisa_model_latency"):
        lines += ["", f"DeepseekV32 (random, 2 layers, indexer 32 x 128), N = {r['n']}, keep = {r['keep']}, B = "
                  f"{r['block']}, m = {r['m']}, decode ms/token: flat DSA indexer {r['flat_decode_ms']:.1f}, HISA "
                  f"with the flat reference {r['hisa_ref_decode_ms']:.1f}, HISA alone (flat_reference=False) "
                  f"{r['hisa_decode_ms']:.1f}."]
    for r in (r for r in rows if r.get("bench") == "selection_cache_cost"):
        lines += ["", f"Selection Cache, one decode step's plan at N = {r['n']}, keep = {r['keep']}: miss "
                  f"{r['miss_ms']:.1f} ms, hit {r['hit_ms']:.2f} ms."]
    cache = [r for r in rows if r.get("bench") == "selection_cache"]
    if cache:
        lines += ["", "| theta | L | keep | decode hit rate | exact match |", "|---" * 5 + "|"]
        for r in cache:
            hit = "–" if r["hit_rate"] is None else _pct(r["hit_rate"])
            lines.append(f"| {r['theta']} | {r['n']} | {r['keep']} | {hit} | {_pct(r['accuracy'])} |")
    return lines


def markdown(rows: list[dict]) -> str:
    loads = sorted({round(r["load_avg_1m"], 1) for r in rows if "load_avg_1m" in r})
    threads = sorted({r["threads"] for r in rows if "threads" in r})
    head = [f"torch threads {threads}; 1-minute load average while measuring {loads[0]}-{loads[-1]}" if loads
            else "", ""]
    return "\n".join(head + decode_table(rows) + other_tables(rows)) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m tokensieve.kv.speed")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 while the machine is shared)")
    ap.add_argument("--lengths", default="4096,8192,16384")
    ap.add_argument("--keep", type=int, default=512)
    ap.add_argument("--out", default="results/kv/speed.jsonl")
    ap.add_argument("--md", default="results/kv/speed.md")
    ap.add_argument("--model", default=None, help="embedded KV model dir: also measure the Selection Cache")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = run_all(out, [int(x) for x in args.lengths.split(",")], args.keep, args.model)
    Path(args.md).parent.mkdir(parents=True, exist_ok=True)
    Path(args.md).write_text(markdown(rows))
    print(markdown(rows))

"""kvpress baselines, run by the kvpress environment (transformers < 5.3) as a subprocess of kv-bench.

    /work/venvs/kvpress/bin/python src/tokensieve/kv/kvpress_runner.py MODEL_DIR OUT.jsonl \
        --presses snapkv,streaming_llm,knorm,expected_attention --keeps 64,128 --lengths 1024 --tasks single --n 20

Follows ``KVPressTextGenerationPipeline._forward``: the context (the prompt minus its question ``Q key A``) is
prefilled under the press (eviction, compression_ratio = 1 - keep / context), then the question is appended
uncompressed with positions continuing from the original context length, then greedy decoding. This file
imports no tokensieve package code except ``tasks.py`` (loaded by path), so it runs under the older
transformers; cells already in OUT are skipped (resumable).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import sys
from importlib import metadata
from pathlib import Path

import torch

PRESSES = {"snapkv": "SnapKVPress", "streaming_llm": "StreamingLLMPress", "knorm": "KnormPress",
           "expected_attention": "ExpectedAttentionPress", "tova": "TOVAPress"}


def _tasks():
    spec = importlib.util.spec_from_file_location("kv_tasks", Path(__file__).with_name("tasks.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules["kv_tasks"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def make_press(name: str, ratio: float):
    import kvpress

    cls = getattr(kvpress, PRESSES[name])
    if name == "snapkv":
        return cls(compression_ratio=ratio, window_size=32)
    return cls(compression_ratio=ratio)


@torch.no_grad()
def answer(model, press, prompt: list[int], n_new: int) -> tuple[list[int], int]:
    """(greedy answer, cache tokens resident after compressing the context)."""
    from transformers import DynamicCache

    ctx, question = prompt[:-3], prompt[-3:]
    cache = DynamicCache()
    with press(model):
        model.model(input_ids=torch.tensor([ctx]), past_key_values=cache)
    resident = cache.get_seq_length()
    pos = len(ctx)
    ids, out = torch.tensor([question]), []
    for _ in range(n_new):
        n = ids.shape[1]
        logits = model(input_ids=ids, past_key_values=cache, position_ids=torch.arange(pos, pos + n)[None]).logits
        pos += n
        tok = int(logits[0, -1].argmax())
        out.append(tok)
        ids = torch.tensor([[tok]])
    return out, resident


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("out")
    ap.add_argument("--presses", default="snapkv,streaming_llm,knorm,expected_attention")
    ap.add_argument("--keeps", default="64")
    ap.add_argument("--lengths", default="1024")
    ap.add_argument("--tasks", default="single")
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(2)
    import transformers
    from transformers import LlamaForCausalLM

    tasks = _tasks()
    model = LlamaForCausalLM.from_pretrained(args.model_dir, attn_implementation="sdpa").eval()
    out = Path(args.out)
    done = set()
    if out.exists():
        for line in out.read_text().splitlines():
            try:
                r = json.loads(line)
                done.add((r["method"], r["keep"], r["length"], r["task"], r["n"]))
            except (json.JSONDecodeError, KeyError):
                continue
    for length in map(int, args.lengths.split(",")):
        for task in args.tasks.split(","):
            for name in args.presses.split(","):
                for keep in map(int, args.keeps.split(",")):
                    label = f"kvpress_{name}"
                    if (label, keep, length, task, args.n) in done or keep >= length:
                        continue
                    rng = random.Random(f"{args.seed}-{length}-{task}")
                    samples = [tasks.make_sample(task, length, rng, n_distract=8) for _ in range(args.n)]
                    ok, resident = 0, 0
                    for s in samples:
                        ratio = 1.0 - keep / (len(s.prompt) - 3)
                        got, kept = answer(model, make_press(name, ratio), s.prompt, len(s.answer))
                        ok += int(got == s.answer)
                        resident += kept
                    row = {"method": label, "keep": keep, "length": length, "task": task, "n": args.n,
                           "accuracy": ok / args.n, "resident_kv": resident / args.n, "evicts": True,
                           "kvpress": metadata.version("kvpress"), "transformers": transformers.__version__}
                    cut = out.exists() and out.stat().st_size > 0 and not out.read_bytes().endswith(b"\n")
                    with open(out, "a") as f:
                        f.write(("\n" if cut else "") + json.dumps(row) + "\n")
                    print(f"{label:>28} keep={keep} L={length} {task} acc={row['accuracy']:.2f}", flush=True)


if __name__ == "__main__":
    main()

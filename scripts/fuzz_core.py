"""Fuzz the sieve's core: random cases over methods x budgets x batch shapes x padding x image counts x
sdpa/eager x fp32/bf16 x families x generate() modes, with exceptions injected mid-prefill and mid-decode.

After every case: no hook is left, nothing stays patched, every parameter and buffer is bit-identical to its
snapshot, and the unsieved logits are bit-identical to the reference. Each case is appended to a JSONL file
(a checkpoint: a rerun with the same --out continues the count); the summary prints the case counts.

    PYTHONPATH=src OMP_NUM_THREADS=1 nice -n 10 python scripts/fuzz_core.py --minutes 5 --out /tmp/fuzz.jsonl
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import time
import traceback
from pathlib import Path

import torch

import tokensieve
from tokensieve.methods.base import make_method
from tokensieve.testing import qwen_image_prompt, random_image, tiny_llava, tiny_llava_next, tiny_qwen2_5_vl

BUILDERS = {"llava": tiny_llava, "llava_next": tiny_llava_next, "qwen2_5_vl": tiny_qwen2_5_vl}
TEXTS = ["what is the color ?", "how many ?", "describe this image and what is the color of the square ?"]
CLEAR_ERRORS = (
    tokensieve.BudgetError,
    tokensieve.MethodError,
    tokensieve.UnsupportedModelError,
    tokensieve.SieveUsageError,
)
FAST_KWARGS = {"zoo": {"m": 8}, "idpruner": {"zoo_m": 8}}
PATCHED = ("get_image_features", "generate", "_tokensieve_active")


class Injected(RuntimeError):
    """The exception the fuzzer injects."""


_MODELS: dict = {}


def model_for(family: str, attn: str, dtype: str):
    key = (family, attn, dtype)
    if key not in _MODELS:
        model, proc = BUILDERS[family](attn=attn)
        if dtype == "bf16":
            model = model.to(torch.bfloat16)
        snapshot = {k: v.clone() for k, v in model.state_dict().items()}
        _MODELS[key] = (model, proc, snapshot)
    return _MODELS[key]


def draw_case(rng: random.Random, methods: list[str]) -> dict:
    batch = rng.randint(1, 4)
    return {
        "method": rng.choice(methods),
        "keep": rng.choice([1, 2, 3, 0.25, 0.5, 1.0]),
        "family": rng.choice(list(BUILDERS)),
        "attn": rng.choice(["sdpa", "eager"]),
        "dtype": rng.choice(["fp32", "bf16"]),
        "padding": rng.choice(["left", "right"]),
        "images": [rng.randint(1, 2) for _ in range(batch)],
        "texts": [rng.randrange(len(TEXTS)) for _ in range(batch)],
        "seeds": [rng.randrange(1000) for _ in range(batch * 2)],
        "mode": rng.choice(["forward", "generate", "generate", "no_cache", "beams"]),
        "inject": rng.choice(["none", "none", "prefill", "decode"]),
        "inject_layer": rng.randrange(4),
    }


def make_inputs(case: dict, proc):
    proc.tokenizer.padding_side = case["padding"]
    prompts, images = [], []
    seeds = iter(case["seeds"])
    for count, text in zip(case["images"], case["texts"], strict=True):
        text = TEXTS[text]
        if case["family"] == "qwen2_5_vl":
            prompts.append(" ".join([qwen_image_prompt("")] * (count - 1) + [qwen_image_prompt(text)]))
        else:
            prompts.append("USER: " + " ".join(["<image>"] * count) + f" {text} ASSISTANT:")
        for _ in range(count):
            seed = next(seeds)
            size = (56, 56) if case["family"] == "llava" else random.Random(seed).choice([(56, 56), (56, 84), (84, 56)])
            images.append(random_image(seed, size))
    inputs = proc(images=images, text=prompts, return_tensors="pt", padding=True)
    if case["dtype"] == "bf16":
        inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    return inputs


def hook_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def injector(model, case: dict):
    """A pre-hook on one decoder layer that raises at the chosen phase (prefill: long input; decode: 1 token)."""
    layer = model.model.language_model.layers[case["inject_layer"]]

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        decoding = hidden.shape[1] == 1
        if (case["inject"] == "prefill" and not decoding) or (case["inject"] == "decode" and decoding):
            raise Injected(case["inject"])

    return layer.register_forward_pre_hook(hook, with_kwargs=True)


def run_case(case: dict) -> dict:
    model, proc, snapshot = model_for(case["family"], case["attn"], case["dtype"])
    inputs = make_inputs(case, proc)
    with torch.no_grad():
        reference = model(**inputs).logits
    before = hook_count(model)
    handle = injector(model, case) if case["inject"] != "none" else None
    outcome = "ok"
    try:
        method = make_method(case["method"], keep=case["keep"], **FAST_KWARGS.get(case["method"], {}))
        with tokensieve.sieve(model, method) as s, torch.no_grad():
            if case["mode"] == "forward":
                model(**inputs)
            else:
                extra = {"no_cache": {"use_cache": False}, "beams": {"num_beams": 2}}.get(case["mode"], {})
                model.generate(**inputs, max_new_tokens=3, do_sample=False, **extra)
            if s.trace.stages:
                for (b, i), info in s.trace.images.items():
                    assert s.trace.kept(b, i).numel() <= info["n_tokens"]
    except Injected:
        outcome = "injected"
    except CLEAR_ERRORS as err:
        outcome = f"clear error: {type(err).__name__}"
    except Exception as err:  # a crash: recorded, and the clean-exit checks still run
        outcome = f"crash: {type(err).__name__}: {str(err)[:200]}"
        case["traceback"] = traceback.format_exc(limit=4)
    finally:
        if handle is not None:
            handle.remove()
    problems = check_clean(model, inputs, reference, before, snapshot)
    return {**case, "outcome": outcome, "problems": problems}


def check_clean(model, inputs, reference, before: int, snapshot: dict) -> list[str]:
    problems = []
    if hook_count(model) != before:
        problems.append(f"hooks left: {hook_count(model) - before}")
    patched = [n for n in PATCHED if n in model.__dict__ or n in model.model.__dict__]
    if patched:
        problems.append(f"patched: {patched}")
    state = model.state_dict()
    changed = [k for k, v in snapshot.items() if not torch.equal(state[k], v)]
    if changed:
        problems.append(f"weights changed: {changed[:3]}")
    with torch.no_grad():
        if not torch.equal(model(**inputs).logits, reference):
            problems.append("unsieved logits changed")
    return problems


def summarise(rows: list[dict]) -> str:
    outcomes = collections.Counter(r["outcome"].split(":")[0] for r in rows)
    lines = [f"cases: {len(rows)}", f"outcomes: {dict(outcomes)}"]
    for key in ("family", "mode", "inject", "dtype", "attn", "padding"):
        lines.append(f"by {key}: {dict(collections.Counter(str(r[key]) for r in rows))}")
    lines.append(f"methods covered: {len({r['method'] for r in rows})}")
    bad = [r for r in rows if r["problems"]]
    lines.append(f"cases with a problem after exit (hooks, patches, weights, logits): {len(bad)}")
    crashes = collections.Counter(r["outcome"] for r in rows if r["outcome"].startswith("crash"))
    lines.extend(f"  {n} x {text}" for text, n in crashes.most_common(20))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("fuzz_core.jsonl"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = [json.loads(line) for line in args.out.read_text().splitlines()] if args.out.exists() else []
    rng = random.Random(args.seed + len(rows))
    methods = [m for m in tokensieve.list_methods() if not m.startswith("_")]
    deadline = time.monotonic() + 60 * args.minutes
    with args.out.open("a") as sink:
        while time.monotonic() < deadline:
            row = run_case(draw_case(rng, methods))
            rows.append(row)
            sink.write(json.dumps(row) + "\n")
            sink.flush()
    print(summarise(rows))


if __name__ == "__main__":
    main()

"""Prefill and end-to-end latency of pruned vs unpruned generation on a mid-size random-weight LLaVA.

The embedded model is too small for latency to mean much (framework overhead dominates), so this script builds
a LLaVA-1.5-shaped model from config (CLIP ViT at 336 px with 576 patches, a Llama decoder) with random weights
and times, in one process, the unpruned model and several methods at a few budgets:

- prefill: one forward pass of the prompt with ``use_cache=True`` (the vision tower included);
- generate: ``generate(max_new_tokens=N)`` end to end.

Each row times the pruned and the unpruned model alternately in one loop (pruned, unpruned, pruned, ...) after
one untimed pair; the speed-up is median(unpruned) / median(pruned) over ``--pairs`` pairs, and a row whose
unpruned timings spread more than 20% is marked noisy. No speed-up compares timings taken minutes apart. Usage::

    python scripts/bench_latency.py --layers 16 --hidden 1024 --pairs 5
"""

from __future__ import annotations

import argparse

import torch
from transformers import LlavaForConditionalGeneration

import tokensieve
from tokensieve.bench.cell import NOISY_SPREAD
from tokensieve.bench.metrics import paired_latency
from tokensieve.testing import tiny_llava


def build(layers: int, hidden: int, vision_layers: int, attn: str) -> LlavaForConditionalGeneration:
    heads = hidden // 64
    model, _ = tiny_llava(
        layers=layers, image_size=336, attn=attn, vision_hidden=1024, vision_layers=vision_layers, vision_heads=16,
        vision_mlp_ratio=4.0, text_hidden=hidden, text_heads=heads, text_kv_heads=heads, mlp_ratio=2.75,
    )  # fmt: skip
    return model


def inputs_for(model, text_tokens: int) -> dict:
    image, vocab = model.config.image_token_id, model.config.text_config.vocab_size
    words = [i for i in range(5, vocab) if i != image]  # plain word ids (no specials, no placeholder)
    pick = torch.tensor(words)[torch.randint(len(words), (text_tokens,))][None]
    ids = torch.cat([pick[:, :5], torch.full((1, 576), image), pick[:, 5:]], 1)
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values": torch.randn(1, 3, 336, 336),
    }


def _value(text: str):
    """A hyperparameter value from the command line: int, float, or the string itself."""
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--vision-layers", type=int, default=4, help="CLIP-L has 24; fewer keeps the run short")
    parser.add_argument("--text-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--pairs", type=int, default=5, help="timing pairs (pruned, unpruned) per row, at least 5")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--attn", default="sdpa")
    parser.add_argument(
        "--methods",
        default="random,divprune,zoo,zoo:estimator=exact,zoo:lowrank=128,fastv",
        help="comma-separated names; hyperparameters as name:key=value:key=value",
    )
    parser.add_argument("--keep", default="192,64")
    args = parser.parse_args()
    if args.pairs < 5:
        parser.error(f"--pairs {args.pairs}: a speed-up needs the median of at least 5 pairs")
    torch.set_num_threads(args.threads)
    model = build(args.layers, args.hidden, args.vision_layers, args.attn)
    inputs = inputs_for(model, args.text_tokens)

    def prefill():
        with torch.inference_mode():
            return model(**inputs, use_cache=True, logits_to_keep=1)

    def generate():
        with torch.inference_mode():
            model.generate(**inputs, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)

    device = next(model.parameters()).device
    print(
        f"LLaVA-shaped random model: vision {args.vision_layers} layers x 1024 (576 patches), LLM {args.layers} "
        f"layers x {args.hidden}, prompt 576 + {args.text_tokens} tokens, {args.threads} threads, {args.attn}; "
        f"every row: median of {args.pairs} pairs (pruned, unpruned) timed alternately"
    )
    header = f"{'method':<22}{'keep':>6}{'prefill s':>11}{'unpruned':>10}{'speed-up':>10}{'generate s':>12}"
    print(header + f"{'unpruned':>10}{'speed-up':>10}  note")
    for spec in args.methods.split(","):
        name, *options = spec.split(":")
        kwargs = {key: _value(value) for key, value in (option.split("=", 1) for option in options)}
        for keep in (int(k) for k in args.keep.split(",")):
            def context(name=name, keep=keep, kwargs=kwargs):
                return tokensieve.sieve(model, name, keep=keep, **kwargs)

            p, _ = paired_latency(prefill, context, args.pairs, device)
            g, _ = paired_latency(generate, context, args.pairs, device)
            noisy = max(p.unpruned_spread, g.unpruned_spread) > NOISY_SPREAD
            print(f"{spec:<22}{keep:>6}{p.pruned:>11.3f}{p.unpruned:>10.3f}{p.speedup:>9.2f}x{g.pruned:>12.3f}"
                  f"{g.unpruned:>10.3f}{g.speedup:>9.2f}x  {'noisy (unpruned spread > 20%)' if noisy else ''}")


if __name__ == "__main__":
    main()

"""Overhead of ZOO-Prune relative to the unpruned prefill, on the tiny LLaVA and a mid-size LLaVA.

For each model: the unpruned prefill (vision tower + projector + LLM, one image, ~600-token prompt), then the
sensitivity pass with each estimator (Monte-Carlo through the full projector, Monte-Carlo through a rank-128
SVD copy, the closed form, forward-mode JVP) and SADS at 64-of-576 (k = int(0.1112 n)). Every time is the
median of several runs in the same process, printed in ms and as a fraction of the prefill. One-off costs
(the SVD copy, the closed form's Gram matrix) are built before timing and printed on their own.

The mid-size model keeps LLaVA-1.5's vision width (1024) and 576 tokens; the projector and LLM widths default
to 512 so the whole run fits in about two minutes on 2 shared CPU cores (Monte-Carlo costs ``2 m N`` projector
passes: at LLaVA-7B widths, 1024 -> 4096 -> 4096, that is ~3.1 TFLOP per image). ``--width 4096 --layers 32``
gives the real proportions if you have the time. The FLOP counts printed next to the times let you rescale.

Threads default to 1: on a shared, oversubscribed CPU two OpenMP threads made small ops 50x slower.

Usage: ``python scripts/bench_zoo.py [--width W] [--layers L] [--repeats R] [--threads T]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from tokensieve import sieve
from tokensieve.context import ImageContext
from tokensieve.methods.zoo import Zoo
from tokensieve.ops import greedy_max_min, minmax_normalise
from tokensieve.ops.zoo_sensitivity import projector_copy
from tokensieve.testing import random_image, tiny_llava


def median_ms(fn: Callable[[], object], repeats: int, warmup: bool = True) -> float:
    """Median wall time in ms of ``repeats`` runs (after one warm-up run unless ``warmup=False``)."""
    if warmup:
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def mid_llava(width: int, layers: int):
    """A LLaVA with CLIP ViT-L-like vision width (1024, 2 layers, 336 px, 576 tokens) and a ``width``-wide LLM."""
    from tokensieve.testing import tiny_llava

    heads = max(1, width // 128)
    return tiny_llava(
        layers=layers, image_size=336, vision_hidden=1024, vision_layers=2, vision_heads=16, vision_mlp_ratio=4.0,
        text_hidden=width, text_heads=heads, text_kv_heads=heads, mlp_ratio=2.6875,
    )  # fmt: skip


class _Capture(Zoo):
    """Zoo that remembers the context it was handed (not registered)."""

    contexts: list[ImageContext] = []

    def select(self, ctx: ImageContext, k: int):
        _Capture.contexts.append(ctx)
        return super().select(ctx, k)


def bench(label: str, model, proc, repeats: int, warmup: bool = True) -> None:
    size = model.config.vision_config.image_size
    prompt = "USER: <image> " + " ".join(["describe this image"] * 8) + " ASSISTANT:"
    inputs = proc(images=[random_image(0, (size, size))], text=[prompt], return_tensors="pt")
    with torch.no_grad():
        prefill = median_ms(lambda: model(**inputs), repeats, warmup)
        _Capture.contexts.clear()
        with sieve(model, _Capture(keep=0.1112)):
            model(**inputs)
    ctx = _Capture.contexts[0]
    n, d_in = ctx.pre_features.shape
    proj = ctx.projector_module
    hidden, d_out = proj.linear_1.out_features, proj.linear_2.out_features
    k = int(0.1112 * n)
    rank = 128
    start = time.perf_counter()
    projector_copy(proj, rank, torch.float32)
    svd_ms = 1e3 * (time.perf_counter() - start)
    start = time.perf_counter()
    Zoo(estimator="exact").sensitivity(ctx)  # builds and caches G
    gram_ms = 1e3 * (time.perf_counter() - start)

    proj_flop = 2 * (d_in * hidden + hidden * d_out)  # one token through the projector
    lowrank_flop = sum(  # a linear whose rank bound is <= rank stays dense in the copy
        2 * (rank * (a + b) if rank < min(a, b) else a * b) for a, b in ((d_in, hidden), (hidden, d_out))
    )
    m = Zoo().m
    rows: list[tuple[str, float, float]] = []
    for name, method, flop in (
        ("sensitivity montecarlo (full)", Zoo(), 2 * m * n * proj_flop),
        (f"sensitivity montecarlo (lowrank {rank})", Zoo(lowrank=rank), 2 * m * n * lowrank_flop),
        ("sensitivity exact", Zoo(estimator="exact"), 2 * n * (d_in * hidden + hidden * hidden)),
        ("sensitivity jvp", Zoo(estimator="jvp"), 2 * m * n * proj_flop),
    ):
        rows.append((name, median_ms(lambda method=method: method.sensitivity(ctx), repeats, warmup), flop))
    weights = minmax_normalise(Zoo(estimator="exact").sensitivity(ctx))
    sads = median_ms(lambda: greedy_max_min(ctx.features, k, weights=weights, first="max_weight"), repeats, warmup)
    rows.append((f"SADS (k={k} of {n})", sads, 2 * n * n * d_out))

    print(
        f"\n== {label}: {n} visual tokens, projector {d_in}->{hidden}->{d_out}, prompt {inputs['input_ids'].shape[1]}"
    )
    print(f"unpruned prefill: {prefill:9.1f} ms (median of {repeats})")
    print(f"one-off: rank-{rank} SVD copy {svd_ms:.1f} ms, first exact call (G + torch.func start-up) {gram_ms:.1f} ms")
    print(f"{'component':40s} {'ms':>9s} {'/prefill':>9s} {'GFLOP':>8s}")
    for name, ms, flop in rows:
        print(f"{name:40s} {ms:9.1f} {ms / prefill:9.3f} {flop / 1e9:8.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--width", type=int, default=512, help="projector hidden/output and LLM width (mid model)")
    parser.add_argument("--layers", type=int, default=4, help="LLM layers (mid model)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="1: on an oversubscribed box 2 threads stall")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model, proc = tiny_llava()
    bench("tiny LLaVA", model, proc, max(args.repeats, 5))
    model, proc = mid_llava(args.width, args.layers)
    label = f"mid LLaVA (vision 1024 x2 layers, LLM {args.layers} x {args.width})"
    bench(label, model, proc, args.repeats, warmup=False)  # big GEMMs: no warm-up needed, halves the run time
    print(f"\ntotal {time.perf_counter() - start:.0f} s, {args.threads} threads")


if __name__ == "__main__":
    main()

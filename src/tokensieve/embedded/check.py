"""Quick redundancy check of an embedded checkpoint: unpruned, random and method accuracy at small budgets.

``python -m tokensieve.embedded.check --model-dir /work/ckpt/embedded-v2/instruct --keep 0.11 0.22``

It prints, per budget and method, the per-family test accuracy and its retention (pruned / unpruned mean),
and checks the v2 targets: unpruned >= 95% mean and >= 90% per family; random at 11% keeps >= 60% of the
unpruned mean; the best method at 11% beats random by >= 10 points. Methods run through
``tokensieve.sieve(model, method, keep=...)`` exactly as a user would call them (pre-LLM methods, whose
budget is the same at every decoder layer).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from tokensieve.embedded.build import EMBEDDED_DIR, load_embedded
from tokensieve.embedded.evaluate import accuracy, answer
from tokensieve.embedded.synthetic import FAMILIES, make_split


def layout_of(model) -> str:
    """The scene layout a checkpoint was trained on (v1 checkpoints predate the attribute)."""
    return getattr(model.config, "embedded_layout", "v1")


def scores_for(model, processor, samples, method: str | None, keep: float, seed: int = 0) -> dict[str, float]:
    if method is None:
        return accuracy(samples, answer(model, processor, samples, batch_size=50))
    import tokensieve

    options = {"seed": seed} if method in ("random", "zoo") else {}
    with tokensieve.sieve(model, method, keep=keep, **options):
        return accuracy(samples, answer(model, processor, samples, batch_size=50))


def run_check(model_dir: Path, keeps, methods, n_per_family: int) -> dict:
    model, processor = load_embedded(path=model_dir)
    samples = make_split("test", n_per_family, layout=layout_of(model))
    results = {("none", 1.0): scores_for(model, processor, samples, None, 1.0)}
    for keep in keeps:
        for method in methods:
            results[(method, keep)] = scores_for(model, processor, samples, method, keep)
    return results


def report(results: dict) -> list[str]:
    full = results[("none", 1.0)]
    lines = ["method    keep  " + " ".join(f"{f:>8}" for f in FAMILIES) + "     mean  retained"]
    for (method, keep), scores in results.items():
        cells = " ".join(f"{100 * scores.get(f, 0.0):8.1f}" for f in FAMILIES)
        lines.append(
            f"{method:9} {keep:4.2f}  {cells} {100 * scores['mean']:8.1f} {scores['mean'] / full['mean']:8.2f}"
        )
    verdicts = [
        f"unpruned mean >= 95%: {full['mean'] >= 0.95}; every family >= 90%: {all(full[f] >= 0.90 for f in FAMILIES)}"
    ]
    if ("random", 0.11) in results:
        random = results[("random", 0.11)]["mean"]
        best = max(s["mean"] for (m, k), s in results.items() if k == 0.11 and m != "random")
        verdicts.append(f"random at 11% keeps >= 60%: {random / full['mean'] >= 0.60} ({random / full['mean']:.2f})")
        verdicts.append(
            f"best method at 11% beats random by >= 10 points: {best - random >= 0.10} ({100 * (best - random):+.1f})"
        )
    return lines + verdicts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=EMBEDDED_DIR)
    parser.add_argument("--keep", type=float, nargs="+", default=[0.11, 0.22])
    parser.add_argument("--methods", nargs="+", default=["random", "divprune", "zoo"])
    parser.add_argument("--per-family", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    if not (args.model_dir / "config.json").exists():
        parser.error(f"{args.model_dir} has no config.json; pass a folder exported by train-tiny (e.g. RUN/instruct)")
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    for line in report(run_check(args.model_dir, args.keep, args.methods, args.per_family)):
        print(line)
    print(f"({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

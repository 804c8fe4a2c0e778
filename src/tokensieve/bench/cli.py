"""``tokensieve bench`` and ``tokensieve show``: argparse sub-commands.

The main ``tokensieve`` command calls :func:`add_bench_parser` and :func:`add_show_parser`; this module also runs
on its own: ``python -m tokensieve.bench.cli bench --limit 10``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import sys
import time
from pathlib import Path

from ..budget import Keep, validate_keep

# The default run (embedded model, all methods, 5 budgets: ~85 cells) has to finish, set-up included, in ~10 minutes
# on 2 CPU cores; on a quiet machine 25 per family took 2m11s in all, so 60 per family (300 questions per cell) fits.
DEFAULT_LIMIT = 60
DEFAULT_KEEPS = "1.0,0.33,0.22,0.11,0.05"


def parse_keep(text: str) -> Keep:
    """``"64"`` -> 64 tokens, ``"0.11"`` -> a fraction (the budget vocabulary of :mod:`tokensieve.budget`)."""
    text = text.strip()
    try:
        value: Keep = int(text)
    except ValueError:
        value = float(text)
    return validate_keep(value)


def parse_keeps(text: str) -> list[Keep]:
    return [parse_keep(part) for part in text.split(",") if part.strip()]


def parse_methods(text: str | None) -> list[str]:
    """Comma-separated method names; ``all`` (or nothing) means every registered method."""
    from ..methods.base import list_methods, method_class

    if not text or text.strip().lower() == "all":
        return list_methods()
    names = [part.strip().lower().replace("-", "_") for part in text.split(",") if part.strip()]
    for name in names:
        method_class(name)  # unknown names fail before the model loads
    return names


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(spec: str | None = None, device: str | None = None, dtype: str | None = None):
    """``(model, processor, name)``: the embedded model by default, else any HF VLM id or local path."""
    import torch

    device = device or default_device()
    if dtype:
        torch_dtype = getattr(torch, dtype)
    else:  # half precision only where it is fast
        torch_dtype = torch.bfloat16 if str(device).startswith("cuda") and spec not in (None, "embedded") else None
    if spec in (None, "", "embedded"):
        from ..embedded.build import EMBEDDED_DIR, load_embedded

        if not (EMBEDDED_DIR / "config.json").exists():
            raise SystemExit(
                f"the embedded model is missing from {EMBEDDED_DIR}; train it with `tokensieve train-tiny` "
                f"or pass --model PATH_OR_HF_ID"
            )
        model, processor = load_embedded(device=device, dtype=torch_dtype or torch.float32)
        return model, processor, "embedded"
    from transformers import AutoModelForImageTextToText, AutoProcessor

    kwargs = {"dtype": torch_dtype} if torch_dtype is not None else {}
    model = AutoModelForImageTextToText.from_pretrained(spec, **kwargs)
    model.to(device).eval()
    processor = AutoProcessor.from_pretrained(spec)
    return model, processor, str(spec)


# ------------------------------------------------------------------------------------------------- bench


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``bench`` on an argparse sub-parser collection (sets ``func``)."""
    p = subparsers.add_parser(
        "bench",
        help="run pruning methods x budgets side by side (accuracy, retention, speed-up, FLOPs, KV cache)",
        description="Benchmark pruning methods at several budgets on one model and task. Results go to a run "
        "folder (one JSONL line per finished cell; rerun with the same --out to resume), with report.md, plots "
        "and a picture grid of the kept tokens.",
    )
    p.add_argument("--model", default=None, help="HF VLM id or local path (default: the embedded model)")
    p.add_argument("--task", default="synthetic", choices=("synthetic", "pope", "gqa"))
    p.add_argument("--data", default=None, help="pope/gqa: hub name or local file/folder (default: lmms-lab/*)")
    p.add_argument("--split", default=None, help="dataset split (synthetic: test; pope: test; gqa: testdev)")
    p.add_argument("--image-dir", default=None, help="pope/gqa: folder of image files named in the data")
    p.add_argument("--limit", type=int, default=DEFAULT_LIMIT, help="questions per family (default %(default)s)")
    p.add_argument("--methods", default="all", help="comma-separated method names (default: all registered)")
    p.add_argument("--keep", default=DEFAULT_KEEPS, help="comma-separated budgets; 1.0 is the unpruned reference "
                   "(always run); floats are fractions, ints token counts (default %(default)s)")  # fmt: skip
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default=None, help="torch dtype name, e.g. bfloat16 (default: float32 on CPU)")
    p.add_argument("--seed", type=int, default=0, help="torch seed set before every cell")
    p.add_argument("--out", default=None, help="run folder (default runs/<timestamp>); reuse it to resume")
    p.add_argument("--batch-size", type=int, default=50, help="generation batch size")
    p.add_argument("--repeats", type=int, default=3, help="latency repeats (median)")
    p.add_argument("--latency-batch", type=int, default=8, help="samples in the fixed latency batch")
    p.add_argument("--viz-keep", default=None, help="budget of the picture grid (default: the one nearest 0.11)")
    p.add_argument("--retry-errors", action="store_true", help="rerun cells recorded as errors")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_bench)
    return p


def cmd_bench(args: argparse.Namespace) -> int:
    from .loaders import load_task
    from .report import errors_table, results_table
    from .runner import BenchConfig, run_bench

    methods = parse_methods(args.methods)
    keeps = parse_keeps(args.keep)
    out = Path(args.out or Path("runs") / _dt.datetime.now().strftime("%Y%m%d-%H%M%S"))
    start = time.perf_counter()
    task = load_task(args.task, limit=args.limit, data=args.data, split=args.split, image_dir=args.image_dir)
    model, processor, name = load_model(args.model, args.device, args.dtype)
    config = BenchConfig(
        methods=methods,
        keeps=keeps,
        batch_size=args.batch_size,
        repeats=args.repeats,
        latency_batch=args.latency_batch,
        viz_keep=parse_keep(args.viz_keep) if args.viz_keep else None,
        seed=args.seed,
        retry_errors=args.retry_errors,
        progress=not args.no_progress,
    )
    print(f"bench: {name} on {task.name} ({len(task.samples)} questions), {len(methods)} methods x {keeps} -> {out}",
          file=sys.stderr)  # fmt: skip
    result = run_bench(model, processor, task, out, config, model_name=name)
    print(results_table(result.rows, task.families))
    errors = errors_table(result.rows)
    if errors:
        print("\nerrors:\n" + errors)
    print(
        f"\n{len(result.computed)} cells computed, {len(result.skipped)} resumed, "
        f"{time.perf_counter() - start:.0f} s; report: {result.report}",
    )
    return 0


# -------------------------------------------------------------------------------------------------- show


def add_show_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``show`` on an argparse sub-parser collection (sets ``func``)."""
    p = subparsers.add_parser(
        "show",
        help="answer one question about one image under a method and write the kept-token overlay",
        description="Answer QUESTION about IMAGE with the visual tokens pruned by --method and write an overlay "
        "of the kept tokens (dropped patches darkened).",
    )
    p.add_argument("image", help="image file")
    p.add_argument("question", help="question text")
    p.add_argument("--method", default="zoo", help="method name, or comma-separated names composed in order")
    p.add_argument("--keep", default="0.25", help="tokens per image (int) or fraction (float); default %(default)s")
    p.add_argument("--model", default=None, help="HF VLM id or local path (default: the embedded model)")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--out", default="overlay.png", help="overlay PNG (default %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--view", default="auto", choices=("auto", "stretch", "center_crop", "pad"),
                   help="how a square token grid maps onto a non-square image")  # fmt: skip
    p.set_defaults(func=cmd_show)
    return p


def show(
    model, processor, image, question: str, method: str | list[str], keep: Keep, max_new_tokens: int = 16
) -> tuple[str, list[int], dict]:
    """Answer ``question`` about ``image`` under the sieve: ``(answer, kept indices, trace image info)``."""
    import torch

    from ..embedded.synthetic import Sample
    from ..sieve import sieve
    from .loaders import Task, build_prompt
    from .metrics import exact_match

    sample = Sample(image=image, question=question, answer="", family="show", relevant_tokens=[])
    task = Task(name="show", samples=[sample], match=exact_match, max_new_tokens=max_new_tokens)
    inputs = processor(images=[image], text=[build_prompt(processor, sample, task)], return_tensors="pt")
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    tokenizer = processor.tokenizer
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with sieve(model, method, keep=keep) as active, torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    image_index = max(i for s, i in active.trace.images if s == 0)
    kept = active.trace.kept(0, image_index).tolist()
    return " ".join(answer.split()), kept, active.trace.images[(0, image_index)]


def cmd_show(args: argparse.Namespace) -> int:
    from PIL import Image

    from ..viz import overlay

    methods = parse_methods(args.method)
    method: str | list[str] = methods[0] if len(methods) == 1 else methods
    keep = parse_keep(args.keep)
    model, processor, name = load_model(args.model, args.device, args.dtype)
    with Image.open(args.image) as file:
        image = file.convert("RGB")
    answer, kept, info = show(model, processor, image, args.question, method, keep, args.max_new_tokens)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    overlay(image, kept, info, view=args.view).save(out)
    label = "+".join(methods)
    print(f"answer: {answer}")
    print(f"{label} keep={keep}: kept {len(kept)}/{info['n_tokens']} visual tokens ({name}); overlay: {out}")
    return 0


# ------------------------------------------------------------------------------------------------ standalone


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tokensieve.bench.cli")
    sub = parser.add_subparsers(dest="command", required=True)
    add_bench_parser(sub)
    add_show_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())

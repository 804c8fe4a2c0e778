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

from ..budget import BudgetError, Keep, validate_keep
from ..methods.base import MethodError
from .parallel import RunLocked, current_world
from .runner import MIN_PAIRS, RESULTS_FILE, BenchConfig, hold_run_lock, is_reference, run_bench, saved_rows
from .usage import (
    OneLineParser,
    UsageError,
    at_least,
    check_device,
    check_dtype,
    check_model_spec,
    check_out_dir,
    positive_int,
    report,
    synthetic_layout,
)

# The default run (embedded model, all methods, 5 budgets: ~85 cells) has to finish, set-up included, in ~10 minutes
# on 2 CPU cores; on a quiet machine 25 per family took 2m11s in all, so 60 per family (300 questions per cell) fits.
DEFAULT_LIMIT = 20  # questions per family: the README table; raise it for tighter figures
DEFAULT_KEEPS = "1.0,0.22,0.11"  # the README table (a layer-averaged 22% and 11%)
USER_ERRORS = (UsageError, RunLocked, BudgetError, MethodError)


def parse_keep(text: str) -> Keep:
    """``"64"`` -> 64 tokens, ``"0.11"`` -> a fraction (the budget vocabulary of :mod:`tokensieve.budget`)."""
    text = text.strip()
    try:
        try:
            value: Keep = int(text)
        except ValueError:
            value = float(text)
        return validate_keep(value)
    except (ValueError, BudgetError) as error:
        message = str(error) if isinstance(error, BudgetError) else f"{text!r} is not a number"
        raise argparse.ArgumentTypeError(f"{message}; pass e.g. 64 (tokens) or 0.11 (a fraction)") from None


def parse_keeps(text: str) -> list[Keep]:
    keeps = [parse_keep(part) for part in text.split(",") if part.strip()]
    if not keeps:
        raise argparse.ArgumentTypeError("no budget given; pass e.g. 1.0,0.22,0.11")
    return keeps


def parse_methods(text: str | None, allow_none: bool = False) -> list[str]:
    """Comma-separated method names; ``all`` (or nothing) means every registered method."""
    from ..methods.base import MethodError, list_methods, method_class

    if not text or text.strip().lower() == "all":
        return list_methods()
    names = [part.strip().lower().replace("-", "_") for part in text.split(",") if part.strip()]
    for name in names:
        if allow_none and name == "none" and len(names) == 1:
            continue
        try:
            method_class(name)  # unknown names fail before the model loads
        except MethodError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
    return names


def default_device() -> str:
    import torch

    from .parallel import local_device_index

    return f"cuda:{local_device_index()}" if torch.cuda.is_available() else "cpu"


def load_model(spec: str | None = None, device: str | None = None, dtype: str | None = None):
    """``(model, processor, name)``: the embedded model by default, else any HF VLM id or local path.

    Arguments are checked first (:mod:`tokensieve.bench.usage`); a model that fails to load is a
    :class:`~tokensieve.bench.usage.UsageError`."""
    import torch

    spec = check_model_spec(spec)
    device = check_device(device) or default_device()
    torch_dtype = check_dtype(dtype)
    if torch_dtype is None and str(device).startswith("cuda") and spec is not None:
        torch_dtype = torch.bfloat16  # half precision only where it is fast
    try:
        if spec is None:
            from ..embedded.build import load_embedded

            model, processor = load_embedded(device=device, dtype=torch_dtype or torch.float32)
            return model, processor, "embedded"
        from transformers import AutoModelForImageTextToText, AutoProcessor

        kwargs = {"dtype": torch_dtype} if torch_dtype is not None else {}
        model = AutoModelForImageTextToText.from_pretrained(spec, **kwargs)
        model.to(device).eval()
        processor = AutoProcessor.from_pretrained(spec)
    except (OSError, ValueError, KeyError) as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        raise UsageError(
            f"could not load --model {spec or 'embedded'}: {first}; pass a local model folder or a Hub id "
            f"that is cached here (no downloads offline)"
        ) from None
    return model, processor, str(spec)


# ------------------------------------------------------------------------------------------------- bench


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``bench`` on an argparse sub-parser collection (sets ``func``)."""
    p = subparsers.add_parser(
        "bench",
        help="run pruning methods x budgets side by side (accuracy, retention, speed-up, FLOPs, KV cache)",
        description="Benchmark pruning methods at several budgets on one model and task, at equal layer-averaged "
        "visual tokens. Results go to a run folder (one JSONL line per finished cell; rerun with the same --out to "
        "resume), with report.md, plots and kept-token grids. Under `torchrun --nproc-per-node N` or `accelerate "
        "launch` the cells are shared out by rank.",
    )
    p.add_argument("--model", default=None, help="HF VLM id or local path (default: the embedded model)")
    p.add_argument("--task", default="synthetic", choices=("synthetic", "pope", "gqa"))
    p.add_argument("--data", default=None, help="pope/gqa: hub name or local file/folder (default: lmms-lab/*)")
    p.add_argument("--split", default=None, help="dataset split (synthetic: test; pope: test; gqa: testdev)")
    p.add_argument("--image-dir", default=None, help="pope/gqa: folder of image files named in the data")
    p.add_argument("--limit", type=positive_int, default=DEFAULT_LIMIT,
                   help="questions per family (default %(default)s)")
    p.add_argument("--methods", type=parse_methods, default="all",
                   help="comma-separated method names (default: all)")
    p.add_argument("--keep", type=parse_keeps, default=DEFAULT_KEEPS, help="comma-separated budgets; 1.0 is the "
                   "unpruned reference (always run); floats are fractions, ints token counts (default %(default)s)")
    p.add_argument("--stage-budgets", action="store_true", help="in-LLM methods read keep as the count after their "
                   "layer (their own default) instead of a layer-averaged budget")
    p.add_argument("--device", default=None, help="torch device (default: cuda[:LOCAL_RANK] if available, else cpu)")
    p.add_argument("--dtype", default=None, help="torch dtype name, e.g. bfloat16 (default: float32 on CPU)")
    p.add_argument("--seed", type=int, default=0, help="torch seed set before every cell")
    p.add_argument("--out", default=None, help="run folder (default runs/<timestamp>); reuse it to resume")
    p.add_argument("--batch-size", type=positive_int, default=50, help="generation batch size")
    p.add_argument("--pairs", type=at_least(MIN_PAIRS), default=MIN_PAIRS,
                   help="latency pairs (pruned, unpruned) per cell, at least %(default)s; the median is reported")
    p.add_argument("--latency-batch", type=positive_int, default=8, help="samples in the fixed latency batch")
    p.add_argument("--viz-keep", type=parse_keep, default=None, help="budget of the kept-token grids (default: "
                   "the one nearest 0.11)")
    p.add_argument("--retry-errors", action="store_true", help="rerun cells recorded as errors or unreachable")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_bench)
    return p  # fmt: skip


def _config(args: argparse.Namespace) -> BenchConfig:
    return BenchConfig(
        methods=args.methods,
        keeps=args.keep,
        batch_size=args.batch_size,
        pairs=args.pairs,
        latency_batch=args.latency_batch,
        viz_keep=args.viz_keep,
        average_budget=not args.stage_budgets,
        seed=args.seed,
        retry_errors=args.retry_errors,
        progress=not args.no_progress,
    )


def _resume_hint(out: Path, total: int) -> str:
    saved = len(saved_rows(out))
    argv = list(sys.argv[1:]) if sys.argv[1:2] == ["bench"] else ["bench", "..."]
    if "--out" not in argv:
        argv += ["--out", str(out)]
    return (
        f"interrupted: {saved} of {total} cells are saved in {out / RESULTS_FILE}; resume with "
        f"`tokensieve {' '.join(argv)}` (finished cells are skipped)"
    )


def cmd_bench(args: argparse.Namespace) -> int:
    from .loaders import load_task
    from .report import errors_table, results_table

    if isinstance(args.methods, str):  # the default "all" is not passed through type=
        args.methods = parse_methods(args.methods)
    if isinstance(args.keep, str):
        args.keep = parse_keeps(args.keep)
    config = _config(args)
    out = check_out_dir(args.out or Path("runs") / _dt.datetime.now().strftime("%Y%m%d-%H%M%S"))
    check_model_spec(args.model)
    check_device(args.device)
    check_dtype(args.dtype)
    try:
        world = current_world()
    except RuntimeError as error:
        raise UsageError(str(error)) from None
    lock = hold_run_lock(out, world)  # a second run on this folder stops here, before its model loads
    total = 1 + len(config.methods) * sum(not is_reference(k) for k in config.keeps)
    start = time.perf_counter()
    try:
        try:
            task = load_task(args.task, limit=args.limit, data=args.data, split=args.split, image_dir=args.image_dir,
                             layout=synthetic_layout(args.model))  # fmt: skip
        except (OSError, ValueError) as error:
            raise UsageError(f"could not load --task {args.task}: {error}") from None
        model, processor, name = load_model(args.model, args.device, args.dtype)
        if world.main:
            print(f"bench: {name} on {task.name} ({len(task.samples)} questions), {len(config.methods)} methods x "
                  f"{list(config.keeps)} -> {out} ({world.size} process(es))", file=sys.stderr)  # fmt: skip
        result = run_bench(model, processor, task, out, config, model_name=name, world=world, locked=True)
    except KeyboardInterrupt:
        if world.main:
            print(_resume_hint(out, total), file=sys.stderr)
        return 130
    finally:
        if lock is not None:
            lock.release()
    if world.main:
        print(results_table(result.rows, task.families))
        for status in ("unreachable", "error"):
            table = errors_table(result.rows, status)
            if table:
                print(f"\n{status}:\n{table}")
        print(f"\n{len(result.computed)} cells computed, {len(result.skipped)} resumed, "
              f"{time.perf_counter() - start:.0f} s; report: {result.report}")  # fmt: skip
    return 0


# ------------------------------------------------------------------------------------------------ standalone


def build_parser() -> argparse.ArgumentParser:
    from .show import add_show_parser

    parser = OneLineParser(prog="python -m tokensieve.bench.cli")
    sub = parser.add_subparsers(dest="command", required=True)
    add_bench_parser(sub)
    add_show_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as error:
        return report(parser.prog, error)


if __name__ == "__main__":
    raise SystemExit(main())

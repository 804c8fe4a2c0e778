"""Run methods x budgets on one model and task, one cell at a time, into a resumable run folder.

A cell is ``(method, keep)``; ``keep=1.0`` is the unpruned reference, run on the plain model (no sieve, no hooks).
Each finished cell is appended to ``results.jsonl`` as one JSON line, flushed and fsynced before the next cell
starts, so an interruption loses at most the cell in progress; a rerun with the same folder skips every cell
already there, and a lock on the folder refuses a second run while one is active. A cell whose method cannot run
becomes an ``"error"`` row, one that cannot meet its layer-averaged budget an ``"unreachable"`` row.

Under ``torchrun`` / ``accelerate launch`` the cells are sharded by rank (:mod:`tokensieve.bench.parallel`):
each rank appends its rows to ``shards/rank<r>.jsonl`` and rank 0 merges them into ``results.jsonl``.

Per cell (:func:`tokensieve.bench.cell.evaluate_cell`): accuracy per family and their mean (greedy ``generate``,
batched); retention (mean over families of accuracy / reference accuracy, %); visual tokens after the last stage
and averaged over decoder layers, next to the budget; decoder prefill FLOPs from the Trace's per-layer counts
(:func:`tokensieve.bench.metrics.prefill_flops`); prefill latency paired with unpruned timings in one loop, the
speed-up as the ratio of their medians; KV-cache bytes per sample; kept indices and answers of a few images.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..adapters.base import get_adapter
from ..budget import Keep, validate_keep
from ..methods.base import list_methods, method_class
from . import cell as _cell
from .cell import REFERENCE, Prepared, UnreachableBudget
from .loaders import Task
from .parallel import RunLock, World, current_world
from .store import (  # noqa: F401  (re-exported: the run folder's names)
    RESULTS_FILE,
    RUN_FILE,
    SHARDS_DIR,
    append_row,
    cell_key,
    check_folder,
    merge_shards,
    read_rows,
    saved_rows,
    with_retention,
)

DEFAULT_KEEPS: tuple[Keep, ...] = (1.0, 0.33, 0.22, 0.11, 0.05)
MIN_PAIRS = 5


@dataclass
class BenchConfig:
    """What to run and how to measure it."""

    methods: Sequence[str] = ()  # empty: every registered method
    keeps: Sequence[Keep] = DEFAULT_KEEPS
    batch_size: int = 25
    pairs: int = MIN_PAIRS  # latency pairs (pruned, unpruned) per cell; the median is reported
    latency_batch: int = 8  # samples in the fixed latency batch
    n_viz: int = 4  # images in the picture grid
    viz_keep: Keep | None = None  # budget shown in the picture grid (default: the one closest to 0.11)
    average_budget: bool = True  # in-LLM methods read keep as a layer-averaged budget
    seed: int = 0
    retry_errors: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if self.pairs < MIN_PAIRS:
            raise ValueError(f"pairs={self.pairs}: a speed-up needs the median of at least {MIN_PAIRS} timing pairs")
        for name in ("batch_size", "latency_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 1")


@dataclass
class BenchResult:
    """Rows of the run folder after this call, and which cells this call computed or found done."""

    out_dir: Path
    rows: list[dict]
    computed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    report: Path | None = None


def is_reference(keep: Keep) -> bool:
    return isinstance(keep, float) and keep == 1.0


# ---------------------------------------------------------------------------------------------- the run


def _method_info(method: str) -> dict:
    if method == REFERENCE:
        return {"stage": "-", "fidelity": "-"}
    cls = method_class(method)
    return {"stage": cls.stage, "fidelity": cls.fidelity}


def _fingerprint(task: Task, model_name: str) -> dict:
    return {
        "model": model_name,
        "task": task.name,
        "source": task.source,
        "n_samples": len(task.samples),
        "families": list(dict.fromkeys(s.family for s in task.samples)),
    }


def _todo(done: dict[str, dict], methods: list[str], keeps: list[Keep], retry_errors: bool):
    cells = [(REFERENCE, 1.0)] + [(m, k) for m in methods for k in keeps if not is_reference(k)]
    todo, skipped = [], []
    for method, keep in cells:
        row = done.get(cell_key(method, keep))
        if row is not None and (row.get("status") == "ok" or not retry_errors):
            skipped.append(cell_key(method, keep))
        else:
            todo.append((method, keep))
    return todo, skipped


def _measure(prepared: Prepared, method: str, keep: Keep, config: BenchConfig, bar) -> dict:
    row = {"cell": cell_key(method, keep), "method": method, "keep": keep, **_method_info(method)}
    torch.manual_seed(config.seed)  # each cell is reproducible whatever ran before it
    try:
        measured = _cell.evaluate_cell(
            prepared, method, keep, config.pairs, batch_bar=bar.update, average_budget=config.average_budget
        )
    except UnreachableBudget as error:
        row.update(status="unreachable", error=str(error))
    except Exception as error:  # noqa: BLE001 - one failing method must not stop the benchmark
        row.update(status="error", error=f"{type(error).__name__}: {error}".strip()[:500])
    else:
        row.update(status="ok", **measured)
    row["time"] = _dt.datetime.now().isoformat(timespec="seconds")
    return row


def _run_cells(prepared: Prepared, todo: list, sink: Path, done: dict, config: BenchConfig, world: World):
    computed = []
    n = len(prepared.task.samples)
    show = config.progress and world.main
    with tqdm(total=len(todo) * n, desc="bench", unit="q", disable=not show, dynamic_ncols=True) as bar:
        for method, keep in todo:
            bar.set_postfix_str(cell_key(method, keep))
            before = bar.n
            row = _measure(prepared, method, keep, config, bar)
            row["rank"] = world.rank
            append_row(sink, with_retention(row, done.get(cell_key(REFERENCE, 1.0))))
            done[row["cell"]] = row
            computed.append(row["cell"])
            bar.update(n - (bar.n - before))  # error cells advance the bar too
    return computed


def _on_rank0(world: World, fn, *args):
    """Run ``fn`` on rank 0 and share its result, or raise its error on every rank."""
    outcome = None
    if world.main:
        try:
            outcome = ("ok", fn(*args))
        except Exception as error:  # noqa: BLE001 - shared with the other ranks, then raised everywhere
            outcome = ("error", error)
    outcome = world.broadcast(outcome)
    if outcome[0] == "error":
        raise outcome[1]
    return outcome[1]


def hold_run_lock(out_dir: Path, world: World) -> RunLock | None:
    """Take the run folder's lock on rank 0 (``None`` on other ranks); every rank raises
    :class:`~tokensieve.bench.parallel.RunLocked` if another run holds it."""

    def take():
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        lock = RunLock(Path(out_dir))
        lock.acquire()
        return lock

    lock = None
    if world.main:
        try:
            lock = take()
            outcome = None
        except Exception as error:  # noqa: BLE001 - shared with the other ranks, then raised everywhere
            outcome = error
    else:
        outcome = None
    outcome = world.broadcast(outcome)
    if outcome is not None:
        raise outcome
    return lock


def run_bench(
    model,
    processor,
    task: Task,
    out_dir: str | Path,
    config: BenchConfig | None = None,
    model_name: str = "",
    write_report: bool = True,
    world: World | None = None,
    locked: bool = False,
) -> BenchResult:
    """Run every missing cell of ``config`` into ``out_dir`` and write the report (rank 0).

    Cells already in the folder are skipped (error and unreachable rows too, unless ``config.retry_errors``).
    ``KeyboardInterrupt`` stops the run between or inside cells; the finished cells stay on disk. The folder's
    lock is taken for the run (``locked=True``: the caller holds it, from :func:`hold_run_lock`); another run
    holding it raises :class:`~tokensieve.bench.parallel.RunLocked`.
    """
    config = config or BenchConfig()
    world = world or current_world()
    methods = list(config.methods) or list_methods()
    for name in methods:
        method_class(name)  # unknown names fail now, not after an hour
    keeps = [validate_keep(k) for k in config.keeps]
    out_dir = Path(out_dir)
    fingerprint = _fingerprint(task, model_name)
    own = None if locked else hold_run_lock(out_dir, world)
    try:
        todo, skipped = _on_rank0(world, _start, out_dir, fingerprint, config, methods, keeps)
        return _run(model, processor, task, out_dir, config, world, todo, skipped, fingerprint, write_report)
    finally:
        if own is not None:
            own.release()


def _start(out_dir: Path, fingerprint: dict, config: BenchConfig, methods: list[str], keeps: list[Keep]):
    check_folder(out_dir, fingerprint, config)
    return _todo(saved_rows(out_dir), methods, keeps, config.retry_errors)


def _run(model, processor, task, out_dir, config, world, todo, skipped, fingerprint, write_report) -> BenchResult:
    mine = todo[world.rank :: world.size]
    sink = out_dir / RESULTS_FILE
    if world.size > 1:
        (out_dir / SHARDS_DIR).mkdir(exist_ok=True)
        sink = out_dir / SHARDS_DIR / f"rank{world.rank}.jsonl"
    prepared = None
    computed: list[str] = []
    if mine:
        prepared = Prepared(model, processor, task, config.batch_size, config.latency_batch, config.n_viz)
        model.eval()
        done = {r["cell"]: r for r in read_rows(out_dir / RESULTS_FILE)} if world.main else {}
        computed = _run_cells(prepared, mine, sink, done, config, world)
    world.barrier()
    rows: list[dict] = []
    result = BenchResult(out_dir=out_dir, rows=rows, computed=computed, skipped=skipped)
    if world.main:
        merged = merge_shards(out_dir)  # every rank's cells of this run (rank 0's own shard included)
        result.computed = list(dict.fromkeys(computed + merged))
        result.rows = read_rows(out_dir / RESULTS_FILE)
        if write_report:
            from .report import write_report as write

            if prepared is None:
                prepared = Prepared(model, processor, task, config.batch_size, config.latency_batch, config.n_viz,
                                    eval_batches=False)  # fmt: skip
            from .plots import collect_viz

            viz = collect_viz(prepared, family=get_adapter(model).family)
            result.report = write(out_dir, result.rows, task, viz=viz, viz_keep=config.viz_keep, meta=fingerprint)
    world.barrier()
    return result

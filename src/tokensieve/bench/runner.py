"""Run methods x budgets on one model and task, one cell at a time, into a resumable run folder.

A cell is ``(method, keep)``; ``keep=1.0`` is the unpruned reference, run once on the plain model (no sieve,
no hooks). Each finished cell is appended to ``results.jsonl`` as one JSON line, flushed and fsynced before the
next cell starts, so an interruption loses at most the cell in progress; a rerun with the same folder skips
every cell already there. A cell whose method cannot run (a signal the model lacks, a layer it does not have,
an exception inside the method) becomes an ``"error"`` row instead of stopping the run.

Per cell:

- accuracy per family and their mean, from greedy ``generate`` over the task's samples (batched);
- retention: mean over families of accuracy / reference accuracy, in percent;
- prefill latency: median over ``repeats`` forward passes (``use_cache=True``) of a fixed small batch, with the
  sieve active, so the method's own selection cost is included; the speed-up divides the plain model's median,
  measured in the same process;
- analytic LLM prefill FLOPs per sample from the Trace's real per-layer token counts
  (:func:`tokensieve.bench.metrics.prefill_flops`);
- KV-cache bytes per sample after that prefill, summed over the cache's key/value tensors (padding included);
- the kept indices of a few images (for the picture grid).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import inspect
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..adapters.base import get_adapter
from ..budget import Keep, validate_keep
from ..methods.base import list_methods, method_class
from ..sieve import sieve
from .loaders import Task, build_prompt
from .metrics import (
    cache_bytes,
    family_accuracy,
    kept_visual_tokens,
    llm_dims,
    median_latency,
    prefill_flops,
    retention,
    tokens_per_layer,
)

REFERENCE = "none"  # method name of the unpruned reference row
RESULTS_FILE = "results.jsonl"
RUN_FILE = "run.json"
DEFAULT_KEEPS: tuple[Keep, ...] = (1.0, 0.33, 0.22, 0.11, 0.05)


@dataclass
class BenchConfig:
    """What to run and how to measure it."""

    methods: Sequence[str] = ()  # empty: every registered method
    keeps: Sequence[Keep] = DEFAULT_KEEPS
    batch_size: int = 25
    repeats: int = 5  # latency repeats (median)
    latency_batch: int = 8  # samples in the fixed latency batch
    n_viz: int = 4  # images in the picture grid
    viz_keep: Keep | None = None  # budget shown in the picture grid (default: the one closest to 0.11)
    seed: int = 0
    retry_errors: bool = False
    progress: bool = True


@dataclass
class BenchResult:
    """Rows of the run folder after this call, and which cells this call computed or found done."""

    out_dir: Path
    rows: list[dict]
    computed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    report: Path | None = None


def cell_key(method: str, keep: Keep) -> str:
    """Stable id of a cell; ints (token counts) and floats (fractions) stay distinct (``64`` vs ``0.5``)."""
    return f"{method}@{keep!r}"


def is_reference(keep: Keep) -> bool:
    return isinstance(keep, float) and keep == 1.0


def read_rows(path: Path) -> list[dict]:
    """Rows of a results file; a torn last line (killed mid-write) is ignored, later rows win per cell."""
    rows: dict[str, dict] = {}
    if not path.exists():
        return []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and "cell" in row:
                rows[row["cell"]] = row
    return list(rows.values())


def append_row(path: Path, row: dict) -> None:
    """Append one JSON line and push it to disk before returning."""
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(row, sort_keys=False) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


# -------------------------------------------------------------------------------------------- preparation


@dataclass
class _Batch:
    indices: list[int]
    inputs: dict[str, torch.Tensor]
    text_tokens: list[int]  # per row: prompt tokens that are not image placeholders (padding excluded)
    image_tokens: list[int]  # per row: image placeholders


def latency_order(task: Task) -> list[int]:
    """Sample indices round-robin over families: the latency batch (and the picture grid) take the first ones,
    so its rows differ in family."""
    by_family: dict[str, list[int]] = {}
    for i, sample in enumerate(task.samples):
        by_family.setdefault(sample.family, []).append(i)
    order: list[int] = []
    for rank in range(max((len(v) for v in by_family.values()), default=0)):
        order.extend(v[rank] for v in by_family.values() if rank < len(v))
    return order


class _Prepared:
    """Processor outputs computed once and reused by every cell (images are the slow part to preprocess)."""

    def __init__(self, model, processor, task: Task, config: BenchConfig, eval_batches: bool = True):
        self.model, self.processor, self.task = model, processor, task
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.image_token_id = get_adapter(model).image_token_id
        self.n_layers, self.d, self.m = llm_dims(model)
        samples = task.samples
        self.batches = [
            self._batch(list(range(i, min(i + config.batch_size, len(samples)))))
            for i in range(0, len(samples) if eval_batches else 0, config.batch_size)
        ]
        self.latency = self._batch(latency_order(task)[: max(1, config.latency_batch)])
        self.n_viz = min(config.n_viz, len(self.latency.indices))
        tokenizer = processor.tokenizer
        self.generate_kwargs = dict(
            max_new_tokens=task.max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        )
        forward_params = inspect.signature(model.forward).parameters
        self.prefill_kwargs = {"use_cache": True}
        if "logits_to_keep" in forward_params:  # the prefill of generate() needs only the last logits
            self.prefill_kwargs["logits_to_keep"] = 1

    def _batch(self, indices: list[int]) -> _Batch:
        tokenizer = self.processor.tokenizer
        side = tokenizer.padding_side
        tokenizer.padding_side = "left"  # answers start right after every prompt
        try:
            samples = [self.task.samples[i] for i in indices]
            images = []
            for sample in samples:
                images.extend(sample.image if isinstance(sample.image, list) else [sample.image])
            texts = [build_prompt(self.processor, s, self.task) for s in samples]
            inputs = dict(self.processor(images=images, text=texts, return_tensors="pt", padding=True))
        finally:
            tokenizer.padding_side = side
        inputs = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        ids = inputs["input_ids"]
        mask = inputs.get("attention_mask", torch.ones_like(ids))
        is_image = (ids == self.image_token_id) & mask.bool()
        image_tokens = is_image.sum(1).tolist()
        text_tokens = (mask.sum(1) - is_image.sum(1)).tolist()
        return _Batch(indices, inputs, text_tokens, image_tokens)


# ----------------------------------------------------------------------------------------------- one cell


def _last_image(trace, sample: int) -> int:
    """Index of a sample's last image: the one asked about (in-context prompts put demonstrations first)."""
    return max(i for s, i in trace.images if s == sample)


def _prefill(prepared: _Prepared):
    with torch.inference_mode():
        return prepared.model(**prepared.latency.inputs, **prepared.prefill_kwargs)


def measure_reference_latency(prepared: _Prepared, repeats: int) -> float:
    """Median prefill latency of the plain model on the latency batch."""
    return median_latency(lambda: _prefill(prepared), repeats, prepared.device)[0]


def evaluate_cell(
    prepared: _Prepared,
    method: str,
    keep: Keep,
    repeats: int,
    batch_bar: Callable[[int], None] | None = None,
) -> dict:
    """Measure one cell (``method == "none"``: the plain model). Raises whatever the method raises."""
    model, task = prepared.model, prepared.task
    tokenizer = prepared.processor.tokenizer
    context = contextlib.nullcontext(None) if method == REFERENCE else sieve(model, method, keep=keep)
    predictions: list[str] = [""] * len(task.samples)
    flops, kept, kept_avg, image_tokens = [], [], [], []
    start = time.perf_counter()
    with context as active:
        for batch in prepared.batches:
            with torch.inference_mode():
                output = model.generate(**batch.inputs, **prepared.generate_kwargs)
            new = output[:, batch.inputs["input_ids"].shape[1] :]
            for row, text in zip(batch.indices, tokenizer.batch_decode(new, skip_special_tokens=True), strict=True):
                predictions[row] = " ".join(text.split())
            trace = active.trace if active is not None else None
            for b in range(len(batch.indices)):
                counts = tokens_per_layer(trace, b, batch.text_tokens[b], batch.image_tokens[b], prepared.n_layers)
                flops.append(prefill_flops(counts, prepared.d, prepared.m))
                final, average = kept_visual_tokens(trace, b, batch.image_tokens[b])
                kept.append(final)
                kept_avg.append(average)
                image_tokens.append(batch.image_tokens[b])
            if batch_bar is not None:
                batch_bar(len(batch.indices))
        eval_s = time.perf_counter() - start
        # The last timed prefill leaves its cache in ``output`` and its decisions in the trace.
        latency, output = median_latency(lambda: _prefill(prepared), repeats, prepared.device)
        n_latency = len(prepared.latency.indices)
        kv = cache_bytes(getattr(output, "cache", None) or getattr(output, "past_key_values", None)) / n_latency
        viz_kept = None
        if active is not None:
            viz_kept = [active.trace.kept(b, _last_image(active.trace, b)).tolist() for b in range(prepared.n_viz)]
    correct = [task.match(p, s.answer) for p, s in zip(predictions, task.samples, strict=True)]
    accuracy = family_accuracy([s.family for s in task.samples], correct, order=task.families)
    n = len(flops)
    return {
        "n": len(task.samples),
        "accuracy": accuracy,
        "image_tokens": sum(image_tokens) / n,
        "visual_tokens": sum(kept) / n,
        "visual_tokens_layer_avg": sum(kept_avg) / n,
        "flops": sum(flops) / n,
        "latency_s": latency,
        "kv_bytes": kv,
        "eval_s": eval_s,
        "viz_kept": viz_kept,
        "predictions_sample": predictions[:5],
    }


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


def run_bench(
    model,
    processor,
    task: Task,
    out_dir: str | Path,
    config: BenchConfig | None = None,
    model_name: str = "",
    write_report: bool = True,
) -> BenchResult:
    """Run every missing cell of ``config`` into ``out_dir`` and write the report.

    Cells already in ``out_dir/results.jsonl`` are skipped (error rows too, unless ``config.retry_errors``).
    ``KeyboardInterrupt`` stops the run between or inside cells; the finished cells stay on disk.
    """
    config = config or BenchConfig()
    methods = list(config.methods) or list_methods()
    for name in methods:
        method_class(name)  # unknown names fail now, not after an hour
    keeps = [validate_keep(k) for k in config.keeps]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = out_dir / RESULTS_FILE
    run_file = out_dir / RUN_FILE
    fingerprint = _fingerprint(task, model_name)
    if run_file.exists():
        previous = json.loads(run_file.read_text())
        if previous.get("fingerprint") != fingerprint:
            raise ValueError(
                f"{out_dir} holds a run of {previous.get('fingerprint')}, not {fingerprint}; use another --out"
            )
    run_file.write_text(json.dumps({"fingerprint": fingerprint, "config": asdict(config)}, indent=2, default=str))

    if results.exists() and results.stat().st_size:
        with open(results, "rb+") as handle:  # a line torn by a kill must not swallow the next row
            handle.seek(-1, os.SEEK_END)
            if handle.read(1) != b"\n":
                handle.write(b"\n")
    done = {row["cell"]: row for row in read_rows(results)}
    cells = [(REFERENCE, 1.0)] + [(m, k) for m in methods for k in keeps if not is_reference(k)]
    todo, skipped = [], []
    for method, keep in cells:
        key = cell_key(method, keep)
        row = done.get(key)
        if row is not None and (row.get("status") == "ok" or not config.retry_errors):
            skipped.append(key)
        else:
            todo.append((method, keep))

    computed: list[str] = []
    prepared: _Prepared | None = None
    if todo:
        prepared = _Prepared(model, processor, task, config)
        model.eval()
        torch.manual_seed(config.seed)
        ref_latency = measure_reference_latency(prepared, config.repeats)
        total = len(todo) * len(task.samples)
        with tqdm(total=total, desc="bench", unit="q", disable=not config.progress, dynamic_ncols=True) as bar:
            for method, keep in todo:
                key = cell_key(method, keep)
                bar.set_postfix_str(key)
                before = bar.n
                torch.manual_seed(config.seed)  # each cell is reproducible whatever ran before it
                row = {"cell": key, "method": method, "keep": keep, **_method_info(method)}
                try:
                    measured = evaluate_cell(prepared, method, keep, config.repeats, batch_bar=bar.update)
                except Exception as error:  # noqa: BLE001 - one failing method must not stop the benchmark
                    row.update(status="error", error=f"{type(error).__name__}: {error}".strip()[:500])
                else:
                    row.update(status="ok", **measured)
                    if method == REFERENCE:
                        ref_latency = measured["latency_s"]
                    row["ref_latency_s"] = ref_latency
                    row["speedup"] = ref_latency / measured["latency_s"] if measured["latency_s"] > 0 else None
                    reference = done.get(cell_key(REFERENCE, 1.0))
                    if method == REFERENCE:
                        row["retention"] = 100.0
                    elif reference is not None and reference.get("status") == "ok":
                        row["retention"] = retention(measured["accuracy"], reference["accuracy"])
                row["time"] = _dt.datetime.now().isoformat(timespec="seconds")
                append_row(results, row)
                done[key] = row
                computed.append(key)
                bar.update(len(task.samples) - (bar.n - before))  # error cells advance the bar too
    rows = read_rows(results)
    result = BenchResult(out_dir=out_dir, rows=rows, computed=computed, skipped=skipped)
    if write_report:
        from .report import write_report

        if prepared is None:
            prepared = _Prepared(model, processor, task, config, eval_batches=False)
        viz = collect_viz(prepared, family=get_adapter(model).family)
        result.report = write_report(out_dir, rows, task, viz=viz, viz_keep=config.viz_keep, meta=fingerprint)
    return result


@dataclass
class VizData:
    """Images of the picture grid, their labels and token layouts (``trace.images`` entries)."""

    images: list
    labels: list[str]
    infos: list[dict]
    family: str = ""


def collect_viz(prepared: _Prepared, family: str = "") -> VizData:
    """Token layouts of the picture-grid images, from one prefill under a keep-everything sieve."""
    indices = prepared.latency.indices[: prepared.n_viz]
    with sieve(prepared.model, "random", keep=1.0) as active:
        _prefill(prepared)
    samples = [prepared.task.samples[i] for i in indices]
    images = [s.image[-1] if isinstance(s.image, list) else s.image for s in samples]
    labels = [f"[{s.family}] {s.question} -> {s.answer}" for s in samples]
    infos = [active.trace.images[(b, _last_image(active.trace, b))] for b in range(len(indices))]
    return VizData(images=images, labels=labels, infos=infos, family=family)

"""One benchmark cell: a method at one budget, measured on inputs prepared once for the whole run.

- Budgets are compared at equal *layer-averaged* visual tokens: in-LLM methods that offer ``average_budget`` run
  with it (the way their papers' tables quote budgets), so every method at ``keep=0.11`` averages 11% of the
  visual tokens over the decoder layers. Before a cell is evaluated, one prefill checks that the method meets its
  budget; one that cannot (it prunes too late on a shallow decoder) is reported as unreachable, not run above it.
- Latency is taken in pairs in one loop (pruned, unpruned, pruned, ...); the speed-up is the unpruned median over
  the pruned median of that loop, and a cell whose unpruned timings spread more than :data:`NOISY_SPREAD` is flagged.
"""

from __future__ import annotations

import contextlib
import inspect
import time
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch

from ..adapters.base import get_adapter
from ..budget import Keep, resolve_keep
from ..methods.base import method_class
from ..sieve import sieve
from .loaders import Task, build_prompt
from .metrics import (
    DecoderShape,
    cache_bytes,
    family_accuracy,
    kept_visual_tokens,
    paired_latency,
    prefill_flops,
    tokens_per_layer,
)

REFERENCE = "none"  # method name of the unpruned reference row
NOISY_SPREAD = 0.20  # (max - min) / median of a cell's unpruned timings above which its latency is flagged
BUDGET_SLACK = 0.5  # tokens a sample's layer average may exceed its budget by (rounding) before it is unreachable


class UnreachableBudget(Exception):
    """A method cannot meet a layer-averaged budget on this model (e.g. it prunes too deep in a short decoder)."""


@dataclass
class Batch:
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


class Prepared:
    """Processor outputs computed once and reused by every cell (images are the slow part to preprocess)."""

    def __init__(self, model, processor, task: Task, batch_size: int, latency_batch: int, n_viz: int,
                 eval_batches: bool = True):  # fmt: skip
        self.model, self.processor, self.task = model, processor, task
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.image_token_id = get_adapter(model).image_token_id
        self.shape = DecoderShape.from_model(model)
        samples = task.samples
        self.batches = [
            self._batch(list(range(i, min(i + batch_size, len(samples)))))
            for i in range(0, len(samples) if eval_batches else 0, batch_size)
        ]
        self.latency = self._batch(latency_order(task)[: max(1, latency_batch)])
        self.n_viz = min(n_viz, len(self.latency.indices))
        tokenizer = processor.tokenizer
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.generate_kwargs = dict(max_new_tokens=task.max_new_tokens, do_sample=False, pad_token_id=pad)
        self.prefill_kwargs = {"use_cache": True}
        if "logits_to_keep" in inspect.signature(model.forward).parameters:  # the prefill needs only the last logits
            self.prefill_kwargs["logits_to_keep"] = 1

    def _batch(self, indices: list[int]) -> Batch:
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
        return Batch(indices, inputs, (mask.sum(1) - is_image.sum(1)).tolist(), is_image.sum(1).tolist())

    def prefill(self):
        with torch.inference_mode():
            return self.model(**self.latency.inputs, **self.prefill_kwargs)


def method_kwargs(method: str, average_budget: bool) -> dict:
    """Hyperparameters the bench sets: ``average_budget=True`` for every method that offers it."""
    if method == REFERENCE or not average_budget:
        return {}
    names = {f.name for f in fields(method_class(method))}
    return {"average_budget": True} if "average_budget" in names else {}


def equal_count_keep(model, keep: Keep) -> Keep:
    """The bench's budget as a token count where the family fixes the tokens per image (LLaVA-1.5, the embedded
    model): ``floor(r * n)`` for every method, so methods whose official code rounds a ratio another way (DivPrune,
    HiPrune: ``round``) are compared at the same count instead of one token more."""
    fixed = get_adapter(model).fixed_tokens_per_image()
    if fixed is None or not isinstance(keep, float) or keep >= 1.0:
        return keep
    return resolve_keep(keep, fixed)


def last_image(trace, sample: int) -> int:
    """Index of a sample's last image: the one asked about (in-context prompts put demonstrations first)."""
    return max(i for s, i in trace.images if s == sample)


def budget_tokens(trace, sample: int, keep: Keep) -> int:
    """Visual tokens a sample may keep on average over the layers: its images' budgets summed."""
    return sum(resolve_keep(keep, int(info["n_tokens"]), strict=False) for (s, _), info in trace.images.items()
               if s == sample)  # fmt: skip


def check_reachable(prepared: Prepared, make_context: Callable, keep: Keep) -> None:
    """One prefill of the latency batch under the sieve; raise :class:`UnreachableBudget` if a sample's
    layer-averaged visual tokens exceed its budget (by more than rounding)."""
    with make_context() as active:
        prepared.prefill()
    trace = active.trace
    for b, image_tokens in enumerate(prepared.latency.image_tokens):
        target = budget_tokens(trace, b, keep)
        average = kept_visual_tokens(trace, b, image_tokens)[1]
        if average > target + BUDGET_SLACK:
            first = min((r.layer for r in trace.stages), default=0)
            raise UnreachableBudget(
                f"averages {average:.1f} visual tokens over the {trace.n_layers} decoder layers, above the budget of "
                f"{target}: it prunes from layer {first}, too deep to reach keep={keep!r} on this model"
            )


def _viz_record(trace, prepared: Prepared, predictions: list[str], correct: list[bool]) -> dict:
    samples = prepared.latency.indices[: prepared.n_viz]
    kept = [trace.kept(b, last_image(trace, b)).tolist() for b in range(prepared.n_viz)] if trace else None
    avg = [kept_visual_tokens(trace, b, prepared.latency.image_tokens[b])[1] for b in range(prepared.n_viz)]
    return {
        "viz_kept": kept,
        "viz_layer_avg": avg,
        "viz_answers": [predictions[i] for i in samples],
        "viz_correct": [bool(correct[i]) for i in samples],
        "stage_layers": sorted({r.layer for r in trace.stages}) if trace else [],
    }


@dataclass
class _Answers:
    predictions: list[str]
    flops: list[float]
    kept: list[int]
    kept_avg: list[float]
    targets: list[int]
    seconds: float


def _answer_all(prepared: Prepared, make_context: Callable, keep: Keep, batch_bar) -> _Answers:
    """Greedy answers to every question under the context, and each sample's token counts and FLOPs."""
    model, tokenizer = prepared.model, prepared.processor.tokenizer
    out = _Answers([""] * len(prepared.task.samples), [], [], [], [], 0.0)
    start = time.perf_counter()
    with make_context() as active:
        for batch in prepared.batches:
            with torch.inference_mode():
                output = model.generate(**batch.inputs, **prepared.generate_kwargs)
            new = output[:, batch.inputs["input_ids"].shape[1] :]
            for row, text in zip(batch.indices, tokenizer.batch_decode(new, skip_special_tokens=True), strict=True):
                out.predictions[row] = " ".join(text.split())
            trace = active.trace if active is not None else None
            for b, (text_n, image_n) in enumerate(zip(batch.text_tokens, batch.image_tokens, strict=True)):
                counts = tokens_per_layer(trace, b, text_n, image_n, prepared.shape.n_layers)
                out.flops.append(prefill_flops(counts, prepared.shape))
                final, average = kept_visual_tokens(trace, b, image_n)
                out.kept.append(final)
                out.kept_avg.append(average)
                out.targets.append(budget_tokens(trace, b, keep) if trace is not None else image_n)
            if batch_bar is not None:
                batch_bar(len(batch.indices))
    out.seconds = time.perf_counter() - start
    return out


def evaluate_cell(
    prepared: Prepared,
    method: str,
    keep: Keep,
    pairs: int,
    batch_bar: Callable[[int], None] | None = None,
    average_budget: bool = True,
) -> dict:
    """Measure one cell (``method == "none"``: the plain model). Raises :class:`UnreachableBudget`, or whatever
    the method raises."""
    task = prepared.task
    kwargs = method_kwargs(method, average_budget)
    keep = equal_count_keep(prepared.model, keep)

    def make_context():
        if method == REFERENCE:
            return contextlib.nullcontext(None)
        return sieve(prepared.model, method, keep=keep, **kwargs)

    equal_compute = method != REFERENCE and average_budget  # stage budgets (--stage-budgets): no layer-average check
    if equal_compute:
        check_reachable(prepared, make_context, keep)
    answers = _answer_all(prepared, make_context, keep, batch_bar)
    over = max((a - t for a, t in zip(answers.kept_avg, answers.targets, strict=True)), default=0.0)
    if equal_compute and over > BUDGET_SLACK:  # a sample outside the latency batch went over its budget
        raise UnreachableBudget(f"exceeds its layer-averaged budget by up to {over:.1f} tokens on some samples")
    contexts: list = []  # the last one's trace holds the latency batch's decisions (for the pictures)

    def timed_context():
        contexts.append(make_context())
        return contexts[-1]

    timing, output = paired_latency(prepared.prefill, timed_context, pairs, prepared.device)
    kv = cache_bytes(getattr(output, "cache", None) or getattr(output, "past_key_values", None))
    correct = [task.match(p, s.answer) for p, s in zip(answers.predictions, task.samples, strict=True)]
    n = len(answers.flops)
    return {
        "n": len(task.samples),
        "accuracy": family_accuracy([s.family for s in task.samples], correct, order=task.families),
        "image_tokens": sum(sum(b.image_tokens) for b in prepared.batches) / n,
        "budget_tokens": sum(answers.targets) / n,
        "visual_tokens": sum(answers.kept) / n,
        "visual_tokens_layer_avg": sum(answers.kept_avg) / n,
        "flops": sum(answers.flops) / n,
        "latency_s": timing.pruned,
        "ref_latency_s": timing.unpruned,
        "speedup": timing.speedup,
        "latency_pairs": len(timing.pruned_s),
        "latency_times_s": {"pruned": timing.pruned_s, "unpruned": timing.unpruned_s},
        "ref_spread": timing.unpruned_spread,
        "latency_noisy": timing.unpruned_spread > NOISY_SPREAD,
        "kv_bytes": kv / len(prepared.latency.indices),
        "eval_s": answers.seconds,
        "kwargs": kwargs,
        **_viz_record(getattr(contexts[-1], "trace", None), prepared, answers.predictions, correct),
        "predictions_sample": answers.predictions[:5],
    }

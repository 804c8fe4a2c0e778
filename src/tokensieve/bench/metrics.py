"""What a benchmark cell measures: accuracy, retention, analytic prefill FLOPs, KV-cache bytes, latency.

Everything here is a plain function of tensors, traces or numbers so it can be checked on hand examples.
"""

from __future__ import annotations

import re
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Sequence

import torch

from ..trace import Trace

# ----------------------------------------------------------------------------------------------- accuracy

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = re.compile(r"[^\w\s]")


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation or articles, single spaces (the usual VQA normalisation)."""
    text = _PUNCT.sub(" ", text.lower())
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, answer: str) -> bool:
    """Whitespace-normalised exact match (the embedded task's rule, as in ``embedded.evaluate.accuracy``)."""
    return " ".join(prediction.split()) == answer


def vqa_match(prediction: str, answer: str) -> bool:
    """Lenient match for open-ended VQA (GQA): normalised equality, or the answer as the prediction's first words.

    Chat models often answer ``"Yes, there is."`` or ``"The cup."``; the first normalised words decide.
    """
    pred, gold = normalize_answer(prediction), normalize_answer(answer)
    if not gold:
        return False
    return pred == gold or pred.startswith(gold + " ")


def yes_no_match(prediction: str, answer: str) -> bool:
    """POPE rule: the first ``yes``/``no`` word of the prediction against the gold yes/no."""
    for word in normalize_answer(prediction).split():
        if word in ("yes", "no"):
            return word == normalize_answer(answer)
    return False


def family_accuracy(
    families: Sequence[str],
    correct: Sequence[bool],
    order: Sequence[str] = (),
) -> dict[str, float]:
    """Accuracy per family (in ``order`` first, then first appearance) and ``"mean"``, unweighted over families."""
    hits: dict[str, list[bool]] = defaultdict(list)
    for family, ok in zip(families, correct, strict=True):
        hits[family].append(bool(ok))
    ordered = [f for f in order if f in hits] + [f for f in dict.fromkeys(families) if f not in order]
    result = {f: sum(hits[f]) / len(hits[f]) for f in ordered}
    result["mean"] = sum(result.values()) / len(result) if result else 0.0
    return result


def retention(accuracy: dict[str, float], reference: dict[str, float]) -> float | None:
    """Mean over families of ``accuracy / reference`` in percent (the papers' Avg%).

    Families where the reference scores 0 have no defined ratio and are left out; ``None`` if none is left.
    """
    ratios = [accuracy[f] / reference[f] for f in accuracy if f != "mean" and f in reference and reference[f] > 0]
    return 100.0 * sum(ratios) / len(ratios) if ratios else None


# -------------------------------------------------------------------------------------------------- FLOPs


def llm_dims(model: torch.nn.Module) -> tuple[int, int, int]:
    """``(layers, hidden d, MLP width m)`` of a VLM's language model, read from its config."""
    config = model.config
    text = getattr(config, "text_config", None) or config
    return int(text.num_hidden_layers), int(text.hidden_size), int(text.intermediate_size)


def prefill_flops(tokens_per_layer: Sequence[int], d: int, m: int) -> float:
    """Analytic prefill FLOPs of a SwiGLU decoder: per layer ``4nd^2 + 2n^2d + 3ndm`` for ``n`` tokens.

    ``4nd^2``: q/k/v/o projections; ``2n^2d``: attention scores and the weighted sum; ``3ndm``: the gate, up
    and down projections. ``n`` is the real sequence length at that layer (text + kept visual tokens).
    """
    return float(sum(4 * n * d * d + 2 * n * n * d + 3 * n * d * m for n in tokens_per_layer))


def tokens_per_layer(
    trace: Trace | None, sample: int, text_tokens: int, n_images_tokens: int, n_layers: int
) -> list[int]:
    """Sequence length seen by each decoder layer for one sample of a batch.

    ``text_tokens``: the prompt's non-image tokens (padding excluded). Without a trace (the unpruned reference)
    every layer sees all ``n_images_tokens`` visual tokens; with one, the trace's per-layer counts are summed over
    the sample's images.
    """
    if trace is None or not trace.images:
        return [text_tokens + n_images_tokens] * n_layers
    visual = [0] * n_layers
    for s, i in trace.images:
        if s == sample:
            for layer, count in enumerate(trace.counts_per_layer(s, i)):
                visual[layer] += count
    return [text_tokens + v for v in visual]


def kept_visual_tokens(trace: Trace | None, sample: int, image_tokens: int) -> tuple[int, float]:
    """Visual tokens of one sample after the last stage, and their layer average (what the FLOPs see)."""
    if trace is None or not trace.images:
        return image_tokens, float(image_tokens)
    final, average = 0, 0.0
    for s, i in trace.images:
        if s == sample:
            final += int(trace.counts_per_layer(s, i)[-1])
            average += trace.layer_average(s, i)
    return final, average


# ----------------------------------------------------------------------------------------------- KV cache


def cache_bytes(cache) -> int:
    """Bytes held by the key/value tensors of a HuggingFace cache (or a legacy tuple of tuples)."""
    if cache is None:
        return 0
    total = 0
    layers = getattr(cache, "layers", None)
    if layers is not None:
        for layer in layers:
            for name in ("keys", "values"):
                tensor = getattr(layer, name, None)
                if isinstance(tensor, torch.Tensor):
                    total += tensor.numel() * tensor.element_size()
        return total
    for item in cache:  # legacy format: ((k, v), ...) per layer
        for tensor in item:
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


# ------------------------------------------------------------------------------------------------ latency


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def median_latency(
    fn: Callable[[], object], repeats: int, device: torch.device, warmup: int = 1
) -> tuple[float, object]:
    """Median wall time of ``fn()`` in seconds over ``repeats`` runs after ``warmup`` untimed ones, and the last
    run's output (so callers can inspect it without one more run).

    The median (not the mean) because the benchmark may share its CPU with other work.
    """
    for _ in range(warmup):
        fn()
    times, output = [], None
    for _ in range(max(1, repeats)):
        _synchronize(device)
        start = time.perf_counter()
        output = fn()
        _synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), output

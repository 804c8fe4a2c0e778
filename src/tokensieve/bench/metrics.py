"""What a benchmark cell measures: accuracy, retention, analytic prefill FLOPs, KV-cache bytes, latency.

Everything here is a plain function of tensors, traces or numbers so it can be checked on hand examples.
"""

from __future__ import annotations

import re
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass

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


@dataclass(frozen=True)
class DecoderShape:
    """What the FLOPs of one decoder layer depend on, read from a (text) config."""

    n_layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    gated: bool = True  # SwiGLU-style MLP (gate, up, down); False: two matrices (up, down)

    @classmethod
    def from_model(cls, model: torch.nn.Module) -> DecoderShape:
        """The language model's shape; the MLP counts as gated when a ``gate_proj`` module exists."""
        config = model.config
        text = getattr(config, "text_config", None) or config
        hidden, heads = int(text.hidden_size), int(text.num_attention_heads)
        kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(text, "head_dim", None) or hidden // heads)
        gated = any(name.endswith("gate_proj") or name.endswith("gate_up_proj") for name, _ in model.named_modules())
        return cls(int(text.num_hidden_layers), hidden, heads, kv_heads, head_dim, int(text.intermediate_size), gated)


def layer_flops(n: int, shape: DecoderShape) -> tuple[float, float]:
    """``(attention, mlp)`` FLOPs of one decoder layer on ``n`` tokens (2 FLOPs per multiply-add).

    Attention: q and o projections ``2 * 2n d (h hd)``, k and v ``2 * 2n d (kv hd)`` (grouped-query heads
    counted as they are), scores ``q k^T`` and the weighted sum ``2 * 2n^2 h hd`` (the full square, as FastV and
    the papers after it count it). MLP: ``3 * 2n d m`` gated (SwiGLU), ``2 * 2n d m`` otherwise. Norms, RoPE,
    softmax and the LM head are left out: they do not change with the visual-token count in a way that matters.
    """
    q_width, kv_width = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    projections = 2 * 2 * n * shape.hidden * q_width + 2 * 2 * n * shape.hidden * kv_width
    core = 2 * 2 * n * n * q_width
    mlp = (3 if shape.gated else 2) * 2 * n * shape.hidden * shape.intermediate
    return float(projections + core), float(mlp)


def prefill_flops(tokens_per_layer: Sequence[int], shape: DecoderShape) -> float:
    """Decoder prefill FLOPs of one sample: :func:`layer_flops` summed with the real length at each layer."""
    return float(sum(sum(layer_flops(n, shape)) for n in tokens_per_layer))


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


@dataclass
class PairedLatency:
    """Pruned and unpruned timings taken alternately in one loop (pruned, unpruned, pruned, ...)."""

    pruned_s: list[float]
    unpruned_s: list[float]

    @property
    def pruned(self) -> float:
        return statistics.median(self.pruned_s)

    @property
    def unpruned(self) -> float:
        return statistics.median(self.unpruned_s)

    @property
    def speedup(self) -> float:
        """``median(unpruned) / median(pruned)``, both medians over the same interleaved loop (so the two sides
        saw the same machine load), and consistent with the two latencies reported next to it."""
        return self.unpruned / self.pruned if self.pruned > 0 else float("nan")

    @property
    def unpruned_spread(self) -> float:
        """``(max - min) / median`` of the unpruned timings: how much the machine's speed moved during the cell."""
        median = self.unpruned
        return (max(self.unpruned_s) - min(self.unpruned_s)) / median if median > 0 else 0.0


def _timed(fn: Callable[[], object], device: torch.device) -> tuple[float, object]:
    _synchronize(device)
    start = time.perf_counter()
    output = fn()
    _synchronize(device)
    return time.perf_counter() - start, output


def paired_latency(
    fn: Callable[[], object],
    pruned_context: Callable[[], AbstractContextManager],
    pairs: int,
    device: torch.device,
    warmup: int = 1,
) -> tuple[PairedLatency, object]:
    """Time ``fn()`` alternately inside ``pruned_context()`` (a fresh sieve) and outside it, ``pairs`` times after
    ``warmup`` untimed pairs; also the last pruned output. Entering and leaving the context (installing and
    removing hooks) is not timed; the method's selection inside the forward pass is."""
    for _ in range(warmup):
        with pruned_context():
            fn()
        fn()
    p_times, u_times, output = [], [], None
    for _ in range(max(1, pairs)):
        with pruned_context():
            t, output = _timed(fn, device)
        p_times.append(t)
        u_times.append(_timed(fn, device)[0])
    return PairedLatency(p_times, u_times), output

"""Layer schedules shared by the multi-stage in-LLM methods (PDrop, SparseVLM, TransPrune, ...)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from ..budget import stages_layer_average
from ._layers import PAPER_DEPTH, scale_layer
from .base import MethodError

__all__ = ["PAPER_DEPTH", "PAPER_TOKENS", "check_layers", "fit_stages", "scale_layers", "solve_schedule"]
PAPER_TOKENS = 576  # visual tokens of a LLaVA-1.5 image: reads an int average budget before the image is seen


def scale_layers(fractions: Sequence[float], n_layers: int) -> list[int]:
    """Decoder layers ``max(1, round(f * 32 * n_layers / 32))`` (:func:`~tokensieve.methods._layers.scale_layer`
    of the 32-layer layer ``f * 32``), made strictly increasing inside ``[1, n_layers - 1]``.

    Official schedules are written for a 32-layer LLM (PDrop ``[8, 16, 24]`` is ``(0.25, 0.5, 0.75)``); on a
    shallower model two stages may round to the same layer, so each is pushed one layer past the previous.
    Layer 0 is never used: every in-LLM method here reads signals of the layer before its stage. A model with
    fewer than ``len(fractions) + 1`` layers gets only its first ``n_layers - 1`` stages (see :func:`fit_stages`
    for the per-stage values that go with them).
    """
    if n_layers < 2:
        raise MethodError(f"in-LLM stages need at least 2 decoder layers, got {n_layers}")
    fractions = list(fractions)[: n_layers - 1]
    layers: list[int] = []
    for i, f in enumerate(fractions):
        layer = scale_layer(f * PAPER_DEPTH, n_layers)
        if layers:
            layer = max(layer, layers[-1] + 1)
        # Leave room for the stages still to come.
        layer = min(layer, n_layers - (len(fractions) - i))
        layers.append(layer)
    return layers


def check_layers(name: str, layers: Sequence[int], n_layers: int) -> list[int]:
    """Explicit stage layers (negative counts from the end), checked to be increasing and inside the model."""
    out = [layer if layer >= 0 else n_layers + layer for layer in layers]  # checked below, with the order
    if not out or any(not 1 <= layer < n_layers for layer in out) or sorted(set(out)) != out:
        raise MethodError(
            f"{name}: layers={list(layers)} must be strictly increasing decoder layers in [1, {n_layers - 1}]"
        )
    return out


def solve_schedule(
    counts_of: Callable[[float], list[int]],
    average: float,
    layers: list[int],
    n_tokens: int,
    n_layers: int,
    iterations: int = 48,
) -> list[int]:
    """Per-stage counts of the one-parameter schedule ``counts_of(t)``, ``t`` in ``[0, 1]``, whose layer average
    (:func:`tokensieve.budget.stages_layer_average`) is the largest not above ``average``.

    ``counts_of`` must be non-decreasing in ``t``; ``t = 1`` should keep everything. Bisection on ``t``.
    """

    def avg(t: float) -> float:
        return stages_layer_average(counts_of(t), layers, n_tokens, n_layers)

    if avg(1.0) <= average:
        return counts_of(1.0)
    lo, hi = 0.0, 1.0
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        if avg(mid) <= average:
            lo = mid
        else:
            hi = mid
    return counts_of(lo)


def fit_stages(values: Sequence, n_stages: int) -> list:
    """Per-stage values (ratios, counts) for a schedule cut to ``n_stages`` by :func:`scale_layers`: the first
    ``n_stages - 1`` values, then the last one, so the final stage still reaches the final target."""
    values = list(values)
    if n_stages >= len(values):
        return values
    return values[: n_stages - 1] + values[-1:]

"""Decoder-layer indices shared by the in-LLM methods: one rule for depth scaling, one for negative indices.

Papers quote their layers for a 32-layer LLM (Vicuna-7B / LLaMA-7B: FastV K=2, PDrop 8/16/24, SparseVLM
2/6/15, ...). On a model of ``n_layers`` decoder layers a quoted layer ``K32`` becomes
``max(1, round(K32 * n_layers / 32))`` (:func:`scale_layer`): unchanged at 32 layers, so the official setting
holds there, and proportionally deeper or shallower elsewhere. Negative indices count from the end, as in
Python (:func:`normalize_layer`).
"""

from __future__ import annotations

PAPER_DEPTH = 32  # the depth every official layer list is written for


def scale_layer(k32: float, n_layers: int, *, minimum: int = 1) -> int:
    """``max(minimum, round(k32 * n_layers / 32))``: a layer quoted for a 32-layer LLM, on ``n_layers`` layers."""
    return max(minimum, round(k32 * n_layers / PAPER_DEPTH))


def normalize_layer(layer: int, n_layers: int, *, name: str = "layer", low: int = 0) -> int:
    """``layer`` as a non-negative index (``-1`` is the last layer), checked to lie in ``[low, n_layers - 1]``.

    Raises ``ValueError`` (a :class:`~tokensieve.methods.base.MethodError`) naming the valid range otherwise.
    """
    from .base import MethodError

    if isinstance(layer, bool) or not isinstance(layer, int):
        raise MethodError(f"{name}={layer!r} must be an int decoder-layer index (negative counts from the end)")
    out = layer if layer >= 0 else n_layers + layer
    if not low <= out < n_layers:
        raise MethodError(
            f"{name}={layer} is outside the model's {n_layers} layers; pass {name} in [{low}, {n_layers - 1}] "
            f"or a negative index counting from the end."
        )
    return out


def llm_layer(layer: int | None, k32: int, n_layers: int, *, name: str = "layer") -> int:
    """The decoder layer of a single-layer in-LLM method: ``layer`` if given (negative counts from the end),
    else the paper's 32-layer layer ``k32`` scaled to the model (:func:`scale_layer`, at most the last layer)."""
    if layer is None:
        return min(n_layers - 1, scale_layer(k32, n_layers))
    return normalize_layer(layer, n_layers, name=name)

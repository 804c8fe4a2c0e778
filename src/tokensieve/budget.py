"""One budget vocabulary for every method.

``keep`` is either a token count per image (``int``, e.g. ``64``) or a fraction of that image's visual tokens
(``float`` in ``(0, 1]``, e.g. ``0.111``). A ratio becomes a count by one of the official codes' conventions,
each written once here (:data:`ROUNDINGS`) and named by the method that uses it:

- ``"floor"``: ``int(ratio * n)`` (ZOO-Prune, PDrop, TransPrune, ...; 0.1112 * 576 = 64). The default.
- ``"round"``: ``int(round(ratio * n))`` with Python's ``round`` (half to even), as DivPrune's code computes
  its ``threshold_terms`` (0.1 * 256 = 25.6 -> 26; 0.5 * 53 = 26.5 -> 26).

Either way a ratio never gives less than one token.
"""

from __future__ import annotations

import math
from numbers import Integral, Real

import torch

Keep = int | float


class BudgetError(ValueError):
    """A ``keep`` value that cannot be turned into a token count."""


def validate_keep(
    keep: object,
    name: str = "keep",
    count: str = "token count per image (int, e.g. 64)",
    whole: str = "each image's tokens",
    error: type[ValueError] = BudgetError,
) -> Keep:
    """Check the type and range of a budget before any forward pass and return it unchanged. ``count`` and
    ``whole`` word the messages (the KV family passes its own); ``error`` is the exception raised."""
    if isinstance(keep, bool) or not isinstance(keep, Real):
        raise error(
            f"{name}={keep!r} is not a number: pass a {count} "
            f"or a fraction of {whole} (float in (0, 1], e.g. 0.111)."
        )
    if isinstance(keep, Integral):
        if keep <= 0:
            raise error(f"{name}={keep} must be a positive {count} or a fraction in (0, 1].")
        return int(keep)
    if not math.isfinite(keep) or not 0.0 < float(keep) <= 1.0:
        raise error(
            f"{name}={keep} is a float, so it is read as a fraction of {whole} and must lie in (0, 1]; "
            f"pass an int for a token count."
        )
    return float(keep)


def floor_count(ratio: float, n_tokens: int) -> int:
    """``int(ratio * n)``: the truncation of most official codes."""
    return int(ratio * n_tokens)


def round_count(ratio: float, n_tokens: int) -> int:
    """``int(round(ratio * n))`` with Python's half-to-even ``round`` (DivPrune's ``threshold_terms``)."""
    return int(round(ratio * n_tokens))


ROUNDINGS = {"floor": floor_count, "round": round_count}


def resolve_keep(keep: Keep, n_tokens: int, *, strict: bool = True, rounding: str = "floor") -> int:
    """Turn ``keep`` into a count for one image of ``n_tokens`` visual tokens.

    A count larger than ``n_tokens`` raises when ``strict`` (the user asked for more tokens than the image has);
    otherwise it is clipped, which is what later stages of a multi-stage pipeline want. ``rounding`` names the
    convention a ratio is turned into a count with (:data:`ROUNDINGS`).
    """
    keep = validate_keep(keep)
    if rounding not in ROUNDINGS:
        raise BudgetError(f"rounding={rounding!r}: choose one of {sorted(ROUNDINGS)}")
    if n_tokens <= 0:
        return 0
    if isinstance(keep, int):
        if keep > n_tokens and strict:
            raise BudgetError(
                f"keep={keep} exceeds the {n_tokens} visual tokens of this image; pass keep <= {n_tokens} "
                f"or a fraction such as keep={min(1.0, round(keep / n_tokens, 3)) if keep else 0.5}."
            )
        return min(keep, n_tokens)
    return max(1, min(n_tokens, ROUNDINGS[rounding](keep, n_tokens)))


def layer_average_to_stage_count(average: float, n_tokens: int, n_layers: int, prune_layer: int) -> int:
    """Convert a FLOPs-equivalent (layer-averaged) budget into the count kept from ``prune_layer`` on.

    A method that keeps all ``n_tokens`` for the first ``prune_layer`` layers and ``s`` tokens afterwards has a
    layer average of ``(prune_layer * n_tokens + (n_layers - prune_layer) * s) / n_layers``. Solving for ``s``
    gives the formula used by EntropyPrune: ``s = (L * avg - K * N) / (L - K)``, truncated like the official
    code's ``int()`` (avg 192/128/64 on LLaVA-1.5-7B: 166/98/29) and clipped to ``[1, N]``.
    """
    if not 0 <= prune_layer < n_layers:
        raise BudgetError(f"prune_layer={prune_layer} must lie in [0, {n_layers - 1}] for a {n_layers}-layer model.")
    stage = (n_layers * average - prune_layer * n_tokens) / (n_layers - prune_layer)
    return int(max(1, min(n_tokens, math.floor(stage + 1e-9))))


def stages_layer_average(counts: list[int], layers: list[int], n_tokens: int, n_layers: int) -> float:
    """Layer-averaged visual-token count of a schedule that keeps ``counts[s]`` from ``layers[s]`` on."""
    total, current, start = 0.0, n_tokens, 0
    for layer, count in zip(layers, counts, strict=True):
        total += (layer - start) * current
        current, start = count, layer
    total += (n_layers - start) * current
    return total / n_layers


def split_budget(k: int, sizes: list[int], weights: list[float] | None = None) -> list[int]:
    """Integer shares of ``k`` over groups (LLaVA-NeXT crops, frames), proportional to ``weights`` (default: equal),
    each capped at its ``sizes`` entry; the one splitting rule of every per-crop method.

    Capped shares hand their excess to the others (water filling); rounding gives the leftover units to the
    largest fractional parts, ties to the earlier crop. The shares sum to ``min(k, sum(sizes))``.
    """
    cap = torch.tensor(sizes, dtype=torch.float64)
    w = torch.ones_like(cap) if weights is None else torch.tensor(weights, dtype=torch.float64).clamp(min=0)
    alloc = torch.zeros_like(cap)
    open_ = cap > 0
    remaining = float(min(k, int(cap.sum())))
    share = torch.zeros_like(cap)
    while remaining > 0 and bool(open_.any()):
        wo = torch.where(open_, w, torch.zeros_like(w))
        if float(wo.sum()) <= 0:  # every open crop has zero weight: split evenly among them
            wo = open_.double()
        share = remaining * wo / wo.sum()
        over = open_ & (share >= cap - alloc)
        if not bool(over.any()):
            break
        remaining -= float((cap - alloc)[over].sum())
        alloc[over] = cap[over]
        open_ &= ~over
        share = torch.zeros_like(cap)
    base = torch.floor(share)
    left = int(round(remaining - float(base.sum())))
    out = alloc + base
    if left > 0:
        frac = torch.where(open_ & (out < cap), share - base, torch.full_like(share, -1.0))
        out[torch.sort(frac, descending=True, stable=True).indices[:left]] += 1
    return [int(v) for v in out.tolist()]

"""Small helpers shared by the selection rules of ``tokensieve.ops``."""

from __future__ import annotations

import torch
from torch import Tensor

# One matvec row costs roughly 8-16x one row of a GEMM on CPU (memory bound vs compute bound; measured in
# scripts/bench_ops.py), so the lazy row-per-step mode only pays off when k is well below N / 12.
_LAZY_ROW_COST = 12


def _compute_dtype(t: Tensor) -> torch.dtype:
    """float32 for half/bfloat16/float32 inputs, float64 for float64 inputs."""
    return torch.promote_types(t.dtype, torch.float32) if t.is_floating_point() else torch.float32


def _check_k(k: int, n: int) -> None:
    if not isinstance(k, int) or isinstance(k, bool):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if k < 0 or k > n:
        raise ValueError(f"k must be in [0, {n}], got {k}")


def _normalise_rows(x: Tensor, eps: float = 1e-8) -> Tensor:
    """Rows scaled to unit L2 norm; a zero row stays zero instead of becoming NaN."""
    x = x.to(_compute_dtype(x))
    return x / x.norm(dim=-1, keepdim=True).clamp_min(eps)


def _argmax_stable_order(scores: Tensor, k: int) -> Tensor:
    """Indices of the ``k`` largest scores in descending order, ties broken by the lower index.

    ``torch.topk`` does not promise an order among equal values; a stable descending sort does.
    """
    if k == 1:
        return scores.argmax().reshape(1)
    return torch.sort(scores, descending=True, stable=True).indices[:k]

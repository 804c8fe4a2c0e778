"""Greedy diversity rules that trade a per-token weight against the distance to what is already picked."""

from __future__ import annotations

import torch
from torch import Tensor


def greedy_sum_fusion(z: Tensor, weights: Tensor, k: int) -> Tensor:
    """SADS with sum fusion (ZOO-Prune's ablation): first ``argmax w``, then
    ``argmax_i w(i) + min_{p in P} (1 - cos(z_i, z_p))`` over the unpicked tokens.

    One matvec per step on the normalised features and a running minimum distance; ties go to the lower index.

    Parameters
    ----------
    z : Tensor, shape [n, D]
        Features whose cosine distance measures diversity.
    weights : Tensor, shape [n]
        Per-token weights (ZOO-Prune: min-max-normalised sensitivity).
    k : int
        Picks, ``1 <= k <= n``.

    Returns
    -------
    LongTensor, shape [k]
        Indices in pick order.
    """
    if not 1 <= k <= z.shape[0]:
        raise ValueError(f"k must lie in [1, {z.shape[0]}], got {k}")
    zn = z.float()
    zn = zn / zn.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    w = weights.to(device=z.device, dtype=torch.float32)
    n = zn.shape[0]
    picked = torch.empty(k, dtype=torch.long, device=z.device)
    taken = torch.zeros(n, dtype=torch.bool, device=z.device)
    min_dist = torch.full((n,), float("inf"), device=z.device)
    p = w.argmax()
    for t in range(k):
        picked[t] = p
        taken[p] = True
        if t == k - 1:
            break
        row = (zn @ zn[p]).clamp_(-1.0, 1.0).neg_().add_(1.0)
        torch.minimum(min_dist, row, out=min_dist)
        p = (w + min_dist).masked_fill(taken, float("-inf")).argmax()
    return picked

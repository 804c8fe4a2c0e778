"""Density-peak clustering and cluster means (SparseVLM's token recycling)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._common import _compute_dtype


def _euclidean_distance_matrix(x: Tensor) -> Tensor:
    """``||x_i - x_j||`` via the Gram matrix (no [N, N, D] broadcast), diagonal exactly 0."""
    sq = (x * x).sum(dim=1)
    d2 = (sq[:, None] + sq[None, :]).sub_(x @ x.T, alpha=2.0).clamp_(min=0)
    d = d2.sqrt_()
    d.fill_diagonal_(0.0)
    return d


def density_peak_clusters(x: Tensor, n_clusters: int, knn: int = 5) -> Tensor:
    """Density-peak clustering with k-nearest-neighbour density (DPC-KNN), as in SparseVLM's recycling.

    1. ``dist = ||x_i - x_j|| / sqrt(D)``.
    2. ``density_i = exp(-mean_{j in kNN(i)} dist_ij^2)``; the ``knn`` neighbours include the point itself
       (TCFormer / SparseVLM convention).
    3. ``delta_i`` = distance to the nearest denser point; the densest point gets the largest distance in
       the matrix.
    4. Centres = the ``n_clusters`` points with the largest ``delta * density``.
    5. Every point joins its nearest centre; each centre joins its own cluster.

    Deviation for determinism: the reference code adds ``rand * 1e-6`` to the density to break ties; here
    ties are broken by index (the lower index counts as denser, and wins equal centre scores).

    Parameters
    ----------
    x : Tensor, shape [n, D]
        Tokens to cluster.
    n_clusters : int
        Number of clusters, ``1 <= n_clusters <= n``.
    knn : int
        Neighbours for the density (clamped to ``n``).

    Returns
    -------
    LongTensor, shape [n]
        Cluster id in ``[0, n_clusters)`` of every token; cluster ``c`` is the ``c``-th centre by score.
    """
    if x.dim() != 2:
        raise ValueError(f"x must be [n, D], got shape {tuple(x.shape)}")
    n, dim = x.shape
    if not 1 <= n_clusters <= n:
        raise ValueError(f"n_clusters must be in [1, {n}], got {n_clusters}")
    if knn < 1:
        raise ValueError(f"knn must be >= 1, got {knn}")
    xf = x.to(_compute_dtype(x))
    dist = _euclidean_distance_matrix(xf) / math.sqrt(dim)
    near = torch.topk(dist, min(knn, n), dim=1, largest=False).values
    density = torch.exp(-(near * near).mean(dim=1))

    # rank 0 = densest; equal densities rank by index, so "denser" is a strict total order.
    order = torch.sort(density, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank[order] = torch.arange(n, device=x.device)
    denser = rank[None, :] < rank[:, None]  # denser[i, j]: j is denser than i
    dist_max = dist.max()
    delta = torch.where(denser, dist, dist_max).amin(dim=1)
    score = delta * density

    centres = torch.sort(score, descending=True, stable=True).indices[:n_clusters]
    assign = dist[centres].argmin(dim=0)
    assign[centres] = torch.arange(n_clusters, device=x.device)
    return assign


def merge_by_assignment(x: Tensor, assign: Tensor, n_clusters: int | None = None) -> Tensor:
    """Mean of the tokens in each cluster.

    Parameters
    ----------
    x : Tensor, shape [n, D]
        Tokens.
    assign : LongTensor, shape [n]
        Cluster id of each token (e.g. from :func:`density_peak_clusters`).
    n_clusters : int, optional
        Number of clusters; defaults to ``assign.max() + 1``. An empty cluster gives a zero row.

    Returns
    -------
    Tensor, shape [n_clusters, D]
        Cluster means, in ``x.dtype`` (accumulated in float32).
    """
    if x.dim() != 2 or assign.shape != (x.shape[0],):
        raise ValueError(f"need x [n, D] and assign [n], got {tuple(x.shape)} and {tuple(assign.shape)}")
    if n_clusters is None:
        n_clusters = int(assign.max().item()) + 1 if assign.numel() else 0
    xf = x.to(_compute_dtype(x))
    sums = torch.zeros(n_clusters, x.shape[1], dtype=xf.dtype, device=x.device)
    sums.index_add_(0, assign, xf)
    counts = torch.bincount(assign, minlength=n_clusters).clamp_(min=1).to(xf.dtype)
    return (sums / counts[:, None]).to(x.dtype)

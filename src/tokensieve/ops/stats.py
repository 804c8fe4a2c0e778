"""Small statistics shared by methods: min-max normalisation, entropies."""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["minmax_normalise", "matrix_entropy_per_token", "entropy"]


def minmax_normalise(x: Tensor, eps: float = 1e-8, dim: int | None = None) -> Tensor:
    """``(x - min) / (max - min + eps)``, with a constant input mapped to all ones.

    The all-ones rule follows ZOO-Prune: when every token has the same sensitivity, none is preferred, and
    a zero weight would wipe out the diversity term of SADS.

    Parameters
    ----------
    x : Tensor, shape [...]
        Finite values.
    eps : float
        Added to the range, as in ZOO-Prune (1e-8) and IDPruner (1e-6).
    dim : int, optional
        Normalise along this dimension (each slice on its own); None normalises the whole tensor.

    Returns
    -------
    Tensor, same shape as ``x``
        Values in ``[0, 1)``, float32 (float64 for float64 input).
    """
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    if dim is None:
        lo, hi = xf.min(), xf.max()
    else:
        lo, hi = xf.amin(dim=dim, keepdim=True), xf.amax(dim=dim, keepdim=True)
    out = (xf - lo) / (hi - lo + eps)
    return torch.where(hi > lo, out, torch.ones_like(out))


def matrix_entropy_per_token(r: Tensor) -> Tensor:
    """Matrix (von Neumann) entropy of each token's per-head representation (EntropyPrune).

    For each token, with ``R`` its ``[H, d]`` matrix of head vectors:

    1. centre across heads: ``R = R - mean_h R``;
    2. dual Gram matrix ``A = R R^T / H``, shape ``[H, H]`` (same non-zero spectrum as the ``[d, d]``
       covariance, cheaper when ``H < d``);
    3. ``H(token) = -sum_i l_i log l_i / log H`` over the eigenvalues of ``A`` clamped to ``>= 1e-10``.

    As in the reference code there is no trace normalisation, so the value is not bounded by 1. Computed
    in float64 with a batched ``eigvalsh``.

    Parameters
    ----------
    r : Tensor, shape [N, H, d]
        Per-token, per-head vectors (EntropyPrune: query states of layer K-1 reshaped to heads).

    Returns
    -------
    Tensor, shape [N]
        Entropy per token, float32.
    """
    if r.dim() != 3:
        raise ValueError(f"r must be [N, H, d], got shape {tuple(r.shape)}")
    n_heads = r.shape[1]
    if n_heads < 2:
        raise ValueError("need at least 2 heads (the entropy is divided by log H)")
    r64 = r.to(torch.float64)
    r64 = r64 - r64.mean(dim=1, keepdim=True)
    gram = r64 @ r64.transpose(1, 2) / n_heads
    eig = torch.linalg.eigvalsh(gram).clamp_(min=1e-10)
    h = -(eig * eig.log()).sum(dim=1) / math.log(n_heads)
    return h.to(torch.float32)


def entropy(p: Tensor, dim: int = -1, normalised: bool = False) -> Tensor:
    """Shannon entropy ``-sum p log p`` (natural log) with ``0 log 0 = 0``.

    Parameters
    ----------
    p : Tensor, shape [..., n, ...]
        Probabilities along ``dim`` (not renormalised here).
    dim : int
        Dimension holding the distribution.
    normalised : bool
        Divide by ``log n`` so a uniform distribution gives 1 (FlowCut's ``H / log N``).

    Returns
    -------
    Tensor, shape of ``p`` without ``dim``
        float32 (float64 for float64 input).
    """
    pf = p.to(torch.promote_types(p.dtype, torch.float32))
    h = -torch.special.xlogy(pf, pf).sum(dim=dim)
    if normalised:
        n = p.shape[dim]
        h = h / math.log(n) if n > 1 else torch.zeros_like(h)
    return h

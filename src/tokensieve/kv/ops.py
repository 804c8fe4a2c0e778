"""Shared vectorised KV selection ops: the DSA lightning-indexer score, its flat top-k and HISA's hierarchical
(block -> token) top-k. Shapes: q [S, H, D], w [S, H] (per-head weights), k [T, D] (one MQA key per token),
visible [S, T] bool (causal and padding)."""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor

import torch

NEG = float("-inf")


def indexer_scores(q: torch.Tensor, w: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """I[s, t] = Σ_h w[s, h] · ReLU(scale · q[s, h] · k[t]) -> [S, T] (fp32), as DeepSeek-V3.2's indexer (same op
    order as transformers' ``DeepseekV32Indexer``). ``k`` [T, D] shared by the queries, or [S, T, D] per query."""
    kt = k.float().transpose(-1, -2)
    scores = torch.relu(torch.matmul(q.float(), kt if k.dim() == 3 else kt.unsqueeze(0)) * scale)  # [S, H, T]
    return torch.matmul(w.float().unsqueeze(1), scores).squeeze(1)


def flat_topk(q, w, k, visible, topk: int, scale: float) -> torch.Tensor:
    """The flat indexer's selection: top-``topk`` of I over visible keys -> [S, min(topk, T)] token indices."""
    scores = indexer_scores(q, w, k, scale).masked_fill(~visible, NEG)
    return scores.topk(min(topk, k.shape[0]), dim=-1).indices


def pool_keys(k: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(pooled [M, D] block means, blocks [M, B, D]: the keys as blocks, zero-padded, a view when T % B == 0).
    Both grow with the cache and are maintained incrementally in a serving system; the microbenchmark builds
    them once."""
    t = k.shape[0]
    n_blocks = math.ceil(t / block)
    pad = n_blocks * block - t
    kp = (k.float() if pad == 0 else torch.nn.functional.pad(k.float(), (0, 0, 0, pad))).view(n_blocks, block, -1)
    counts = torch.full((n_blocks,), float(block), device=k.device)
    counts[-1] = block - pad
    return kp.sum(1) / counts[:, None], kp


class PooledKeys:
    """Block means of a growing key sequence [T, D], updated with the new keys only (``update``), as HISA's
    pooled keys are maintained while decoding. Blocks start at the sequence's first key."""

    def __init__(self, block: int) -> None:
        self.block, self.sums, self.n, self.last = block, None, 0, None

    def update(self, k: torch.Tensor) -> torch.Tensor:
        """k [T, D] (the first ``n`` rows as before) -> means [ceil(T / B), D] (fp32)."""
        t, b = k.shape[0], self.block
        stale = self.sums is None or t < self.n or (self.n > 0 and not torch.equal(k[self.n - 1], self.last))
        if stale:  # a new sequence, or the old rows changed (e.g. a beam reorder): start over
            self.sums, self.n = k.new_zeros(0, k.shape[1], dtype=torch.float32), 0
        n_blocks = math.ceil(t / b)
        if n_blocks > self.sums.shape[0]:
            grow = self.sums.new_zeros(max(n_blocks, 2 * self.sums.shape[0]) - self.sums.shape[0], k.shape[1])
            self.sums = torch.cat([self.sums, grow])
        self.sums.index_add_(0, torch.arange(self.n, t, device=k.device) // b, k[self.n : t].float())
        self.n, self.last = t, k[t - 1].clone()
        counts = torch.full((n_blocks,), float(b), device=k.device)
        counts[-1] = t - (n_blocks - 1) * b
        return self.sums[:n_blocks] / counts[:, None]


def block_scores(q, w, pooled, visible, block: int, scale: float) -> torch.Tensor:
    """Stage 1: J[s, b] on mean-pooled block keys; causally invisible blocks -inf, first and last visible
    blocks +inf (always kept, as the tilelang kernel) -> [S, M]."""
    n_blocks = pooled.shape[0]
    pad = n_blocks * block - visible.shape[1]
    vis = torch.nn.functional.pad(visible, (0, pad)).view(visible.shape[0], n_blocks, block).any(-1)
    j = indexer_scores(q, w, pooled, scale).masked_fill(~vis, NEG)
    ar = torch.arange(n_blocks, device=pooled.device)
    first = torch.where(vis, ar, n_blocks).min(-1).values
    last = torch.where(vis, ar, -1).max(-1).values
    rows = torch.arange(vis.shape[0], device=pooled.device)
    j[rows, first.clamp(max=n_blocks - 1)] = float("inf")
    j[rows, last.clamp(min=0)] = float("inf")
    return j


def hisa_topk(q, w, k, visible, topk: int, block: int, m: int, scale: float, chunk: int = 16,
              pooled: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """HISA: top-``m`` blocks (first and last forced), then the token top-``topk`` inside them -> [S, k'] with
    k' = min(topk, T). When the blocks number <= m it is exactly the flat indexer. ``pooled``: from
    :func:`pool_keys` (computed here when None), or (means, None) with maintained means (:class:`PooledKeys`).
    Stage 2 gathers whole blocks ([m, B, D] rows of the block view; token rows of k when it has none) and
    scores them with the flat indexer's own formula."""
    t = k.shape[0]
    n_blocks = math.ceil(t / block)
    if n_blocks <= m:
        return flat_topk(q, w, k, visible, topk, scale)
    means, blocks_k = pooled if pooled is not None else pool_keys(k, block)
    if blocks_k is None:  # maintained means only: stage 2 gathers tokens from k (blocks zero-padded view absent)
        blocks_k = k
    top_blocks = block_scores(q, w, means, visible, block, scale).topk(m, dim=-1).indices  # [S, m]
    n_pad = n_blocks * block - t
    vis_p = torch.nn.functional.pad(visible, (0, n_pad))
    offs = torch.arange(block, device=k.device)
    n_pick = min(topk, t, m * block)
    if q.shape[0] == 1:  # decode: one query, one gather
        return _stage2(q, w, blocks_k, top_blocks, vis_p, offs, n_pick, scale, n_pad)
    out = [_stage2(q[s0 : s0 + chunk], w[s0 : s0 + chunk], blocks_k, top_blocks[s0 : s0 + chunk],
                   vis_p[s0 : s0 + chunk], offs, n_pick, scale, n_pad) for s0 in range(0, q.shape[0], chunk)]
    return torch.cat(out)


def _stage2(q, w, blocks_k, blocks, vis_p, offs, n_pick: int, scale: float, n_pad: int) -> torch.Tensor:
    """Token top-``n_pick`` inside each query's blocks [s, m] -> [s, n_pick] token indices (``n_pad``: zero
    padding at the end of the last block)."""
    s_len, m = blocks.shape
    tok = (blocks[..., None] * offs.shape[0] + offs).flatten(1)  # [s, m*B]
    if blocks_k.dim() == 2:  # token rows of k [T, D]: padding slots read row T - 1 (masked below)
        t = blocks_k.shape[0]
        keys = blocks_k.index_select(0, tok.clamp(max=t - 1).view(-1)).view(s_len, tok.shape[1], -1)
        keys = keys[0] if s_len == 1 else keys
    elif s_len == 1:
        keys = blocks_k.index_select(0, blocks[0]).flatten(0, 1)  # [m*B, D]
    else:
        keys = blocks_k[blocks].flatten(1, 2)  # [s, m*B, D]
    sc = indexer_scores(q, w, keys, scale).masked_fill(~torch.gather(vis_p, 1, tok), NEG)
    # a query that sees fewer than n_pick candidates also picks -inf slots; those in the zero padding of the
    # last block (>= T) are clamped to T - 1 so every index is a real (masked) key, as the flat top-k's are
    return torch.gather(tok, 1, sc.topk(n_pick, dim=-1).indices).clamp_(max=vis_p.shape[1] - 1 - n_pad)


def selection_iou(a: torch.Tensor, b: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """Per-query IoU of two index sets [S, k] restricted to visible keys [S, T] -> [S]."""
    sa = torch.zeros_like(visible).scatter_(1, a.long(), True) & visible
    sb = torch.zeros_like(visible).scatter_(1, b.long(), True) & visible
    union = (sa | sb).sum(-1).clamp(min=1)
    return (sa & sb).sum(-1) / union


# Grouped scores run as a compiled kernel on contiguous CPU float32 keys when numba is installed (a dependency
# of the package); TOKENSIEVE_NUMBA=0 forces torch.matmul, which other devices and dtypes always use.
USE_NUMBA = os.environ.get("TOKENSIEVE_NUMBA", "1") != "0"


def _numba_kernel():
    if not USE_NUMBA:
        return None
    try:
        from . import _score_numba
    except ImportError:
        return None
    return _score_numba


def group_scores(keys: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """s[j, a, i] = fp[j, a] . keys[j, i] -> [H_kv, g, n] float32, for keys [H_kv, n, d] and fp [H_kv, g, d].

    Same values as ``torch.matmul`` up to float summation order (the compiled kernel reads each key once)."""
    kernel = _numba_kernel()
    ok = keys.device.type == "cpu" and keys.dtype == torch.float32 and keys.shape[1] > 0
    if kernel is None or not ok or not all(keys[j].is_contiguous() for j in range(keys.shape[0])):
        return torch.matmul(keys, fp.to(keys.dtype).transpose(-1, -2)).float().transpose(-1, -2)
    n_kv, g, d = fp.shape
    g4 = -(-g // 4) * 4
    f = torch.zeros(n_kv, g4, d, dtype=torch.float32)
    f[:, :g] = fp
    out = torch.empty(n_kv, g4, keys.shape[1], dtype=torch.float32)
    jobs = [(keys[j].numpy(), f[j].numpy(), out[j].numpy()) for j in range(n_kv)]
    threads = min(torch.get_num_threads(), n_kv)
    if threads > 1:  # the kernel releases the GIL: one KV head per task, as many workers as torch threads
        list(_pool(threads).map(lambda a: kernel.scores_rows(*a), jobs))
    else:
        for a in jobs:
            kernel.scores_rows(*a)
    return out[:, :g]


def head_scores(buf: torch.Tensor, n: int, q: torch.Tensor) -> torch.Tensor:
    """s[h, i] = q[h] . buf[h, i] for i < n -> [H, n] float32; buf [H, cap, D] (a growable per-slot buffer,
    rows >= n unused), q [H, D]. Same values as a batched mat-vec up to float summation order."""
    kernel = _numba_kernel()
    if kernel is None or buf.device.type != "cpu" or buf.dtype != torch.float32 or not buf.is_contiguous():
        return torch.matmul(buf[:, :n], q.to(buf.dtype)[:, :, None])[..., 0].float()
    out = torch.empty(buf.shape[0], n, dtype=torch.float32)
    kernel.scores_heads(buf.numpy(), n, q.float().contiguous().numpy(), out.numpy())
    return out


_POOLS: dict[int, ThreadPoolExecutor] = {}


def _pool(threads: int) -> ThreadPoolExecutor:
    if threads not in _POOLS:
        _POOLS[threads] = ThreadPoolExecutor(threads, thread_name_prefix="tokensieve-kv")
    return _POOLS[threads]

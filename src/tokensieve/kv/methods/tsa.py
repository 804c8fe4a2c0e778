"""Token Sparse Attention (Jo, Kang, Song, Kim; arXiv 2602.03216, ICML 2026), prefill only.

In each sparse layer (chosen by the drift profile), per forward pass without a past, with L keys:
A[h, t] = mean over the last W queries of softmax(q . k_t / sqrt(d)) for prefix keys t < L - W, then
avg_pool1d(A, ``pool``, pad = pool // 2); s_h = A_h / Σ A_h, global s = mean_h A / Σ; dynamic coverage: sort s
ascending, n_sparse = #{cumulative mass < tau} + 1; L' - W = max(min_tokens, (L - W) - n_sparse), shared by all
heads; S_h = topk(s_h, L' - W) ∪ last W, ascending. Q, K and V rows at S_h are gathered ([H, L', d]), causal
attention runs on the compact tensors (equal to causal attention restricted to S_h × S_h, since indices are
ascending and RoPE was applied at the original positions) and is scattered back into zeros [H, L, d]:
unselected (token, head) pairs get a zero attention update. Decode is dense; the cache keeps every K/V.

``keep`` is the floor ``min_tokens`` on L' - W (TSA's budget is dynamic, set by ``tau``). Dense when
L <= keep + W or tau == 0. Sparse layers: ``layers="drift"`` (default) profiles R_l = E_t ||h_{l+1} - h_l|| /
||h_l|| on ``calib_len`` deterministic random tokens and keeps layers with R_l <= the ``delta``-quantile;
``"upper_half"`` is the code's fallback for unknown models; or an explicit list.

Differences from the official code (dongwonjo/Token-Sparse-Attention @ 17b64cb): fp32 torch instead of the
Triton scorer (same quantity); ``.item()`` batch-1 limit lifted (per sample); drift profiled on random tokens
instead of a 128K Paul Graham needle prompt.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F

from .base import Call, KVMethod, KVMethodError, Piece


@dataclass
class TSA(KVMethod):
    """tau: pruned low-importance mass (Llama 0.005); window: W (128); pool: kernel (7); delta: drift quantile."""

    name: ClassVar[str] = "tsa"
    fidelity: ClassVar[str] = "code's selection (window, pool, coverage, min_tokens, equal L'); fp32 torch"
    tau: float = 0.005
    window: int = 128
    pool: int = 7
    delta: float = 0.5
    layers: str | list[int] = "drift"
    seed: int = 0
    calib_len: int = 256
    sparse_layers: list[int] = field(default_factory=list, repr=False)

    def validate(self, info, keep) -> None:
        if not isinstance(keep, int):
            raise KVMethodError("tsa: keep is the min_tokens floor of its dynamic budget; pass an int")
        if self.tau < 0 or self.window < 1 or self.pool < 1 or self.pool % 2 == 0:
            raise KVMethodError("tsa: tau >= 0, window >= 1 and an odd pool kernel are required")
        if isinstance(self.layers, str) and self.layers not in ("drift", "upper_half"):
            raise KVMethodError(f"tsa: layers={self.layers!r}; use 'drift', 'upper_half' or a list of indices")

    @torch.no_grad()
    def prepare(self, model, info, keep) -> None:
        if isinstance(self.layers, list):
            self.sparse_layers = sorted(self.layers)
        elif self.layers == "upper_half":
            self.sparse_layers = list(range(info.n_layers // 2, info.n_layers))
        elif not self.sparse_layers:
            rng = random.Random(self.seed)
            x = torch.tensor([[rng.randrange(1, model.config.vocab_size) for _ in range(self.calib_len)]])
            hs = model(x, output_hidden_states=True).hidden_states
            drift = torch.stack([((hs[i + 1] - hs[i]).norm(dim=-1) / hs[i].norm(dim=-1)).mean()
                                 for i in range(len(hs) - 1)])
            self.extra["drift"] = drift.tolist()
            self.sparse_layers = torch.nonzero(drift <= drift.quantile(self.delta)).view(-1).tolist()

    def is_dense(self, n: int, keep: int, phase: str, layer: int) -> bool:
        return phase != "prefill" or layer not in self.sparse_layers or self.tau == 0 or n <= keep + self.window

    def select(self, call: Call) -> torch.Tensor:
        """S_h: [H, L'] ascending token indices."""
        n, w = call.n, self.window
        n_heads, n_kv = call.q.shape[1], call.k.shape[1]
        k = call.k[0].float().repeat_interleave(n_heads // n_kv, dim=0)
        logits = torch.matmul(call.q[0, :, n - w :].float(), k.transpose(-1, -2)) * call.scaling  # [H, W, L]
        causal = torch.arange(n)[None, :] <= torch.arange(n - w, n)[:, None]
        att = torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1).mean(1)[:, : n - w]  # [H, L-W]
        att = F.avg_pool1d(att[:, None], self.pool, 1, self.pool // 2)[:, 0]
        s_head = att / att.sum(-1, keepdim=True)
        s_all = att.mean(0) / att.mean(0).sum()
        n_sparse = int((s_all.sort().values.cumsum(0) < self.tau).sum()) + 1
        n_keep = max(call.keep, (n - w) - n_sparse)
        top = s_head.topk(min(n_keep, n - w), dim=-1).indices
        recent = torch.arange(n - w, n).expand(n_heads, w)
        call.stats[f"tsa_kept_frac_l{call.layer}"] = (top.shape[1] + w) / n
        return torch.cat([top, recent], dim=1).sort(-1).values

    def plan(self, call: Call) -> list[Piece]:
        return [Piece(0, call.q.shape[2], idx=self.select(call), compact=True)]

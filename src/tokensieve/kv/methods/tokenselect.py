"""TokenSelect (Wu, Pan et al., arXiv 2411.02886, EMNLP 2025): dynamic token-level KV selection.

Per layer and per query chunk (decode: the current query; prefill: chunks of ``chunk_size`` queries):
fingerprint q̄ = mean of the chunk's queries [H, d]; per-head scores s_h = q̄_h . k_{kv(h)} over the candidates
[n_init, N - n_local) (no 1/sqrt(d)); soft vote v = Σ_h softmax(s_h); I = sort(topk(v, keep - n_init - n_local))
+ n_init; every head of the layer attends [0, n_init) ∪ I ∪ [N - n_local, N), causally. Dense when
keep >= N. Selection Cache (Alg. 1): if cos(q̄, C_Q) >= theta, reuse C_I.

Shapes: q [1, H, q, d], k [1, H_kv, N, d] -> Piece idx [1, n_init + topk + n_local] per chunk.

``keep`` is the number of KV tokens each query attends (the issue's vocabulary): the official
"k = 2048 + n_init 128 + n_local 512" is ``keep=2688``.

Differences from the official code (pzs19/TokenSelect @ 8e1e97f), all options:
- ``head_map="mod"`` (default) is the code's kv(h) = h mod H_kv; ``"div"`` is HF's h // g.
- ``score_rope="fixed_distance"`` (default) is the code's QUERY_ROTATE: pre-RoPE keys against queries
  rotated at positions n_local + i; ``"absolute"`` scores post-RoPE q.k; ``"unrotated"`` pre-RoPE both.
- Scores in fp32 by default; ``score_dtype="bfloat16"`` keeps the scoring keys in bf16 as the code does
  (half the bytes read per decode step).
- ``theta=None`` (default) is the release's QUERY_CACHE=False; ``theta=0.9`` is the paper's Selection Cache,
  written from Alg. 1 (the release's branch is broken). On a hit, cached indices that now fall inside the
  local window are masked so no key is attended twice.
- ``positions="compact"`` (default) is the code's attention: keys are cached pre-RoPE and FlashInfer
  (``ROPE_LLAMA``) rotates the key at list index j by R(j) and query i of a chunk of c by R(L - c + i), L the
  list length (decode: the query at L - 1, its own key's slot). HF caches post-RoPE keys, so the selected keys
  and the queries are re-rotated R(new) R(-old) in fp32 with the model's own rotary module (the code uses
  FlashInfer's plain RoPE formula; identical for unscaled RoPE such as Llama-3-8B's and Qwen2's). Causality
  stays by cache position: identical to the code's list-index causality when chunk_size <= n_local (the
  official 512 / 512); with a larger chunk the code would let early queries of a chunk see later keys, which
  is not reproduced. Masked Selection Cache slots take no position. ``positions="original"`` attends at the
  original positions (exact inside the training length). Dense calls (keep >= N) always run the model's own
  attention, where both coincide.
- ``kernel_size`` > 0 reproduces the code's optional max-pool smoothing, including its one-index shift for
  even sizes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..attend import gather_kv
from ..families import rope_cos_sin
from ..ops import group_scores
from ..rope import rerotate, rotate, unrotate
from ._keys import grown, prerope_keys
from .base import Call, KVMethod, KVMethodError, Piece


@dataclass
class TokenSelect(KVMethod):
    name: ClassVar[str] = "tokenselect"
    fidelity: ClassVar[str] = ("official code defaults (head_map mod, fixed-distance RoPE scoring, compacted attention "
                               "positions)")
    n_init: int = 128
    n_local: int = 512
    chunk_size: int = 512
    head_map: str = "mod"
    score_rope: str = "fixed_distance"
    theta: float | None = None
    kernel_size: int = -1
    score_dtype: str = "float32"
    positions: str = "compact"

    def validate(self, info, keep) -> None:
        if self.positions not in ("compact", "original"):
            raise KVMethodError(f"tokenselect: positions={self.positions!r}; use 'compact' (official) or 'original'")
        if self.positions == "compact" and not info.has_rope:
            raise KVMethodError("tokenselect: positions='compact' re-applies RoPE; this model has none, use 'original'")
        if self.score_dtype not in ("float32", "bfloat16", "float16"):
            raise KVMethodError(f"tokenselect: score_dtype={self.score_dtype!r}; use float32, bfloat16 or float16")
        if self.head_map not in ("mod", "div"):
            raise KVMethodError(f"tokenselect: head_map={self.head_map!r}; use 'mod' (official) or 'div' (HF)")
        if self.score_rope not in ("fixed_distance", "absolute", "unrotated"):
            raise KVMethodError(
                f"tokenselect: score_rope={self.score_rope!r}; use 'fixed_distance', 'absolute' or 'unrotated'"
            )
        if self.score_rope != "absolute" and not info.has_rope:
            raise KVMethodError("tokenselect: this model has no RoPE; use score_rope='absolute'")
        if min(self.n_init, self.n_local) < 0 or self.chunk_size < 1:
            raise KVMethodError("tokenselect: n_init, n_local must be >= 0 and chunk_size >= 1")
        if isinstance(keep, int) and keep <= self.n_init + self.n_local:
            raise KVMethodError(
                f"tokenselect: keep={keep} attended tokens leaves no top-k after n_init={self.n_init} sinks "
                f"and n_local={self.n_local} local tokens; pass keep > {self.n_init + self.n_local}"
            )

    def plan(self, call: Call) -> list[Piece]:
        topk = call.keep - self.n_init - self.n_local
        if topk < 1:
            raise KVMethodError(f"tokenselect: keep={call.keep} leaves no top-k; raise keep or lower n_init/n_local")
        n_q = call.q.shape[2]
        step = 1 if call.phase == "decode" else self.chunk_size
        pieces = []
        for s in range(0, n_q, step):
            e = min(s + step, n_q)
            n_c = int(call.q_pos[e - 1]) + 1
            if call.keep >= n_c:
                pieces.append(Piece(s, e))
            else:
                pieces.append(self._select(call, s, e, n_c, topk))
        return pieces

    def _fingerprint(self, call: Call, s: int, e: int) -> torch.Tensor:
        q = call.q[0, :, s:e].float()  # [H, c, d]
        if self.score_rope == "absolute":
            return q.mean(dim=1)
        cos, sin = rope_cos_sin(call.model, call.q_rope[s:e], q)
        q = unrotate(q, cos, sin)
        if self.score_rope == "fixed_distance":
            at = torch.arange(self.n_local, self.n_local + (e - s), device=q.device)
            cos, sin = rope_cos_sin(call.model, at, q)
            q = rotate(q, cos, sin)
        return q.mean(dim=1)

    def _keys(self, call: Call, lo: int, hi: int) -> torch.Tensor:
        dtype = getattr(torch, self.score_dtype)
        if self.score_rope == "absolute":
            if call.k.dtype == dtype:
                return call.k[0, :, lo:hi]
            # converted once per new cache entry, not the whole cache every step
            return grown(call, f"abs_k_{dtype}", lambda m, n: call.k[0, :, m:n].to(dtype))[:, lo:hi]
        return prerope_keys(call, dtype)[:, lo:hi]

    def vote(self, fp: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """Soft vote [n_cand] from fingerprint [H, d] and candidate keys [H_kv, n_cand, d]."""
        n_heads, n_kv = fp.shape[0], keys.shape[0]
        g = n_heads // n_kv
        if self.head_map == "div":
            grouped = fp.view(n_kv, g, -1)  # head h = j * g + i reads kv j
        else:
            grouped = fp.view(g, n_kv, -1).transpose(0, 1)  # head h = i * H_kv + j reads kv j
        scores = group_scores(keys, grouped)  # [H_kv, g, n_cand] fp32; softmax along the last axis of it
        votes = torch.softmax(scores, dim=-1).sum(dim=(0, 1))
        if self.kernel_size > 0:
            votes = F.max_pool1d(votes[None], self.kernel_size, 1, (self.kernel_size - 1) // 2)[0]
        return votes

    def _select(self, call: Call, s: int, e: int, n_c: int, topk: int) -> Piece:
        fp = self._fingerprint(call, s, e)
        hi = n_c - self.n_local
        chosen = self._cached(call, fp)
        if chosen is None:
            votes = self.vote(fp, self._keys(call, self.n_init, hi))
            chosen = votes.topk(topk).indices.sort().values + self.n_init
            if self.theta is not None:
                call.state[("ts_cache", call.slot)] = (fp.flatten(), chosen)
        dev = chosen.device
        idx = torch.cat([torch.arange(self.n_init, device=dev), chosen, torch.arange(hi, n_c, device=dev)])
        valid = torch.ones_like(idx, dtype=torch.bool)
        valid[self.n_init : self.n_init + topk] = chosen < hi
        piece = Piece(s, e, idx=idx.view(1, -1), valid=valid.view(1, -1))
        if self.positions == "compact":
            piece.q, piece.k = self._compact(call, s, e, idx, valid)
        return piece

    def _compact(self, call: Call, s: int, e: int, idx: torch.Tensor, valid: torch.Tensor):
        """The official attention positions (FlashInfer ``ROPE_LLAMA`` on the gathered list): key slot j at its
        index among the attended slots, query i of the chunk at L - c + i (L attended slots, c queries; for
        c <= n_local that is the index of its own key). -> (q [1, H, c, d], k [1, H_kv, |idx|, d])."""
        pos = torch.cumsum(valid.long(), 0) - 1  # masked slots repeat a neighbour's position (never attended)
        n_att = int(pos[-1]) + 1
        k = rerotate(call.model, gather_kv(call.k, idx.view(1, -1), call.q.shape[1])[0], call.k_rope[idx], pos)
        q_new = torch.arange(n_att - (e - s), n_att, device=idx.device)
        q = rerotate(call.model, call.q[0, :, s:e], call.q_rope[s:e], q_new)
        return q[None], k[None]

    def _cached(self, call: Call, fp: torch.Tensor) -> torch.Tensor | None:
        """Algorithm 1: the cached indices when cos(q̄, C_Q) >= theta, else None (then the caller recomputes)."""
        if self.theta is None:
            return None
        call.stats["ts_lookups"] = call.stats.get("ts_lookups", 0) + 1
        hit = call.state.get(("ts_cache", call.slot))
        if hit is None or F.cosine_similarity(fp.flatten(), hit[0], dim=0) < self.theta:
            return None
        call.stats["ts_hits"] = call.stats.get("ts_hits", 0) + 1
        return hit[1]

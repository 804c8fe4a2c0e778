"""FASA: Frequency-aware Sparse Attention (Wang et al., arXiv 2602.03152, ICLR 2026), FASA-C.

RoPE splits q.k into d/2 two-dimensional frequency chunks (FCs). Offline, each head's dominant FCs are found
by contextual agreement (CA) of the partial-logit top-k with the full-logit top-k (``tokensieve.kv.fasa_calib``,
the ``kv-calibrate-fasa`` command writes ``fasa_<pairing>.pt`` beside the model). At each decode step, on
layers 1..L-1 (layer 0 dense; prefill dense), the token-importance predictor scores
s_h = q_h[D_h] . K_{h // g}[:, D_h] (no scaling, no forced sinks; the current token is a candidate), each query
head keeps its own top-``keep`` and attends those full K/V rows. Shapes: idx [H, keep] per decode step.

FC pairing: ``"adjacent"`` = dims (2f, 2f+1) as in the official code; ``"rotate_half"`` = dims (f, f + d/2),
HF's RoPE rotation planes and the paper's object (default here: HF models use rotate_half; the code's
adjacent chunks are pairs of half-planes of neighbouring frequencies). ``dims``: a calibration file path, or
None for the deterministic path (calibrate on ``calib_seqs`` random-token sequences with seed ``seed`` at the
first use; identical across runs).

Differences from the official code: keys are not stored a second time after repeat_kv (HF's h // g mapping
reads the shared KV head); the calibration queries are the last ``calib_queries`` positions of teacher-forced
sequences instead of generated decode steps; CA is measured at budget ``min(keep, n)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..ops import head_scores
from ._keys import grown
from .base import Call, KVMethod, KVMethodError, Piece


def fc_dims(fc: torch.Tensor, head_dim: int, pairing: str) -> torch.Tensor:
    """FC indices [..., F] -> their dimensions [..., 2F]."""
    if pairing == "adjacent":
        return torch.stack([2 * fc, 2 * fc + 1], dim=-1).flatten(-2)
    return torch.cat([fc, fc + head_dim // 2], dim=-1)


@dataclass
class FASA(KVMethod):
    """n_fc: dominant FCs per head (code: min_k = max_k = 16 of 64)."""

    name: ClassVar[str] = "fasa"
    fidelity: ClassVar[str] = "FASA-C decode selection; rotate_half pairing default (code: adjacent)"
    n_fc: int = 16
    pairing: str = "rotate_half"
    dims: str | None = None
    seed: int = 0
    calib_seqs: int = 2
    calib_len: int = 512
    calib_queries: int = 16

    def validate(self, info, keep) -> None:
        if not info.has_rope:
            raise KVMethodError("fasa needs a RoPE model (its frequency chunks are RoPE planes); this model has none")
        if self.pairing not in ("adjacent", "rotate_half"):
            raise KVMethodError(f"fasa: pairing={self.pairing!r}; use 'adjacent' (code) or 'rotate_half' (paper/HF)")
        if not 1 <= self.n_fc <= info.head_dim // 2:
            raise KVMethodError(f"fasa: n_fc={self.n_fc} must lie in 1..{info.head_dim // 2} (head_dim / 2)")

    def is_dense(self, n: int, keep: int, phase: str, layer: int) -> bool:
        return phase != "decode" or layer == 0 or keep >= n

    def prepare(self, model, info, keep) -> None:
        """Load the calibration file, or run the deterministic calibration once per method object."""
        if "table" in self.extra:
            return
        from ..fasa_calib import calibrate, load_calibration

        if self.dims is not None:
            cal = load_calibration(self.dims)
        else:
            budget = keep if isinstance(keep, int) else 256
            cal = calibrate(model, pairing=self.pairing, budget=budget, n_seqs=self.calib_seqs,
                            length=self.calib_len, n_queries=self.calib_queries, seed=self.seed)
        if cal["pairing"] != self.pairing:
            raise KVMethodError(f"fasa: calibration file is for pairing {cal['pairing']!r}, not {self.pairing!r}")
        fc = cal["ca"].topk(self.n_fc, dim=-1).indices.sort(-1).values  # [L, H, n_fc]
        self.extra["table"] = fc_dims(fc, info.head_dim, self.pairing)
        self.extra["ca"] = cal["ca"]

    def plan(self, call: Call) -> list[Piece]:
        dims = self.extra["table"][call.layer].to(call.q.device)  # [H, 2F]
        g = call.q.shape[1] // call.k.shape[1]
        q = torch.gather(call.q[0, :, 0].float(), 1, dims)  # [H, 2F]

        def rows(m: int, n: int) -> torch.Tensor:  # dominant-dim keys per query head, kept incrementally
            k = call.k[0, :, m:n].float().repeat_interleave(g, dim=0)
            return torch.gather(k, 2, dims[:, None, :].expand(-1, n - m, -1))

        grown(call, "fasa_k", rows)  # [H, n, 2F], kept incrementally
        scores = head_scores(call.state[("fasa_k", call.slot)][0], call.n, q)  # [H, n]
        return [Piece(0, 1, idx=scores.topk(min(call.keep, call.n), dim=-1).indices)]

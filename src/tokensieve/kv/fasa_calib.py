"""FASA offline calibration: contextual agreement (CA) of every (layer, head, frequency chunk).

CA[l, h, f] = mean over queries of |TopK(q.k) ∩ TopK(q_f.k_f)| / K, with K = min(budget, visible keys),
computed on the last ``n_queries`` positions of each calibration sequence (teacher-forced decode steps), on
q/k after RoPE (HF's h // g mapping). ``write_calibration`` saves ``fasa_<pairing>.pt`` (a few KB).
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

from .methods.base import Call, KVMethod, Piece


class _CaptureCA(KVMethod):
    """Internal: accumulates CA sums at every layer while attending densely."""

    name = "_fasa_capture"

    def __init__(self, pairing: str, budget: int, n_queries: int) -> None:
        super().__init__()
        self.pairing, self.budget, self.n_queries = pairing, budget, n_queries
        self.sums: dict[int, torch.Tensor] = {}
        self.counts: dict[int, int] = {}

    def is_dense(self, n: int, keep: int, phase: str, layer: int) -> bool:
        return False

    def plan(self, call: Call) -> list[Piece]:
        from .methods.fasa import fc_dims

        n_heads, n_kv, d = call.q.shape[1], call.k.shape[1], call.q.shape[-1]
        q = call.q[0, :, -self.n_queries :].float()  # [H, Q, d]
        k = call.k[0].float().repeat_interleave(n_heads // n_kv, dim=0)  # [H, n, d]
        qpos = call.q_pos[-self.n_queries :]
        causal = torch.arange(call.n)[None, :] <= qpos[:, None]  # [Q, n]
        kk = min(self.budget, int(qpos.min()) + 1)
        full = torch.matmul(q, k.transpose(-1, -2)).masked_fill(~causal, float("-inf"))
        top_full = torch.zeros_like(full, dtype=torch.bool).scatter_(-1, full.topk(kk, -1).indices, True)
        ca = torch.zeros(n_heads, d // 2)
        for f in range(d // 2):
            dd = fc_dims(torch.tensor([f]), d, self.pairing)
            part = torch.matmul(q[..., dd], k[..., dd].transpose(-1, -2)).masked_fill(~causal, float("-inf"))
            top = torch.zeros_like(top_full).scatter_(-1, part.topk(kk, -1).indices, True)
            ca[:, f] = (top & top_full).sum(-1).float().mean(-1) / kk
        self.sums[call.layer] = self.sums.get(call.layer, 0) + ca
        self.counts[call.layer] = self.counts.get(call.layer, 0) + 1
        return [Piece(0, call.q.shape[2])]


@torch.no_grad()
def calibrate(model, *, pairing: str = "rotate_half", budget: int = 256, sequences: list[list[int]] | None = None,
              n_seqs: int = 2, length: int = 512, n_queries: int = 16, seed: int = 0) -> dict:
    """CA table {"pairing", "budget", "ca": [L, H, d/2]}; random-token sequences from ``seed`` when none given."""
    from .sieve import KVSieve

    if sequences is None:
        rng = random.Random(seed)
        vocab = model.config.vocab_size
        sequences = [[rng.randrange(1, vocab) for _ in range(length)] for _ in range(n_seqs)]
    cap = _CaptureCA(pairing, budget, n_queries)
    with KVSieve(model, cap, keep=budget):
        for seq in sequences:
            model(torch.tensor([seq]))
    ca = torch.stack([cap.sums[layer] / cap.counts[layer] for layer in sorted(cap.sums)])
    return {"pairing": pairing, "budget": budget, "ca": ca}


def write_calibration(model, model_dir: str | Path, **kw) -> Path:
    cal = calibrate(model, **kw)
    path = Path(model_dir) / f"fasa_{cal['pairing']}.pt"
    torch.save(cal, path)
    return path


def load_calibration(path: str | Path) -> dict:
    return torch.load(Path(path), weights_only=True)

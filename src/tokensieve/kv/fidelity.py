"""Selection fidelity of one call's last query (kv-bench): attention-output error vs dense, recall of the exact
per-head top-k of the same size, and the dense attention mass the selection captures."""

from __future__ import annotations

import torch

from .methods.base import Call, Piece
from .methods.oracle import head_logits


def selected_mask(call: Call, piece: Piece) -> torch.Tensor:
    """[H, n] bool: keys the last query attends, per head."""
    n_heads, n, last = call.q.shape[1], call.n, int(call.q_pos[-1])
    keys = torch.arange(n, device=call.q.device)
    if piece.idx is None:
        sel = (keys <= last).expand(n_heads, n).clone()
        if piece.mask is not None:
            sel &= piece.mask[:, -1].expand(n_heads, n)
        return sel
    idx = piece.idx
    ok = (idx >= 0) & (idx <= last)
    if piece.valid is not None:
        ok &= piece.valid
    sel = torch.zeros(idx.shape[0], n, dtype=torch.bool, device=idx.device)
    sel.scatter_(1, idx.clamp(min=0), ok)
    return sel.expand(n_heads, n) if idx.shape[0] == 1 else sel


def accumulate(stats: dict, call: Call, piece: Piece, out: torch.Tensor, dense: torch.Tensor) -> None:
    """out: [H, d] method output of the last query; dense: [H, d] the model's own output."""
    sel = selected_mask(call, piece)
    logits = head_logits(call)[:, -1]  # [H, n]
    causal = torch.arange(call.n) <= int(call.q_pos[-1])
    logits = logits.masked_fill(~causal, float("-inf"))
    prob = torch.softmax(logits, -1)
    k = sel.sum(-1)
    recall = []
    for h in range(sel.shape[0]):
        top = logits[h].topk(int(k[h])).indices
        recall.append(sel[h, top].float().mean())
    err = (out.float() - dense.float()).norm(dim=-1) / dense.float().norm(dim=-1).clamp(min=1e-12)
    tag = "decode" if call.phase == "decode" else "prefill"
    for name, value in (("err", err.mean()), ("recall", torch.stack(recall).mean()),
                        ("mass", (prob * sel).sum(-1).mean())):
        stats[f"fid_{tag}_{name}_sum"] = stats.get(f"fid_{tag}_{name}_sum", 0.0) + float(value)
    stats[f"fid_{tag}_n"] = stats.get(f"fid_{tag}_n", 0) + 1


def summary(stats: dict) -> dict:
    """Means over the selecting calls of decode steps (else of prefills: TSA selects only there). A method that
    attended densely everywhere reports error 0, recall 1, mass 1 with ``fid_phase`` "dense"."""
    for tag in ("decode", "prefill"):
        n = stats.get(f"fid_{tag}_n", 0)
        if n:
            return {"attn_err": stats[f"fid_{tag}_err_sum"] / n, "topk_recall": stats[f"fid_{tag}_recall_sum"] / n,
                    "mass": stats[f"fid_{tag}_mass_sum"] / n, "fid_phase": tag}
    return {"attn_err": 0.0, "topk_recall": 1.0, "mass": 1.0, "fid_phase": "dense"}

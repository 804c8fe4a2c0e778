"""DART: keep the tokens least duplicated with a few pivot tokens, chosen by key norm, at decoder layer K."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..context import LLMContext
from .base import LLMMethod, MethodError, register


@register
@dataclass
class DART(LLMMethod):
    """DART, "Stop Looking for Important Tokens in Multimodal Language Models: Duplication Matters More"
    (Wen et al., EMNLP 2025, arXiv 2502.11494).

    Stage ``llm`` at ``layer`` K (default 2). Signals: keys of layer K-1 after RoPE ([H_kv, L, d], captured by
    the framework), the hidden states [n, D] of the image and [t, D] of the text at the input of layer K
    (= output of layer K-1), passed through the decoder's final norm as the official code does.

    1. Pivots: the ``pivot_image_tokens`` image tokens and ``pivot_text_tokens`` text tokens after the image
       (the instruction) with the largest L1 norm of their layer-(K-1) key, flattened over kv heads.
    2. For each pivot in turn (image pivots first, then text pivots), the ``per_pivot`` remaining image tokens
       with the **lowest** cosine similarity to it on ``norm(hidden)`` are kept and leave the candidate set.
    3. Kept = image pivots and the selections; text pivots are never dropped (text is not pruned).

    Budget: with ``k`` the count from ``keep`` and ``P`` the pivots found, the official rule is
    ``per_pivot = k // P`` (``TOKEN_TOPK``), so ``image pivots + P * (k // P)`` tokens are kept: ``k + 4`` at
    the paper's 64/128/192 (e.g. 68 at 64). Set ``exact_budget=True`` to keep exactly ``k``: the pivots count
    towards ``k`` and the ``k - image pivots`` selections are spread over the pivots (the first ``rem`` pivots
    take one more). Ties in similarity go to the lower index (deterministic).

    Positions: ``original`` (``position_ids = keep_indexs``; the sliced 3-D M-RoPE ids on Qwen).

    Differences from the official code (VTC-Bench ``external/DART/.../modeling_llama_self.py``): the pivots
    are found per image among that image's tokens and the text after it, not by fixed offsets of a single
    image; if the instruction has fewer than ``pivot_text_tokens`` tokens, fewer text pivots are used and
    ``P`` shrinks accordingly.
    """

    keep: float | int = 0.1112
    layer: int = 2
    pivot_image_tokens: int = 4
    pivot_text_tokens: int = 4
    exact_budget: bool = False

    name = "dart"
    needs = frozenset({"hidden", "attention"})
    paper = "Stop Looking for Important Tokens in Multimodal Language Models: Duplication Matters More (DART)"
    arxiv = "2502.11494"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.pivot_image_tokens < 1 or self.pivot_text_tokens < 0:
            raise MethodError("dart: pivot_image_tokens must be >= 1 and pivot_text_tokens >= 0")

    def select(self, ctx: LLMContext, k: int) -> torch.Tensor:
        cap = ctx.capture()
        if cap.keys is None:
            raise RuntimeError("dart needs the keys of layer K-1: declare 'attention' in needs")
        keys = cap.keys.permute(1, 0, 2).flatten(1)  # [L, H_kv * d]
        key_l1 = keys.float().abs().sum(-1)
        n = ctx.n

        image_l1 = key_l1[ctx.image_rows()]
        n_image_pivots = min(self.pivot_image_tokens, n, k)
        image_pivots = torch.sort(image_l1, descending=True, stable=True).indices[:n_image_pivots]

        instruction = ctx.text_after_image
        text_l1 = key_l1[cap.rows(ctx.text_cols[instruction])] if bool(instruction.any()) else key_l1[:0]
        n_text_pivots = min(self.pivot_text_tokens, int(text_l1.numel()))
        text_pivots = torch.sort(text_l1, descending=True, stable=True).indices[:n_text_pivots]

        def normed(x: torch.Tensor) -> torch.Tensor:
            x = ctx.norm(x) if ctx.norm is not None else x
            x = x.float()
            return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-8)

        image = normed(ctx.hidden)  # [n, D]
        pivot_vectors = torch.cat([image[image_pivots], normed(ctx.text_hidden[instruction])[text_pivots]])

        n_pivots = pivot_vectors.shape[0]
        if self.exact_budget:
            rest = max(0, k - n_image_pivots)
            per_pivot = [rest // n_pivots + (1 if i < rest % n_pivots else 0) for i in range(n_pivots)]
        else:
            per_pivot = [k // n_pivots] * n_pivots

        remaining = torch.ones(n, dtype=torch.bool, device=image.device)
        remaining[image_pivots] = False
        chosen = [image_pivots]
        sims = pivot_vectors @ image.T  # [P, n]
        for p in range(n_pivots):
            take = min(per_pivot[p], int(remaining.sum()))
            if take == 0:
                continue
            sim = sims[p].masked_fill(~remaining, float("inf"))
            pick = torch.sort(sim, stable=True).indices[:take]
            remaining[pick] = False
            chosen.append(pick)
        return torch.cat(chosen)

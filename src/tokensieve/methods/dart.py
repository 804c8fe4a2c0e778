"""DART: keep the tokens least duplicated with a few pivot tokens, chosen by key norm, at decoder layer K."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..context import LLMContext
from ._layers import llm_layer
from .base import LLMMethod, MethodError, register


def sequence_index(cap, cols: torch.Tensor) -> list[int]:
    """Index of each column in its sample's own sequence (the valid rows of the capture's layout, in order):
    what the official batch-1, unpadded code calls a token's position. Padding and batch position drop out."""
    rows = cap.rows(cols)
    rank = torch.cumsum(cap.valid.long(), 0) - 1
    return rank[rows].tolist()


@register
@dataclass
class DART(LLMMethod):
    """DART, "Stop Looking for Important Tokens in Multimodal Language Models: Duplication Matters More"
    (Wen et al., EMNLP 2025, arXiv 2502.11494).

    Stage ``llm`` at ``layer`` K (default: the official K=2 of a 32-layer LLM scaled with depth,
    ``max(1, round(2 * n_layers / 32))``, :mod:`tokensieve.methods._layers`). Signals: keys of layer K-1 after
    RoPE ([H_kv, L, d], captured by the framework), the hidden states [n, D] of the image and [t, D] of the
    text at the input of layer K (= output of layer K-1), passed through the decoder's final norm as the
    official code does.

    1. Pivots: the ``pivot_image_tokens`` image tokens and ``pivot_text_tokens`` text tokens after the image
       (the instruction) with the largest L1 norm of their layer-(K-1) key, flattened over kv heads
       (``torch.topk``).
    2. The pivots are visited in the order of ``list(set(image_indices + query_indices))``, as the official
       code does, where the indices are the tokens' positions in their own sequence (CPython's set order of
       small ints: by value modulo the table size, so mostly ascending). That order decides which pivot
       claims a token two pivots both want. For each pivot, the ``TOKEN_TOPK`` remaining image tokens with the
       **lowest** cosine similarity to it on ``norm(hidden)`` (``torch.topk`` of ``-cos`` over the remaining
       tokens in the set order of their indices) are kept and leave the candidates.
    3. Kept = image pivots and the selections; text pivots are never dropped (text is not pruned).

    Budget (``k`` the count from ``keep``, floor rounding): ``TOKEN_TOPK = k // (pivot_image_tokens +
    pivot_text_tokens)`` as in the official ``math.ceil(max_num_trunction // 8)``, so ``image pivots + 8 *
    (k // 8)`` tokens are kept: ``k + 4`` at the paper's 64/128/192 (e.g. 68 at 64). ``exact_budget=True``
    keeps exactly ``k``: the pivots count towards ``k`` and the ``k - image pivots`` selections are spread
    over the pivots (the first ``rem`` pivots visited take one more).

    Positions: ``original`` (``position_ids = keep_indexs``; the sliced 3-D M-RoPE ids on Qwen).

    Differences from the official code (VTC-Bench ``external/DART/llava/model/language_model/
    modeling_llama_self.py``, ``get_retained_image_token``): it runs batch 1 on one image at fixed offsets;
    here pivots are found per image among that image's tokens and the text after it, and a token's index is
    its place in its own unpadded sequence, so padding and batch position never change the picks. When the
    instruction has fewer than ``pivot_text_tokens`` tokens (the official ``topk`` would fail) fewer text
    pivots are used; a pivot asks for at most the tokens that remain.
    """

    keep: float | int = 0.1112
    layer: int | None = None  # None: the official K=2 scaled with depth
    pivot_image_tokens: int = 4
    pivot_text_tokens: int = 4
    exact_budget: bool = False

    name = "dart"
    needs = frozenset({"hidden", "attention"})
    paper = "Stop Looking for Important Tokens in Multimodal Language Models: Duplication Matters More (DART)"
    arxiv = "2502.11494"
    fidelity = (
        "faithful (per image; indices within the sample's own sequence; keys rotated at positions counted from "
        "the sample's first real token, so left padding never changes the picks)"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.pivot_image_tokens < 1 or self.pivot_text_tokens < 0:
            raise MethodError("dart: pivot_image_tokens must be >= 1 and pivot_text_tokens >= 0")

    def llm_layers(self, n_layers: int) -> list[int]:
        return [llm_layer(self.layer, 2, n_layers, name="dart: layer")]

    def per_pivot(self, k: int, n_pivots: int, n_image_pivots: int) -> list[int]:
        """Tokens each pivot claims, in visiting order."""
        if not self.exact_budget:
            return [k // (self.pivot_image_tokens + self.pivot_text_tokens)] * n_pivots
        rest = max(0, k - n_image_pivots)
        return [rest // n_pivots + (1 if i < rest % n_pivots else 0) for i in range(n_pivots)]

    def select(self, ctx: LLMContext, k: int) -> torch.Tensor:
        cap = ctx.capture()
        if cap.keys is None:
            raise RuntimeError("dart needs the keys of layer K-1: declare 'attention' in needs")
        key_l1 = torch.norm(cap.keys.permute(1, 0, 2).flatten(1), p=1, dim=-1)  # [L]
        instruction = ctx.text_cols[ctx.text_after_image]
        image_pos = sequence_index(cap, ctx.image_cols)  # [n] positions in the sample's own sequence
        text_pos = sequence_index(cap, instruction) if instruction.numel() else []

        n_img = min(self.pivot_image_tokens, ctx.n, k)
        image_pivots = [image_pos[i] for i in key_l1[ctx.image_rows()].topk(n_img).indices.tolist()]
        n_txt = min(self.pivot_text_tokens, len(text_pos))
        text_l1 = key_l1[cap.rows(instruction)] if n_txt else key_l1[:0]
        query_pivots = [text_pos[i] for i in text_l1.topk(n_txt).indices.tolist()]

        # Normed states by sequence index: the image's candidates and the instruction tokens.
        states = ctx.norm(ctx.hidden) if ctx.norm is not None else ctx.hidden
        text_states = ctx.text_hidden[ctx.text_after_image]
        text_states = ctx.norm(text_states) if ctx.norm is not None else text_states
        vector = {p: states[i] for i, p in enumerate(image_pos)}
        vector.update({p: text_states[i] for i, p in enumerate(text_pos)})

        kept = set(image_pivots + query_pivots)
        valid = set(image_pos) - set(image_pivots)
        valid_list = list(valid)
        order = list(kept)  # the official visiting order
        for item, take in zip(order, self.per_pivot(k, len(order), n_img), strict=True):
            take = min(take, len(valid_list))
            if take == 0:
                continue
            candidates = torch.stack([vector[p] for p in valid_list])
            sims = -F.cosine_similarity(vector[item], candidates, dim=-1)
            picked = [valid_list[i] for i in sims.topk(take).indices.tolist()]
            kept.update(picked)
            valid.difference_update(picked)
            valid_list = list(valid)
        kept.difference_update(query_pivots)
        where = {p: i for i, p in enumerate(image_pos)}
        return torch.tensor(sorted(where[p] for p in kept), dtype=torch.long, device=ctx.hidden.device)

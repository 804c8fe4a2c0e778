"""FlowCut: information-flow-guided pruning (scores accumulated across vision layers, entropy-adaptive schedule)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..budget import split_budget
from ..context import ImageContext
from ..ops import attention_rows, topk_indices
from ._vision import Crop, crops_of, feature_layer, require_vision
from .base import Method, MethodError, register


def flow_score(ctx: ImageContext, layer: int, crop: Crop, alive: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Information-flow score [a] of the ``alive`` local candidates at one layer, and their CLS attention [a].

    Attention is recomputed over CLS + the alive patches only, so that tokens pruned at earlier layers no
    longer compete in the softmax (as they would be absent from the official pruned forward).
    """
    rows = torch.cat([torch.zeros(1, dtype=torch.long, device=crop.rows.device), crop.rows[alive]])  # CLS first
    q = ctx.vision.queries[layer][crop.crop][:, rows[:1]]  # [H, 1, d]
    k = ctx.vision.keys[layer][crop.crop][:, rows]  # [H, 1 + a, d]
    v = ctx.vision.values[layer][crop.crop][:, rows].float()  # [H, 1 + a, d]
    cls_attn = attention_rows(q[None], k[None])[0, :, 0].mean(0)[1:]  # head mean, CLS row, patches
    # Semantic flow: softmax over tokens of the (unscaled) CLS value . token value, per head, then head mean.
    sem = torch.softmax(torch.einsum("hd,htd->ht", v[:, 0], v), dim=-1).mean(0)[1:]
    v_norm = v.mean(0)[1:].abs().sum(-1)  # L1 norm of the head-averaged values
    score = (cls_attn / cls_attn.sum() + sem / sem.sum()) * v_norm
    return score, cls_attn


def mean_query_flow_score(
    ctx: ImageContext, layer: int, crop: Crop, alive: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen path (no CLS): flow score [a] of the ``alive`` local candidate *tokens* at one layer, and their
    relation attention [a] (its entropy drives the schedule).

    As the official FlowCut-Qwen ViT stage, the mean query ``q_bar`` (per head, over the alive patches) stands in
    for CLS: ``relation = mean_h softmax(q_bar . k / sqrt(d))`` over the alive patches, ``score = relation *
    ||mean_h v||_1`` (no semantic term, no normalisation). The official code scores and prunes single patches;
    here a token's score and relation are the sums over its merge group of patches (pruning whole LLM tokens)."""
    rows = ctx.vision.patch_rows(crop.rows[alive])  # [a, merge^2]
    flat = rows.flatten()
    q = ctx.vision.queries[layer][crop.crop][:, flat].float()  # [H, a * merge^2, d]
    k = ctx.vision.keys[layer][crop.crop][:, flat]
    v = ctx.vision.values[layer][crop.crop][:, flat].float()
    q_bar = q.mean(1, keepdim=True)  # [H, 1, d]
    relation = attention_rows(q_bar[None], k[None])[0, :, 0].mean(0)  # [a * merge^2]
    score = relation * v.mean(0).abs().sum(-1)
    return score.view(rows.shape).sum(1), relation.view(rows.shape).sum(1)


def adaptive_prune_count(cls_attn: torch.Tensor, remaining_layers: int, target: int) -> int:
    """Tokens to prune at this layer: ``(N - target) / sqrt(rpl) * (1 - (H(p) / log N)^2)``, p = normalised CLS
    attention over the N alive patches. A flat (high-entropy) CLS attention prunes less."""
    n = cls_attn.numel()
    if n <= 1:
        return 0
    p = cls_attn / cls_attn.sum()
    h = -(p * torch.log(p.clamp_min(1e-30))).sum()
    ratio = float(h) / math.log(n)
    return int(round((n - target) / math.sqrt(remaining_layers) * (1.0 - ratio**2)))


@register
@dataclass
class FlowCut(Method):
    """FlowCut (NeurIPS 2025, arXiv 2505.19536): information-flow-aware pruning inside the vision encoder.

    Stage ``vision``; signals: queries/keys/values (``[H, T, d]`` per crop, T = 1 + patches, row 0 = CLS) of
    every vision layer ``0 .. F-1``, where ``F`` is ``vision_feature_layer`` made non-negative (default -2,
    the layer LLaVA reads; official ``select_layer = n_layers - 2``).

    Per layer ``idx`` with ``rpl = F - idx - 1`` remaining prunable layers, over the currently alive patches:

    - ``cls_attn`` = head-mean CLS attention row, ``sem`` = head-mean of ``softmax_t(v_cls . v_t)`` (unscaled,
      softmax over CLS + alive tokens, then the patches), ``score = (cls_attn/sum + sem/sum) * ||mean_h v||_1``;
    - cumulative score ``S <- 0.5 S + 0.5 score`` (``S = score`` at the first layer);
    - when ``rpl`` is even: prune ``r = (N - k) / sqrt(rpl) * (1 - (H(cls_attn)/log N)^2)`` tokens (entropy-adaptive),
      never below ``k``; at ``rpl = 0`` prune straight to ``k``. Keep the top of ``S``.

    Budget ``k`` patches; the official keeps CLS inside the vision tower with an internal target ``k + 1`` and then
    drops it at the projector, so the ``k`` patches match. LLaVA-NeXT: per crop, ``k`` split evenly (capped by
    each crop's candidates after unpadding), ``image_newline`` tokens kept **on top of** the budget. Kept tokens in
    original order, ``reindex`` positions (contiguous, as the official LLaVA-1.5 code).

    Qwen2-VL / Qwen2.5-VL (official ``FlowCut_Qwen``, written for Qwen2-VL): no CLS, so the mean query ``q_bar``
    over the alive patches is the CLS surrogate (``mean_query_flow_score``): ``relation = mean_h softmax(q_bar .
    k)``, ``score = relation * ||mean_h v||_1`` (the official Qwen ViT score has no semantic term and no
    normalisation). Layers: every block, ``rpl = depth - idx - 1`` (the merger reads the last block, which the
    official schedule also scores). The schedule runs on whole LLM tokens (a token's score and relation sum over
    its 2x2 merge group) with target ``k`` tokens; the official prunes single patches to ``4 * 2k`` patches, then
    merges whatever 4 consecutive patches survive and trims to ``k`` at LLM layer 1, none of which the framework
    can reproduce. Attention is full attention over the frame's patches (Qwen2.5-VL's window blocks included).

    **Fidelity: an approximation.** The official FlowCut prunes progressively **inside** the vision tower: tokens
    pruned at layer ``idx`` are absent from every later layer, which changes the later layers' q/k/v, hidden states
    and therefore the projected features of the kept tokens. This framework decides after the encoder, so the
    schedule runs on the signals of the **unpruned** pass (only the softmaxes are restricted to the alive tokens)
    and the kept tokens carry their unpruned features. A faithful port needs a ``vision@L`` stage that drops rows
    between ViT layers. Also not reproduced: the official second stage at LLM layer 1 on LLaVA-NeXT / Qwen2-VL
    (the ViT there keeps 2x the target and the LLM layer trims it), and FlowCut-Qwen's first-K positions.

    ``layer``: ``None`` is the family's official schedule (CLIP: blocks ``0 .. n-3``, F = n - 2; Qwen: every
    block). An explicit ``layer`` scores blocks ``0 .. F-1`` with ``F = feature_layer(layer)`` on both families.
    With ``None`` the capture plan cannot know the family yet, so every block is captured.
    """

    layer: int | None = None  # vision_feature_layer; None: -2 on CLIP, every block on Qwen (official schedules)

    name = "flowcut"
    stage = "vision"
    needs = frozenset({"vision_qk"})
    paper = "FlowCut: Rethinking Redundancy via Information Flow for Efficient Vision-Language Models (NeurIPS 2025)"
    arxiv = "2505.19536"
    fidelity = (
        "APPROXIMATION: official prunes progressively inside the ViT (later layers never see pruned tokens); here "
        "the score schedule runs on the unpruned pass after the encoder (needs a vision@L stage to be faithful); "
        "no LLM-layer-1 second stage on NeXT/Qwen; Qwen: mean-query CLS surrogate (as official FlowCut-Qwen) on "
        "whole merge groups, not single patches"
    )

    def _layers(self, n_layers: int, has_cls: bool, projector_layer: int | None = None) -> list[int]:
        if self.layer is None and not has_cls:
            return list(range(n_layers))  # Qwen: the merger reads the last block, and it is scored too
        if self.layer is not None:
            last = feature_layer(self.layer, n_layers)
        else:  # the layer the projector reads (-2 on LLaVA-1.5/NeXT); blocks before it are scored
            last = projector_layer if projector_layer is not None else feature_layer(-2, n_layers)
        if last == 0:
            raise MethodError("flowcut: the feature layer must be >= 1 so that at least one layer scores tokens")
        return list(range(last))

    def vision_layers(self, n_vision_layers: int) -> list[int]:
        if self.layer is not None:
            return self._layers(n_vision_layers, True)
        # the family is unknown when the capture is planned: Qwen's schedule (every block) covers CLIP's
        return self._layers(n_vision_layers, False)

    def select(self, ctx: ImageContext, k: int) -> torch.Tensor:
        require_vision(ctx, self.name)
        layers = self._layers(ctx.vision.n_layers, ctx.vision.has_cls, ctx.vision.feature_layer)
        score_fn = flow_score if ctx.vision.has_cls else mean_query_flow_score
        final = len(layers)  # F: rpl = F - idx - 1
        crops, extra = crops_of(ctx)
        keep = [extra]
        for crop, k_c in zip(crops, split_budget(k, [c.cand.numel() for c in crops]), strict=True):
            if k_c == 0:
                continue
            alive = torch.arange(crop.cand.numel(), device=crop.cand.device)  # local indices
            cum: torch.Tensor | None = None
            for idx in layers:
                if alive.numel() <= k_c:
                    break
                score, cls_attn = score_fn(ctx, idx, crop, alive)
                cum = score if cum is None else 0.5 * cum + 0.5 * score
                rpl = final - idx - 1
                if rpl % 2:
                    continue
                prune = adaptive_prune_count(cls_attn, rpl, k_c) if rpl else alive.numel()
                target = max(alive.numel() - prune, k_c)
                order = topk_indices(cum, target)  # ascending, so alive stays in original order
                alive, cum = alive[order], cum[order]
            keep.append(crop.cand[alive])
        return torch.cat(keep)

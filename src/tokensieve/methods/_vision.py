"""Per-crop helpers shared by the vision-stage methods (VisionZip, HiPrune, FlowCut, TCC)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..context import ImageContext
from ..ops import attention_rows
from ._layers import normalize_layer
from .base import MethodError


@dataclass
class Crop:
    """The prunable candidates of one crop: ``cand`` [m] indices into the context, ``rows`` [m] their rows in the
    crop's vision tensors (``ctx.vision_patch_index``), ``crop`` the index into the per-crop vision lists."""

    crop: int
    cand: torch.Tensor
    rows: torch.Tensor


def require_vision(ctx: ImageContext, method: str) -> None:
    """Fail clearly when the family gave no vision-tower signals (q/k per layer and the token -> patch map)."""
    if ctx.vision is None or ctx.vision_patch_index is None:
        raise MethodError(
            f"{method} reads vision-tower attention, which the {ctx.family or 'this'} adapter did not capture; "
            f"use a projector-stage method (e.g. divprune) on this family."
        )


def crops_of(ctx: ImageContext) -> tuple[list[Crop], torch.Tensor]:
    """Prunable candidates grouped by crop (``ctx.groups``) and the always-kept ones (NeXT newlines)."""
    keep_always = torch.nonzero(ctx.always_keep).flatten()
    prunable = ~ctx.always_keep
    crops = []
    for g in torch.unique(ctx.groups[prunable]).tolist():
        cand = torch.nonzero(prunable & (ctx.groups == g)).flatten()
        crops.append(Crop(crop=int(g), cand=cand, rows=ctx.vision_patch_index[cand]))
    return crops, keep_always


def cls_attention(ctx: ImageContext, layer: int, crop: Crop, heads: str = "sum") -> torch.Tensor:
    """[CLS] attention [m] (row 0 of the softmax over all of the crop's tokens) to the crop's candidates."""
    q, k = ctx.vision.queries[layer][crop.crop], ctx.vision.keys[layer][crop.crop]  # [H, T, d]
    probs = attention_rows(q[None, :, :1], k[None])[0, :, 0]  # [H, T]; one query row, never the T x T map
    probs = probs.sum(0) if heads == "sum" else probs.mean(0)
    return probs[crop.rows]


def merged_received_attention(ctx: ImageContext, layer: int, crop: Crop, chunk: int = 1024) -> torch.Tensor:
    """Attention [m] received by each candidate LLM token of a tower without [CLS] (Qwen2-VL / Qwen2.5-VL).

    Full attention over the frame's patches (Qwen2.5-VL's window blocks included: recomputed over all patches, as
    HiPrune's official flash-attention path does), head mean, **summed** over all queries, then averaged over the
    token's merge group of patches. Queries go in chunks: never the P x P map."""
    q, k = ctx.vision.queries[layer][crop.crop], ctx.vision.keys[layer][crop.crop]  # [H, P, d], no CLS
    received = None
    for start in range(0, q.shape[1], chunk):
        part = attention_rows(q[None, :, start : start + chunk], k[None])[0].mean(0).sum(0)  # [P]
        received = part if received is None else received + part
    return received[ctx.vision.patch_rows(crop.rows)].mean(1)


def importance(ctx: ImageContext, layer: int, crop: Crop, heads: str = "sum") -> torch.Tensor:
    """Text-agnostic importance [m] of the crop's candidates: [CLS] attention where the tower has a [CLS]
    (CLIP), else the attention each token receives (:func:`merged_received_attention`; ``heads`` does not apply)."""
    if ctx.vision.has_cls:
        return cls_attention(ctx, layer, crop, heads)
    return merged_received_attention(ctx, layer, crop)


def scoring_layer(layer: int | None, ctx: ImageContext) -> int:
    """A method's vision layer: the given one, or by default the layer whose output the projector reads
    (``vision_feature_layer``: -2 on LLaVA-1.5/NeXT, the last block on Qwen), which the sieve always captures."""
    if layer is None:
        if ctx.vision.feature_layer is not None:
            return ctx.vision.feature_layer
        layer = -2 if ctx.vision.has_cls else -1  # LLaVA-1.5/NeXT and Qwen defaults
    return feature_layer(layer, ctx.vision.n_layers)


def feature_layer(layer: int, n_layers: int) -> int:
    """A non-negative vision layer index from LLaVA's ``vision_feature_layer`` convention (-2: second to last)."""
    return normalize_layer(layer, n_layers, name="vision layer")

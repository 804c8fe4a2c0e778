"""VisionZip: dominant tokens by [CLS] attention plus contextual tokens merged by key similarity.

Also home of the small per-crop helpers the other vision-stage methods (``hiprune``, ``flowcut``, ``tcc``) share.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..budget import split_budget
from ..context import ImageContext, Selection
from ..ops import attention_rows, topk_indices
from .base import Method, MethodError, register

# ----- shared helpers of the vision-stage methods ---------------------------------------------------------------


@dataclass
class Crop:
    """The prunable candidates of one crop: ``cand`` [m] indices into the context, ``rows`` [m] their rows in the
    crop's vision tensors (``ctx.vision_patch_index``), ``crop`` the index into the per-crop vision lists."""

    crop: int
    cand: torch.Tensor
    rows: torch.Tensor


def require_vision(ctx: ImageContext, method: str, needs_cls: bool = True) -> None:
    """Fail clearly when the family gave no vision-tower signals, or no [CLS] token to a method that reads one.

    Qwen2-VL / Qwen2.5-VL are captured (``has_cls=False``): methods with an official Qwen path (HiPrune, FlowCut)
    pass ``needs_cls=False``; VisionZip and TCC score by [CLS] attention, and no surrogate is implemented."""
    if ctx.vision is None or ctx.vision_patch_index is None:
        raise MethodError(
            f"{method} reads vision-tower attention, which the {ctx.family or 'this'} adapter did not capture; "
            f"use a projector-stage method (e.g. divprune) on this family."
        )
    if needs_cls and not ctx.vision.has_cls:
        raise MethodError(
            f"{method} scores tokens by [CLS] attention and the {ctx.family} vision tower has no [CLS] token "
            f"(no CLS surrogate is implemented for {method}); use hiprune or flowcut (which have a Qwen path) or a "
            f"projector-stage method (e.g. divprune) on this family."
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
    index = layer if layer >= 0 else n_layers + layer
    if not 0 <= index < n_layers:
        raise MethodError(f"vision layer {layer} is outside the tower's {n_layers} layers")
    return index


# ----- VisionZip ------------------------------------------------------------------------------------------------


@register
@dataclass
class VisionZip(Method):
    """VisionZip (Yang et al., CVPR 2025, arXiv 2412.04467): dominant plus contextual tokens at the vision output.

    Stage ``vision``; signals: queries/keys of vision layer ``layer`` (``[H, T, d]`` per crop, T = 1 + patches),
    its output hidden states ``[T, d_v]`` (the projector input on LLaVA) and the projector ``M``.

    Per crop (LLaVA-1.5: the one image; LLaVA-NeXT: every anyres crop, base image included, as the official code):

    1. [CLS] attention of layer ``layer`` (``vision_feature_layer``, default -2, the layer LLaVA reads), softmax
       row of CLS recomputed from the captured q/k and **summed** over heads. Dominant = top-``D`` patches.
    2. The other patches, in original order; ``C`` targets at a uniform stride
       (``step = max(1, n_rem // C)``, ``targets = arange(0, n_rem, step)[:C]``). Every non-target is assigned to
       its most cosine-similar target on the head-averaged keys of the same layer.
    3. Contextual token = ``target_hidden + mean(assigned hiddens)`` (target **plus** the cluster mean, an empty
       cluster adds nothing), in the pre-projector space, then projected with ``ctx.project`` and written into the
       target's slot (``Selection.replace_at/replace_with``). Kept tokens stay in original order, ``reindex``
       positions (contiguous, as the official code).

    Budget: ``k`` patches per image; ``C = round(k * contextual_ratio)``, ``D = k - C``. The official pairs
    (D, C) = (54, 10) / (108, 20) / (162, 30) are a 27:5 split, so ``contextual_ratio = 5/32`` reproduces
    ``C`` = 10/20/30 at k = 64/128/192. On LLaVA-NeXT ``k`` is split evenly over the crops (capped by each
    crop's candidates after unpadding; official: a fixed (D, C) per crop), and the ``image_newline`` tokens
    (``ctx.always_keep``) are kept **on top of** the budget.

    Differences from the official code:

    - The official code feeds the vision [CLS] token as one extra LLM token inside ``D`` (``topk(D - 1)`` patches
      + CLS). We cannot add tokens to the placeholder sequence, so the CLS slot goes to one more dominant patch.
    - Attention is recomputed from the captured q/k (float32) instead of an eager CLIP forward; same values up to
      rounding, and the model runs under SDPA.
    - Qwen2-VL / Qwen2.5-VL: not supported. The ViT is captured, but it has no [CLS] token and the paper and
      official code define no substitute; rather than invent one (e.g. a mean-query surrogate) ``select`` raises
      ``MethodError`` naming the reason at the first forward. Use ``hiprune`` / ``flowcut`` or a projector-stage
      method (e.g. ``divprune``) there.
    """

    contextual_ratio: float = 5 / 32
    layer: int | None = None  # vision layer (LLaVA convention, e.g. -2); None: the layer the projector reads

    name = "visionzip"
    stage = "vision"
    requires_cls = True
    needs = frozenset({"vision_qk", "vision_hidden", "projector"})
    paper = "VisionZip: Longer is Better but Not Necessary in Vision Language Models (CVPR 2025)"
    arxiv = "2412.04467"
    fidelity = (
        "official CLS-token slot given to one more dominant patch (tokens cannot be added); "
        "otherwise follows dvlab-research/VisionZip"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.contextual_ratio < 1.0:
            raise MethodError(f"visionzip: contextual_ratio={self.contextual_ratio} must lie in [0, 1)")

    def vision_layers(self, n_vision_layers: int) -> list[int]:
        return [] if self.layer is None else [feature_layer(self.layer, n_vision_layers)]

    def select(self, ctx: ImageContext, k: int) -> Selection:
        require_vision(ctx, self.name)
        layer = scoring_layer(self.layer, ctx)
        crops, extra = crops_of(ctx)
        shares = split_budget(k, [c.cand.numel() for c in crops])
        keep, at, merged = [extra], [], []
        for crop, k_c in zip(crops, shares, strict=True):
            if k_c == 0:
                continue
            n_ctx = int(round(k_c * self.contextual_ratio))
            n_dom = k_c - n_ctx
            score = cls_attention(ctx, layer, crop, heads="sum")
            dom = topk_indices(score, n_dom)  # local indices into crop.cand
            keep.append(crop.cand[dom])
            if n_ctx == 0:
                continue
            rest = torch.ones(crop.cand.numel(), dtype=torch.bool, device=score.device)
            rest[dom] = False
            rest = torch.nonzero(rest).flatten()
            step = max(1, rest.numel() // n_ctx)
            tgt = torch.arange(0, rest.numel(), step, device=rest.device)[:n_ctx]
            is_tgt = torch.zeros(rest.numel(), dtype=torch.bool, device=rest.device)
            is_tgt[tgt] = True
            rows = crop.rows[rest]
            key = ctx.vision.keys[layer][crop.crop][:, rows].float().mean(0)  # [n_rem, d] head-averaged keys
            key = key / key.norm(dim=-1, keepdim=True).clamp_min(1e-8)
            hid = ctx.vision.hidden[layer][crop.crop][rows].float()  # [n_rem, d_v]
            others = torch.nonzero(~is_tgt).flatten()
            assign = (key[others] @ key[tgt].T).argmax(1)  # each other token -> its most similar target
            sums = torch.zeros(tgt.numel(), hid.shape[1], dtype=hid.dtype, device=hid.device)
            sums.index_add_(0, assign, hid[others])
            counts = torch.bincount(assign, minlength=tgt.numel()).clamp(min=1).to(hid.dtype)
            contextual = hid[tgt] + sums / counts[:, None]
            keep.append(crop.cand[rest[tgt]])
            at.append(crop.cand[rest[tgt]])
            merged.append(ctx.project(contextual.to(ctx.vision.hidden[layer][crop.crop].dtype)))
        keep_t = torch.cat(keep)
        if not at:
            return Selection(keep=keep_t)
        return Selection(keep=keep_t, replace_at=torch.cat(at), replace_with=torch.cat(merged))

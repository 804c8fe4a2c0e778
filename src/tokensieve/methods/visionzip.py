"""VisionZip: dominant tokens by [CLS] attention plus contextual tokens merged by key similarity."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..budget import split_budget
from ..context import ImageContext, Selection
from ..ops import topk_indices
from ._vision import crops_of, feature_layer, importance, require_vision, scoring_layer
from .base import Method, MethodError, register

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
    - Qwen2-VL / Qwen2.5-VL (**our extension; no official Qwen path**): the ViT has no [CLS] token, so the
      dominant score is the attention each LLM token *receives* at the layer the merger reads (head mean, summed
      over all queries, averaged over the token's 2x2 merge group; the same score as HiPrune's official Qwen
      path, :func:`merged_received_attention`). The contextual merge works on whole merge units: keys and hidden
      states of a token are its four patches side by side, so ``target + mean(assigned)`` is formed on the
      merger's own input and projected by the merger. Positions follow the Qwen policy (``original``).
    """

    contextual_ratio: float = 5 / 32
    layer: int | None = None  # vision layer (LLaVA convention, e.g. -2); None: the layer the projector reads

    name = "visionzip"
    stage = "vision"
    needs = frozenset({"vision_qk", "vision_hidden", "projector"})
    paper = "VisionZip: Longer is Better but Not Necessary in Vision Language Models (CVPR 2025)"
    arxiv = "2412.04467"
    fidelity = (
        "official CLS-token slot given to one more dominant patch (tokens cannot be added); "
        "otherwise follows dvlab-research/VisionZip; Qwen: received attention replaces CLS (our extension)"
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
            score = importance(ctx, layer, crop, heads="sum")
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
            # One row per LLM token: its patches' vectors side by side (one patch on CLIP, a 2x2 group on Qwen,
            # the layout the merger reads).
            rows = ctx.vision.patch_rows(crop.rows[rest])  # [n_rem, merge^2]
            key = ctx.vision.keys[layer][crop.crop][:, rows].float().mean(0).flatten(1)  # head-averaged keys
            key = key / key.norm(dim=-1, keepdim=True).clamp_min(1e-8)
            hidden = ctx.vision.hidden[layer][crop.crop]
            hid = hidden[rows].float().flatten(1)  # [n_rem, merge^2 * d_v], the projector input
            others = torch.nonzero(~is_tgt).flatten()
            assign = (key[others] @ key[tgt].T).argmax(1)  # each other token -> its most similar target
            sums = torch.zeros(tgt.numel(), hid.shape[1], dtype=hid.dtype, device=hid.device)
            sums.index_add_(0, assign, hid[others])
            counts = torch.bincount(assign, minlength=tgt.numel()).clamp(min=1).to(hid.dtype)
            contextual = hid[tgt] + sums / counts[:, None]
            keep.append(crop.cand[rest[tgt]])
            at.append(crop.cand[rest[tgt]])
            merged.append(ctx.project(contextual.to(hidden.dtype)))
        keep_t = torch.cat(keep)
        if not at:
            return Selection(keep=keep_t)
        return Selection(keep=keep_t, replace_at=torch.cat(at), replace_with=torch.cat(merged))

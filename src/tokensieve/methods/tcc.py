"""Token-level Correlation-guided Compression: per-crop information density sets the budget, CLS attention picks."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..budget import split_budget
from ..context import ImageContext
from ..ops import cosine_similarity_matrix, topk_indices
from ._vision import Crop, crops_of, feature_layer, importance, require_vision, scoring_layer
from .base import Method, MethodError, register


def redundancy(ctx: ImageContext, layer: int, crop: Crop, threshold: float) -> float:
    """Fraction of the crop's candidates whose key has another candidate's key with cosine >= ``threshold``."""
    if crop.cand.numel() < 2:
        return 0.0
    rows = ctx.vision.patch_rows(crop.rows)  # [m, merge^2]: one patch on CLIP, a 2x2 group on Qwen
    keys = ctx.vision.keys[layer][crop.crop][:, rows]  # [H, m, merge^2, d]
    flat = keys.permute(1, 2, 0, 3).reshape(crop.rows.numel(), -1)  # all heads (and patches) concatenated
    sim = cosine_similarity_matrix(flat)
    sim.fill_diagonal_(-2.0)  # a token is not its own counterpart
    return float((sim.amax(1) >= threshold).float().mean())


@register
@dataclass
class TCC(Method):
    """Token-level Correlation-guided Compression (Zhang et al., arXiv 2407.14439; code not released).

    Stage ``vision``; signals: queries/keys (``[H, T, d]`` per crop, row 0 = CLS) of vision layer ``layer``
    (default -2, LLaVA's ``vision_feature_layer``).

    1. Information density per crop (``ctx.groups``; LLaVA-NeXT anyres crops, the single image on LLaVA-1.5):
       cosine similarity between the crop's patch keys (all heads concatenated, i.e. the ``k_proj`` output);
       redundancy ``r`` = fraction of patches with a counterpart of similarity ``>= similarity_threshold``;
       density ``1 - r``.
    2. Adaptive budget: the ``k`` patches are shared among crops in proportion to ``density * n_crop``
       (information amount), with a floor ``min_density`` so a fully redundant crop keeps a little; shares are
       capped by each crop's candidates and the excess goes to the others (they sum to ``k``).
    3. Sampling within each crop: the top ``k_c`` patches by [CLS] attention (head mean, recomputed from q/k).
    4. Kept tokens in original order, ``reindex`` positions. LLaVA-NeXT ``image_newline`` tokens are kept **on top
       of** the budget. On LLaVA-1.5 (one crop) step 2 is moot and the method reduces to CLS-attention top-k.

    Guesses (the paper's code is unreleased and its thresholds were not recoverable), each a field:

    - the similarity is computed on the keys of layer -2 (the paper says ViT keys, not which layer);
    - ``similarity_threshold = 0.9`` and "has a highly similar counterpart" = its nearest other key;
    - budget proportional to ``density * n_crop`` (the paper maps density to a per-sub-image keep ratio; we
      rescale so the image total is ``k``, the framework's budget), ``min_density = 0.05``;
    - "CLS-attention-guided sampling" is deterministic top-k by CLS attention, head mean.

    Designed for cropping document MLLMs (mPLUG-DocOwl1.5); here applied to LLaVA-NeXT crops. Qwen2-VL /
    Qwen2.5-VL (**our extension**): one crop per image (Qwen does not crop), so step 2 is moot as on LLaVA-1.5;
    the tower has no [CLS] token, so step 3 ranks tokens by the attention they *receive* (head mean, summed over
    all queries, averaged over the 2x2 merge group: :func:`merged_received_attention`), and a token's key in
    step 1 is its four patches' keys side by side.
    """

    similarity_threshold: float = 0.9
    min_density: float = 0.05
    layer: int | None = None  # None: the layer the projector reads

    name = "tcc"
    stage = "vision"
    needs = frozenset({"vision_qk"})
    paper = "Token-level Correlation-guided Compression for Efficient Multimodal Document Understanding"
    arxiv = "2407.14439"
    fidelity = (
        "code not released: layer, similarity threshold, budget rule and top-k sampling are documented guesses; "
        "Qwen: received attention replaces CLS (our extension)"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not -1.0 <= self.similarity_threshold <= 1.0:
            raise MethodError(f"tcc: similarity_threshold={self.similarity_threshold} must lie in [-1, 1]")
        if not 0.0 <= self.min_density <= 1.0:
            raise MethodError(f"tcc: min_density={self.min_density} must lie in [0, 1]")

    def vision_layers(self, n_vision_layers: int) -> list[int]:
        return [] if self.layer is None else [feature_layer(self.layer, n_vision_layers)]

    def densities(self, ctx: ImageContext, crops: list[Crop]) -> list[float]:
        layer = scoring_layer(self.layer, ctx)
        return [max(self.min_density, 1.0 - redundancy(ctx, layer, c, self.similarity_threshold)) for c in crops]

    def select(self, ctx: ImageContext, k: int) -> torch.Tensor:
        require_vision(ctx, self.name)
        layer = scoring_layer(self.layer, ctx)
        crops, extra = crops_of(ctx)
        sizes = [c.cand.numel() for c in crops]
        weights = [d * n for d, n in zip(self.densities(ctx, crops), sizes, strict=True)]
        keep = [extra]
        for crop, k_c in zip(crops, split_budget(k, sizes, weights), strict=True):
            if k_c:
                keep.append(crop.cand[topk_indices(importance(ctx, layer, crop, heads="mean"), k_c)])
        return torch.cat(keep)

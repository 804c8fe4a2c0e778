"""HiPrune: hierarchical attention in the vision encoder (anchors, spatial buffers, registers)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..budget import resolve_keep, split_budget
from ..context import ImageContext
from ..ops import attention_rows, topk_indices
from ._vision import Crop, crops_of, feature_layer, merged_received_attention, require_vision
from .base import Method, MethodError, register


def global_attention(ctx: ImageContext, layer: int, crop: Crop) -> torch.Tensor:
    """Attention [m] received by each candidate: head mean, mean over **all** queries (CLS included)."""
    q, k = ctx.vision.queries[layer][crop.crop], ctx.vision.keys[layer][crop.crop]  # [H, T, d]
    received = attention_rows(q[None], k[None])[0].mean(0).mean(0)  # [T]
    return received[crop.rows]


def grid_neighbours(grid_rc: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """Local indices of the 4-neighbours (up, down, left, right) of ``anchors`` among the rows of ``grid_rc``
    [m, 2]; no wrap-around across rows, absent cells (pruned, unpadded) are skipped."""
    if anchors.numel() == 0:
        return anchors
    a = grid_rc[anchors]  # [a, 2]
    offsets = torch.tensor([[-1, 0], [1, 0], [0, -1], [0, 1]], device=grid_rc.device)
    cells = (a[:, None, :] + offsets[None]).reshape(-1, 2)  # [4a, 2]
    match = (grid_rc[None, :, :] == cells[:, None, :]).all(-1)  # [4a, m]
    return torch.unique(torch.nonzero(match)[:, 1])


def flat_neighbours(grid_rc: torch.Tensor, grid_hw: tuple[int, int], anchors: torch.Tensor) -> torch.Tensor:
    """Local indices of the official buffers of ``anchors``: ``anchor +- 1`` and ``anchor +- W`` on the
    flattened ``H x W`` crop grid, clamped to ``[0, H * W - 1]`` (so ``+- 1`` wraps across rows and the clamp
    piles onto the first and last cell), kept where that cell is a present candidate."""
    if anchors.numel() == 0:
        return anchors
    h, w = grid_hw
    flat = grid_rc[:, 0] * w + grid_rc[:, 1]  # [m]
    a = flat[anchors]
    cells = torch.cat([a - 1, a + 1, a - w, a + w]).clamp(0, h * w - 1)
    return torch.nonzero(torch.isin(flat, cells)).flatten()


@register
@dataclass
class HiPrune(Method):
    """HiPrune (arXiv 2508.00553): training-free pruning from hierarchical attention inside the vision encoder.

    Stage ``vision``; signals: queries/keys (``[H, T, d]`` per crop) of two vision layers, attention recomputed
    from them. Per crop (LLaVA-1.5: the image; LLaVA-NeXT: each anyres crop, the budget split evenly and capped
    by each crop's candidates after unpadding; ``image_newline`` tokens are kept **on top of** the budget):

    1. Global attention received by each patch at a layer: head mean, then mean over **all** queries
       (CLS included; this is not CLS attention).
    2. Anchors: ``topk(global attention at the object layer, round(k * alpha / 5))`` (``torch.topk``, Python
       ``round`` as the official code).
    3. Buffers (``buffers="flat"``, official): ``anchor +- 1`` and ``anchor +- W`` on the flattened crop grid,
       clamped to ``[0, N - 1]`` (:func:`flat_neighbours`: ``+- 1`` wraps across rows, the clamp piles onto the
       first and last token); ``buffers="grid"`` takes the true 4-neighbours on the grid instead
       (:func:`grid_neighbours`, no wrap). Present candidates only. If anchors plus buffers exceed ``k`` (tiny
       budgets, where the official ``topk`` would fail), buffers are kept in order of object-layer attention.
    4. Registers: the top ``k - |anchors U buffers|`` of the others by global attention at the deep layer.
    5. No merging; kept tokens in original order, ``reindex`` positions (as the official code).

    Layers: ``object_layer`` is **1-based** as the official ``HIPRUNE_OBJECT_LAYER`` (it reads
    ``attentions[l - 1]``); ``None`` takes the official default scaled to the tower: ``round(0.375 * n_layers)``
    on CLIP (9 of 24, LLaVA-1.5/NeXT), ``round(0.5 * n_layers)`` on Qwen (16 of 32). ``deep_layer`` uses the
    ``vision_feature_layer`` convention; ``None`` is -2 on CLIP (the layer LLaVA reads; official
    ``attentions[mm_vision_select_layer]``) and the last block on Qwen (the one the merger reads, as official).
    With ``None`` the capture plan cannot know the family yet, so both families' default layers are captured
    (at most 4 layers; only the family's 2 are read). Defaults: ``alpha = 0.1`` (anchors ~2% of k, anchors plus
    buffers ~10%).

    Qwen2-VL / Qwen2.5-VL (official ``Qwen2_5_VL/qwen2_5_vl_HiPrune.py``): the same rule on the merged token grid
    (one frame per crop), with the per-token attention = full attention over the frame's patches recomputed from
    the captured q/k (after the vision RoPE), head mean, **query sum**, averaged over the token's 2x2 merge group,
    un-windowed. On Qwen2.5-VL's window blocks this full attention differs from the block's real windowed attention,
    exactly as in the official FA path. Buffers use the merged grid's width (official ``+-1, +-(W/2)``).

    Budget: a count is used as given (the official LLaVA ``HIPRUNE_RETENTION``); a ratio becomes
    ``round(ratio * n)`` (Python ``round``, the official Qwen ``round(n_image_tokens * RETAIN)``).

    Differences from the official code:

    - Official LLaVA-NeXT handling is not reproduced exactly (it splits the budget over the crops before
      unpadding); we run the rule per crop on the unpadded candidates with an even budget split.
    - Attention is recomputed from the captured q/k (float32) rather than an eager forward (same values up to
      rounding; the model runs under SDPA).
    """

    alpha: float = 0.1
    buffers: str = "flat"  # "flat": official +-1 / +-W on the flattened grid; "grid": true 4-neighbours
    object_layer: int | None = None  # 1-based, as HIPRUNE_OBJECT_LAYER; None: 0.375 (CLIP) / 0.5 (Qwen) of depth
    deep_layer: int | None = None  # vision_feature_layer convention; None: -2 (CLIP) / last block (Qwen)

    name = "hiprune"
    stage = "vision"
    needs = frozenset({"vision_qk"})
    paper = "HiPrune: Training-Free Visual Token Pruning via Hierarchical Attention in Vision Encoders"
    arxiv = "2508.00553"
    fidelity = (
        "faithful on LLaVA-1.5 and Qwen (official flat buffers; buffers='grid' is our fix); LLaVA-NeXT run per "
        "crop on the unpadded grid with an even budget split"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.alpha <= 5.0:
            raise MethodError(f"hiprune: alpha={self.alpha} must lie in [0, 5]")
        if self.buffers not in ("flat", "grid"):
            raise MethodError(f"hiprune: buffers={self.buffers!r}: choose 'flat' (official) or 'grid'")
        if self.object_layer is not None and self.object_layer < 1:
            raise MethodError(f"hiprune: object_layer={self.object_layer} is 1-based; pass >= 1")

    def _object_index(self, n_layers: int, has_cls: bool) -> int:
        share = 0.375 if has_cls else 0.5  # official defaults: 9 of 24 (CLIP), 16 of 32 (Qwen2.5-VL)
        one_based = self.object_layer if self.object_layer is not None else max(1, round(share * n_layers))
        if one_based > n_layers:
            raise MethodError(f"hiprune: object_layer={one_based} exceeds the tower's {n_layers} layers")
        return one_based - 1

    def _deep_index(self, n_layers: int, has_cls: bool, projector_layer: int | None = None) -> int:
        if self.deep_layer is None and projector_layer is not None:
            return projector_layer  # the layer the projector reads
        default = -2 if has_cls else -1
        return feature_layer(default if self.deep_layer is None else self.deep_layer, n_layers)

    def budget(self, n_tokens: int, *, stage_index: int = 0, n_layers: int = 0) -> int:
        return resolve_keep(self.keep, n_tokens, rounding="round")

    def vision_layers(self, n_vision_layers: int) -> list[int]:
        # the family is unknown when the capture is planned: take both families' defaults where a field is None
        return sorted(
            {self._object_index(n_vision_layers, cls) for cls in (True, False)}
            | {self._deep_index(n_vision_layers, cls) for cls in (True, False)}
        )

    def select(self, ctx: ImageContext, k: int) -> torch.Tensor:
        require_vision(ctx, self.name)
        n_layers, has_cls = ctx.vision.n_layers, ctx.vision.has_cls
        shallow_layer = self._object_index(n_layers, has_cls)
        deep_layer = self._deep_index(n_layers, has_cls, ctx.vision.feature_layer)
        attention = global_attention if has_cls else merged_received_attention
        crops, extra = crops_of(ctx)
        keep = [extra]
        for crop, k_c in zip(crops, split_budget(k, [c.cand.numel() for c in crops]), strict=True):
            if k_c == 0:
                continue
            shallow = attention(ctx, shallow_layer, crop)
            n_anchor = min(k_c, int(round(k_c * self.alpha / 5)))
            anchors = torch.topk(shallow, n_anchor).indices
            if self.buffers == "flat":
                buffers = flat_neighbours(ctx.grid_rc[crop.cand], ctx.grid_hw, anchors)
            else:
                buffers = grid_neighbours(ctx.grid_rc[crop.cand], anchors)
            is_anchor = torch.zeros(crop.cand.numel(), dtype=torch.bool, device=shallow.device)
            is_anchor[anchors] = True
            buffers = buffers[~is_anchor[buffers]]
            if anchors.numel() + buffers.numel() > k_c:
                buffers = buffers[topk_indices(shallow[buffers], k_c - anchors.numel())]
            chosen = torch.cat([anchors, buffers])
            deep = attention(ctx, deep_layer, crop).clone()
            deep[chosen] = -torch.inf  # official: deep_attn - 1[chosen]; attention <= 1 so both exclude them
            registers = torch.topk(deep, k_c - chosen.numel()).indices
            keep.append(crop.cand[torch.cat([chosen, registers])])
        return torch.cat(keep)

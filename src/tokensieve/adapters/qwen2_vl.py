"""Qwen2-VL and Qwen2.5-VL: dynamic-resolution ViT, 2x2 patch merger, 3-D M-RoPE.

The merger (RMSNorm/LayerNorm + MLP over 4 patches) is the projector M. Qwen2.5-VL runs its ViT in window
order; the adapter undoes that order with the model's own ``get_vision_window_index`` so that pre-merger
features line up with the merged tokens in placeholder order. The tower has no CLS token.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from transformers.vision_utils import get_vision_window_index

from .base import Adapter, FeatureRecord, ImageTokens, register_adapter


@register_adapter
class Qwen2VLAdapter(Adapter):
    family = "qwen2_vl"
    model_classes = ("Qwen2_5_VLForConditionalGeneration", "Qwen2VLForConditionalGeneration")
    mrope = True

    @property
    def visual(self) -> nn.Module:
        return self.base.visual

    def projector_module(self) -> nn.Module:
        return self.visual.merger

    def project_fn(self) -> Callable[[torch.Tensor], torch.Tensor]:
        merger = self.visual.merger

        def project(x: torch.Tensor) -> torch.Tensor:  # [m, merge^2 * d_v] -> [m, D]
            width = x.shape[-1] // self.visual.spatial_merge_size**2
            return merger(x.reshape(-1, width))

        return project

    def image_tokens(self, record: FeatureRecord) -> list[ImageTokens]:
        grid_thw = record.call_kwargs["image_grid_thw"]
        merge = self.visual.spatial_merge_size
        unit = merge * merge
        pre = None
        out = record.vision_output
        if out is not None and getattr(out, "last_hidden_state", None) is not None:
            hidden = out.last_hidden_state  # [patches, d_v], window order on Qwen2.5-VL
            grouped = hidden.reshape(-1, unit * hidden.shape[-1])
            if hasattr(self.visual, "window_size") and hasattr(self.visual, "fullatt_block_indexes"):
                window_index, _ = get_vision_window_index(
                    grid_thw.cpu(),
                    spatial_merge_size=merge,
                    window_size=self.visual.window_size,
                    patch_size=self.visual.patch_size,
                )
                grouped = grouped[torch.argsort(window_index).to(grouped.device)]
            pre = grouped
        images, offset = [], 0
        for f, (_, h, w) in zip(record.features, grid_thw.tolist(), strict=True):
            n = f.shape[0]
            gh, gw = int(h) // merge, int(w) // merge
            idx = torch.arange(n, device=f.device) % (gh * gw)
            images.append(
                ImageTokens(
                    features=f,
                    grid_rc=torch.stack([idx // gw, idx % gw], dim=1),
                    grid_hw=(gh, gw),
                    groups=torch.arange(n, device=f.device) // (gh * gw),  # one group per frame
                    always_keep=torch.zeros(n, dtype=torch.bool, device=f.device),
                    pre_features=None if pre is None else pre[offset : offset + n],
                )
            )
            offset += n
        return images

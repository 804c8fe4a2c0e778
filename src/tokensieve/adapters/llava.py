"""LLaVA-1.5 (``LlavaForConditionalGeneration``): CLIP tower, 2-layer GELU projector, one token per patch."""

from __future__ import annotations

import torch
from torch import nn

from .base import Adapter, FeatureRecord, ImageTokens, register_adapter, square_grid


def clip_encoder_layers(vision_tower: nn.Module) -> list[nn.Module]:
    """The encoder layers of a CLIP/SigLIP-style tower (transformers 5 flattens ``vision_model``)."""
    inner = getattr(vision_tower, "vision_model", vision_tower)
    encoder = getattr(inner, "encoder", None)
    return list(encoder.layers) if encoder is not None else []


@register_adapter
class LlavaAdapter(Adapter):
    family = "llava"
    model_classes = ("LlavaForConditionalGeneration",)
    supports_vision_qk = True

    def projector_module(self) -> nn.Module:
        return self.base.multi_modal_projector

    def fixed_tokens_per_image(self) -> int | None:
        vision = self.config.vision_config
        if not hasattr(vision, "image_size") or not hasattr(vision, "patch_size"):
            return None
        patches = (vision.image_size // vision.patch_size) ** 2
        return patches if getattr(self.config, "vision_feature_select_strategy", "default") == "default" else None

    def vision_attention_layers(self) -> list[nn.Module]:
        return [layer.self_attn for layer in clip_encoder_layers(self.base.vision_tower)]

    def vision_encoder_layers(self) -> list[nn.Module]:
        return clip_encoder_layers(self.base.vision_tower)

    def _select_strategy(self, record: FeatureRecord) -> str:
        return record.call_kwargs.get("vision_feature_select_strategy") or getattr(
            self.config, "vision_feature_select_strategy", "default"
        )

    def image_tokens(self, record: FeatureRecord) -> list[ImageTokens]:
        feats = record.features
        x = record.projector_input
        if x is not None and x.dim() == 3 and x.shape[0] == 1 and len(feats) > 1:
            x = torch.split(x[0], [f.shape[0] for f in feats])  # image_sizes path: one flat batch
        has_cls_offset = 1 if self._select_strategy(record) == "default" else 0
        images = []
        for i, f in enumerate(feats):
            n = f.shape[0]
            rc, hw = square_grid(n)
            images.append(
                ImageTokens(
                    features=f,
                    grid_rc=rc.to(f.device),
                    grid_hw=hw,
                    groups=torch.zeros(n, dtype=torch.long, device=f.device),
                    always_keep=torch.zeros(n, dtype=torch.bool, device=f.device),
                    pre_features=None if x is None else x[i].reshape(n, -1),
                    crops=[i],
                    vision_patch_index=torch.arange(n, device=f.device) + has_cls_offset,
                )
            )
        return images

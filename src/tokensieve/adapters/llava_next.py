"""LLaVA-NeXT (``LlavaNextForConditionalGeneration``): anyres crops, unpadding, ``image_newline`` tokens.

The order in which crop tokens fill the placeholders is computed by running the model's own
``pack_image_features`` on index tensors, so the adapter never re-implements the unpad arithmetic.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

from .base import FeatureRecord, ImageTokens, register_adapter
from .llava import LlavaAdapter


@register_adapter
class LlavaNextAdapter(LlavaAdapter):
    family = "llava_next"
    model_classes = ("LlavaNextForConditionalGeneration",)

    def projector_module(self) -> nn.Module:
        return self.base.multi_modal_projector

    def fixed_tokens_per_image(self) -> int | None:
        return None  # anyres: the count depends on each image's size

    def image_pixels(self, record: FeatureRecord) -> list[torch.Tensor] | None:
        pixels = record.call_kwargs.get("pixel_values")
        if not isinstance(pixels, torch.Tensor) or pixels.dim() != 5:
            return None
        return [pixels[i, :n] for i, n in enumerate(self._num_patches(record))]  # the batch pads crops

    def _num_patches(self, record: FeatureRecord) -> list[int]:
        return [
            image_size_to_num_patches(
                image_size=size,
                grid_pinpoints=self.config.image_grid_pinpoints,
                patch_size=self.config.vision_config.image_size,
            )
            for size in record.call_kwargs["image_sizes"]
        ]

    def _packed_index(self, record: FeatureRecord, num_patches: list[int], n_per_crop: int) -> list[torch.Tensor]:
        """Per image [n_i]: ``crop * N + patch`` of each placeholder token, ``-1`` for newlines, computed by the
        model's own ``pack_image_features`` on index tensors."""
        index_feats = [torch.arange(n * n_per_crop, dtype=torch.float64).view(n, n_per_crop, 1) for n in num_patches]
        packed, _ = self.base.pack_image_features(
            index_feats,
            record.call_kwargs["image_sizes"],
            vision_feature_select_strategy=self._select_strategy(record),
            image_newline=torch.tensor([-1.0], dtype=torch.float64),
        )
        return [flat[:, 0].round().long() for flat in packed]

    def image_tokens(self, record: FeatureRecord) -> list[ImageTokens]:
        vision_cfg = self.config.vision_config
        num_patches = self._num_patches(record)
        x = record.projector_input  # [sum(num_patches), N, d_in]
        n_per_crop = x.shape[1] if x is not None else (vision_cfg.image_size // vision_cfg.patch_size) ** 2
        side = vision_cfg.image_size // vision_cfg.patch_size
        has_cls_offset = 1 if self._select_strategy(record) == "default" else 0
        images, crop_offset = [], 0
        packed = self._packed_index(record, num_patches, n_per_crop)
        for i, (f, flat) in enumerate(zip(record.features, packed, strict=True)):
            flat = flat.to(f.device)
            newline = flat < 0
            safe = flat.clamp(min=0)
            patch = safe % n_per_crop
            rc = torch.stack([patch // side, patch % side], dim=1)
            rc[newline] = -1
            pre = None
            if x is not None:
                pre = x[crop_offset : crop_offset + num_patches[i]].reshape(-1, x.shape[-1])[safe]
                pre[newline] = 0.0
            crops = list(range(crop_offset, crop_offset + num_patches[i]))
            groups = torch.where(newline, torch.zeros_like(flat), safe // n_per_crop)
            images.append(
                ImageTokens(f, rc, (side, side), groups, newline, pre, crops, vision_patch_index=patch + has_cls_offset)
            )
            crop_offset += num_patches[i]
        return images

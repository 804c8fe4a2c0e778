"""Qwen2-VL and Qwen2.5-VL: dynamic-resolution ViT, 2x2 patch merger, 3-D M-RoPE.

The merger (RMSNorm/LayerNorm + MLP over 4 patches) is the projector M. Qwen2.5-VL runs its ViT in window
order; the adapter undoes that order with the model's own ``get_vision_window_index`` so that pre-merger
features line up with the merged tokens in placeholder order. The tower has no CLS token.

Vision capture (``install_vision_capture``): per requested ViT block, q/k/v from the block's ``attn.qkv`` output,
q and k rotated with the block's own ``position_embeddings`` and the model's ``apply_rotary_pos_emb_vision``
(exactly what the block attends with), and the block's output hidden states. They are stored per frame (an
image is one frame; each frame is one full-attention segment of the tower) in natural, un-windowed patch order,
which groups patches by merge unit: LLM token ``t`` of a frame owns patch rows ``t * 4 .. t * 4 + 3``.
``FeatureRecord.vision_qk[layer][name]`` is therefore a *list* of per-frame tensors [P_f, H, d] (frames differ in
size), ``vision_hidden[layer]`` a list of [P_f, d_v]; both index like the CLIP ``[crops, T, ...]`` tensors.
"""

from __future__ import annotations

import sys
import threading
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
    supports_vision_qk = True

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

    def install_projector_capture(self, sink: Callable[[], FeatureRecord | None]) -> list:
        """Pre-merger patches come from the tower's output (``last_hidden_state``), in window order."""

        def hook(module, args, output):
            record = sink()
            if record is not None:
                record.vision_output = output

        return [self.visual.register_forward_hook(hook)]

    def image_pixels(self, record: FeatureRecord) -> list[torch.Tensor] | None:
        pixels, grid = record.call_kwargs.get("pixel_values"), record.call_kwargs.get("image_grid_thw")
        if not isinstance(pixels, torch.Tensor) or grid is None:
            return None
        return list(torch.split(pixels, grid.prod(-1).tolist()))  # one row per patch, images back to back

    def decoder_position_ids(self, position_ids: torch.Tensor | None) -> torch.Tensor | None:
        if position_ids is not None and position_ids.dim() == 3 and position_ids.shape[0] == 4:
            return position_ids[1:]  # Qwen prepends text positions for packed masks
        return position_ids

    # ----- vision tower ------------------------------------------------------------------------------------------
    def vision_attention_layers(self) -> list[nn.Module]:
        return [block.attn for block in self.visual.blocks]

    def vision_encoder_layers(self) -> list[nn.Module]:
        return list(self.visual.blocks)

    def vision_feature_layer_index(self) -> int:
        return len(self.visual.blocks) - 1  # the merger reads the last block

    def vision_layout(self) -> tuple[bool, int]:
        """(has CLS, patches per LLM token along each axis) of the captured vision tensors."""
        return False, int(self.visual.spatial_merge_size)

    def _windowed(self) -> bool:
        return hasattr(self.visual, "window_size") and hasattr(self.visual, "fullatt_block_indexes")

    def _natural_order(self, grid_thw: torch.Tensor) -> torch.Tensor | None:
        """Patch rows [S] that put the tower's window-ordered sequence back in natural order (None: no windows).

        The window permutation moves whole merge units (``get_vision_window_index`` indexes units of merge**2
        consecutive patches), so units are un-permuted and patches inside a unit keep their order."""
        if not self._windowed():
            return None
        merge = self.visual.spatial_merge_size
        window_index, _ = get_vision_window_index(
            grid_thw.cpu(),
            spatial_merge_size=merge,
            window_size=self.visual.window_size,
            patch_size=self.visual.patch_size,
        )
        unit = merge * merge
        return (torch.argsort(window_index)[:, None] * unit + torch.arange(unit)).flatten()

    def install_vision_capture(self, layers: list[int], sink: Callable[[], FeatureRecord | None]) -> list:
        """Capture q/k/v (q, k after the vision RoPE) and output hidden states of ``layers`` per frame, un-windowed.

        Hooks: a pre-hook on the tower reads ``grid_thw`` (frame sizes, window order), a pre-hook with kwargs on
        each block reads its ``position_embeddings`` (cos, sin), a hook on the block's ``attn.qkv`` rotates and
        stores q/k/v, a hook on the block stores its output. The hooks' scratch state is per thread."""
        local = threading.local()

        def state() -> dict:
            if not hasattr(local, "state"):
                local.state = {}
            return local.state

        def on_tower(module, args, kwargs):
            grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
            if grid is None:
                raise RuntimeError("qwen2_vl vision capture: the vision tower was called without grid_thw")
            state()["order"] = self._natural_order(grid)
            state()["sizes"] = (grid[:, 1] * grid[:, 2]).repeat_interleave(grid[:, 0]).tolist()  # one per frame

        handles = [self.visual.register_forward_pre_hook(on_tower, with_kwargs=True)]
        for layer in layers:
            handles.extend(self._block_capture(layer, state, sink))
        return handles

    def _block_capture(self, layer: int, state: Callable[[], dict], sink: Callable[[], FeatureRecord | None]) -> list:
        """The three hooks of one ViT block (see :meth:`install_vision_capture`)."""
        block = self.visual.blocks[layer]
        attn = block.attn
        rotate = sys.modules[type(attn).__module__].apply_rotary_pos_emb_vision

        def per_frame(x: torch.Tensor) -> list[torch.Tensor]:
            order = state()["order"]
            if order is not None:
                x = x[order.to(x.device)]
            return list(torch.split(x, state()["sizes"]))

        def on_block(module, args, kwargs):
            rope = kwargs.get("position_embeddings", args[2] if len(args) > 2 else None)
            if rope is None:
                raise RuntimeError(f"qwen2_vl vision capture: block {layer} got no position_embeddings (cos, sin)")
            state()[("rope", layer)] = rope

        def on_qkv(module, args, output):
            record = sink()
            if record is None:
                return
            q, k, v = output.detach().reshape(output.shape[0], 3, attn.num_heads, -1).unbind(1)  # [S, H, d] each
            cos, sin = state().pop(("rope", layer))
            q, k = rotate(q, k, cos, sin)  # the block's own RoPE, so the recomputed logits match its attention
            record.vision_qk[layer] = {"q": per_frame(q), "k": per_frame(k), "v": per_frame(v)}

        def on_output(module, args, output):
            record = sink()
            if record is not None:
                value = output[0] if isinstance(output, tuple) else output
                record.vision_hidden[layer] = per_frame(value.detach())

        return [
            block.register_forward_pre_hook(on_block, with_kwargs=True),
            attn.qkv.register_forward_hook(on_qkv),
            block.register_forward_hook(on_output),
        ]

    def image_tokens(self, record: FeatureRecord) -> list[ImageTokens]:
        grid_thw = record.call_kwargs["image_grid_thw"]
        merge = self.visual.spatial_merge_size
        unit = merge * merge
        pre = None
        out = record.vision_output
        if out is not None and getattr(out, "last_hidden_state", None) is not None:
            hidden = out.last_hidden_state  # [patches, d_v], window order on Qwen2.5-VL
            grouped = hidden.reshape(-1, unit * hidden.shape[-1])
            if self._windowed():
                window_index, _ = get_vision_window_index(
                    grid_thw.cpu(),
                    spatial_merge_size=merge,
                    window_size=self.visual.window_size,
                    patch_size=self.visual.patch_size,
                )
                grouped = grouped[torch.argsort(window_index).to(grouped.device)]
            pre = grouped
        images, offset, frame = [], 0, 0
        for f, (t, h, w) in zip(record.features, grid_thw.tolist(), strict=True):
            n = f.shape[0]
            gh, gw = int(h) // merge, int(w) // merge
            idx = torch.arange(n, device=f.device) % (gh * gw)  # the token's merge unit inside its frame
            images.append(
                ImageTokens(
                    features=f,
                    grid_rc=torch.stack([idx // gw, idx % gw], dim=1),
                    grid_hw=(gh, gw),
                    groups=torch.arange(n, device=f.device) // (gh * gw),  # one group per frame
                    always_keep=torch.zeros(n, dtype=torch.bool, device=f.device),
                    pre_features=None if pre is None else pre[offset : offset + n],
                    crops=list(range(frame, frame + int(t))),  # group g (frame g) reads crops[g]
                    vision_patch_index=idx,  # unit; patch rows idx * merge**2 + (0 .. merge**2 - 1)
                )
            )
            offset += n
            frame += int(t)
        return images

"""vLLM model classes of the plugin: LLaVA and Qwen2.5-VL whose image placeholders and embeddings are pruned.

Imported by vLLM only (through :func:`tokensieve.integrations.vllm.register`). Written against vLLM 0.32's
``llava.py`` / ``qwen2_5_vl.py``. Both classes run end to end on the CPU build
(``tests/test_integrations_vllm.py``, marker ``integration``); see docs/ecosystem.md for the install and the
CPU runner's pruning flag.
"""

from __future__ import annotations

import functools
import json
import os

import torch
from vllm.model_executor.models.llava import (
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaMultiModalProcessor,
    LlavaProcessingInfo,
)
from vllm.model_executor.models.qwen2_5_vl import (
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.processing.processor import PromptReplacement

from . import plugin_spec
from .selection import (
    llava_context,
    make_vllm_method,
    placeholder_count,
    project_fn,
    qwen_context,
    qwen_kept_positions,
    select_rows,
)

TRACE_ENV = "TOKENSIEVE_VLLM_TRACE"  # a file: one JSON line per pruned image ({"n": ..., "kept": [...]})


def _record(n: int, kept: torch.Tensor) -> None:
    path = os.environ.get(TRACE_ENV)
    if path:
        with open(path, "a") as handle:
            handle.write(json.dumps({"n": int(n), "kept": kept.tolist()}) + "\n")


@functools.lru_cache(maxsize=1)
def _method():
    spec = plugin_spec()
    if spec is None:
        raise RuntimeError("tokensieve's vLLM model was loaded without TOKENSIEVE_VLLM; set it before vLLM starts")
    return make_vllm_method(**spec)


# ------------------------------------------------------------------------------------------------ LLaVA


class SievedLlavaProcessingInfo(LlavaProcessingInfo):
    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        n = super().get_num_image_tokens(image_width=image_width, image_height=image_height)
        return placeholder_count(_method(), n)


@MULTIMODAL_REGISTRY.register_processor(
    LlavaMultiModalProcessor, info=SievedLlavaProcessingInfo, dummy_inputs=LlavaDummyInputsBuilder
)
class SievedLlava(LlavaForConditionalGeneration):
    """LLaVA-1.5 whose ``embed_multimodal`` returns each image's kept rows (contiguous positions follow)."""

    def embed_multimodal(self, **kwargs: object):
        image_input = self._parse_and_validate_image_input(**kwargs)
        if image_input is None:
            return []
        if image_input["type"] == "image_embeds":
            raise ValueError("tokensieve's vLLM plugin prunes from pixels; precomputed image_embeds are not supported")
        pre = self._process_image_pixels(image_input)  # [B, n, d_v] or per-image [n, d_v]
        pre = list(pre.unbind(0)) if isinstance(pre, torch.Tensor) else list(pre)
        projector = self.multi_modal_projector
        method, rows = _method(), []
        for x, pixels in zip(pre, image_input["pixel_values"], strict=True):
            z = projector(x)
            ctx = llava_context(z, pre_features=x, project=project_fn(projector), projector=projector, pixels=pixels)
            chosen = select_rows(method, ctx)
            _record(z.shape[0], chosen.kept)
            rows.append(chosen.rows)
        return rows


# ------------------------------------------------------------------------------------------------ Qwen2.5-VL


class SievedQwen2_5_VLMultiModalProcessor(Qwen2_5_VLMultiModalProcessor):
    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        updates = list(super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs))
        for i, update in enumerate(updates):
            if update.modality == "image":
                full = update.replacement

                def pruned(item_idx: int, full=full):
                    tokens = full(item_idx)
                    return tokens[: placeholder_count(_method(), len(tokens))]

                updates[i] = PromptReplacement(modality="image", target=update.target, replacement=pruned)
        return updates


@MULTIMODAL_REGISTRY.register_processor(
    SievedQwen2_5_VLMultiModalProcessor, info=Qwen2_5_VLProcessingInfo, dummy_inputs=Qwen2_5_VLDummyInputsBuilder
)
class SievedQwen2_5_VL(Qwen2_5_VLForConditionalGeneration):
    """Qwen2.5-VL whose images keep ``keep(n)`` rows, each with its original M-RoPE id (4 extra channels that
    vLLM's ``recompute_mrope_positions`` turns into positions)."""

    supports_multimodal_pruning = True

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        if not self.is_multimodal_pruning_enabled:
            raise ValueError(
                "tokensieve on Qwen2.5-VL needs vLLM's multimodal-pruning path to recompute M-RoPE positions: "
                "start the engine with video_pruning_rate > 0 (e.g. LLM(..., video_pruning_rate=0.01))"
            )

    def _process_image_input(self, image_input):
        grid_thw = image_input["image_grid_thw"].tolist()
        captured: dict[str, torch.Tensor] = {}
        method = _method()
        merger = self.visual.merger
        wrap = "pre_features" in method.needs and image_input["type"] != "image_embeds"
        if wrap:  # a forward hook does not fire here (vLLM calls the merger outside Module.__call__'s hooks)
            forward = merger.forward

            def capturing_forward(x, *args, **kwargs):
                captured["x"] = x
                return forward(x, *args, **kwargs)

            merger.forward = capturing_forward
        try:
            embeds = super()._process_image_input(image_input)
        finally:
            if wrap:
                del merger.forward  # back to the class's forward
        merge = self.visual.spatial_merge_size
        pre = self._pre_features(captured.get("x"), grid_thw, merge)
        project = self._project(merge)
        out, offset = [], 0
        pixels = _per_image_pixels(image_input, grid_thw)
        for emb, size, image_pixels in zip(embeds, grid_thw, pixels, strict=True):
            x = None if pre is None else pre[offset : offset + emb.shape[0]]
            offset += emb.shape[0]
            ctx = qwen_context(emb, tuple(size), merge, pre_features=x, project=project, projector=self.visual.merger,
                               pixels=image_pixels)  # fmt: skip
            chosen = select_rows(method, ctx)
            _record(emb.shape[0], chosen.kept)
            positions = qwen_kept_positions(tuple(size), merge, chosen.kept).to(emb.device, emb.dtype)
            out.append(torch.cat([chosen.rows, positions], dim=1))
        return tuple(out)

    def _postprocess_image_embeds_evs(self, image_embeds_split, image_input):
        return image_embeds_split  # positions were appended for the kept rows already

    def _pre_features(self, x, grid_thw, merge):
        """Merger input grouped per merge unit, in the merger output's (un-windowed) order."""
        if x is None:
            return None
        unit = merge * merge
        grouped = x.reshape(-1, unit * x.shape[-1])
        reverse = self.visual.prepare_encoder_metadata(grid_thw)["reverse_indices"].to(grouped.device)
        return grouped[reverse]

    def _project(self, merge):
        merger = self.visual.merger

        def project(x: torch.Tensor) -> torch.Tensor:  # [m, merge^2 * d_v] -> [m, D]
            out = merger(x.reshape(-1, x.shape[-1] // (merge * merge)))
            return out[0] if isinstance(out, tuple) else out

        return project


def _per_image_pixels(image_input, grid_thw: list[list[int]]) -> list[torch.Tensor | None]:
    """Each image's flattened patch rows (None for precomputed embeddings): the content key's source."""
    if image_input["type"] == "image_embeds":
        return [None] * len(grid_thw)
    sizes = [int(t * h * w) for t, h, w in grid_thw]
    return list(torch.split(image_input["pixel_values"], sizes))

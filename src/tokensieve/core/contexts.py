"""Building the typed contexts handed to methods: only what the plan's ``needs`` ask for is filled."""

from __future__ import annotations

import torch

from ..adapters.base import Adapter
from ..context import ImageContext, LayerCapture, LLMContext, VisionSignals
from .layout import text_rows
from .plan import Plan
from .state import PlacedImage, Request


def _text_fields(adapter: Adapter, request: Request, img: PlacedImage) -> dict:
    b = img.sample
    ids = request.input_ids[b]
    mask = request.valid[b].to(ids.device) & (ids != adapter.image_token_id)
    text_ids = ids[mask]
    starts = torch.stack([other.positions[0] for other in request.images if other.sample == b]).to(ids.device)
    text_cols = torch.nonzero(mask).flatten()
    return dict(
        text_ids=text_ids,
        text_embeds=adapter.embed_tokens()(text_ids),
        text_segment=(text_cols[:, None] > starts[None, :]).sum(1) - 1,
        embed_tokens=adapter.embed_tokens(),
    )


def _vision(adapter: Adapter, img: PlacedImage) -> VisionSignals:
    has_cls, merge_size = adapter.vision_layout()
    vision = VisionSignals(
        has_cls=has_cls,
        merge_size=merge_size,
        n_layers=len(adapter.vision_attention_layers()),
        feature_layer=adapter.vision_feature_layer_index(),
    )
    crops = img.tokens.crops
    for layer, qkv in img.record.vision_qk.items():
        for name, store in (("q", vision.queries), ("k", vision.keys), ("v", vision.values)):
            if name in qkv:
                store[layer] = [qkv[name][c].transpose(0, 1) for c in crops]
    for layer, hid in img.record.vision_hidden.items():
        vision.hidden[layer] = [hid[c] for c in crops]
    return vision


def image_context(
    adapter: Adapter, plan: Plan, request: Request, img: PlacedImage, cand: torch.Tensor, features: torch.Tensor
) -> ImageContext:
    tokens = img.tokens
    cand_t = cand.to(tokens.grid_rc.device)
    text = _text_fields(adapter, request, img) if "text" in plan.needs else {}
    project = "projector" in plan.needs
    patch = tokens.vision_patch_index
    return ImageContext(
        sample=img.sample,
        image=img.image,
        n_tokens=img.n_tokens,
        token_index=cand,
        features=features,
        grid_rc=tokens.grid_rc[cand_t],
        grid_hw=tokens.grid_hw,
        groups=tokens.groups[cand_t],
        always_keep=tokens.always_keep[cand_t],
        pre_features=None if tokens.pre_features is None else tokens.pre_features[cand.to(tokens.pre_features.device)],
        project=adapter.project_fn() if project else None,
        projector_module=adapter.projector_module() if project else None,
        vision=_vision(adapter, img) if plan.vision_layers else None,
        vision_patch_index=None if patch is None else patch[cand_t],
        family=adapter.family,
        content_key=img.key,
        **text,
    )


def batch_capture(adapter: Adapter, request: Request, layer: int, rotate: bool) -> dict:
    """Signals of decoder layer ``layer`` for the whole batch; q/k rotated when ``rotate``."""
    raw = request.captures.get(layer)
    if raw is None:
        raise RuntimeError(f"tokensieve: signals of decoder layer {layer} were not captured")
    out = dict(raw)
    if rotate and "q_rot" not in raw:
        _, _, heads, kv_heads, head_dim = adapter.qk_projections(layer)
        q, k = raw["q"], raw["k"]
        b, length, _ = q.shape
        q = q.view(b, length, heads, head_dim).transpose(1, 2)
        k = k.view(b, length, kv_heads, head_dim).transpose(1, 2)
        cos, sin = raw["cos_sin"]
        out["q"], out["k"] = adapter.rotate_qk(layer, q, k, cos, sin)
    elif "q_rot" in raw:
        out["q"], out["k"] = raw["q_rot"], raw["k_rot"]
    return out


def sample_capture(cap: dict, b: int) -> LayerCapture:
    def row(name):
        value = cap.get(name)
        return None if value is None else value[b]

    return LayerCapture(
        cols=cap["cols"][b],
        valid=cap["valid"][b],
        queries=row("q"),
        keys=row("k"),
        hidden=row("hidden"),
        attn_in=row("attn_in"),
        attn_out=row("attn_out"),
        mlp_in=row("mlp_in"),
        mlp_out=row("mlp_out"),
    )


def llm_context(
    adapter: Adapter,
    request: Request,
    img: PlacedImage,
    layer: int,
    stage_index: int,
    cand: torch.Tensor,
    rows: torch.Tensor,
    hidden: torch.Tensor,
    captures: dict[int, dict],
) -> LLMContext:
    b = img.sample
    t_rows = text_rows(request, b, adapter.image_token_id)
    t_cols = request.cols[b, t_rows]
    positions = img.positions.to(t_cols.device)
    return LLMContext(
        sample=b,
        image=img.image,
        layer=layer,
        n_layers=adapter.n_layers,
        n_tokens=img.n_tokens,
        token_index=cand,
        hidden=hidden[b, rows],
        text_hidden=hidden[b, t_rows],
        image_cols=positions[cand],
        text_cols=t_cols,
        text_after_image=t_cols > positions.max(),
        last_col=int(request.cols[b][request.layout_valid[b]].max()),
        layers={j: sample_capture(cap, b) for j, cap in captures.items()},
        stage_index=stage_index,
        norm=adapter.final_norm(),
        content_key=img.key,
    )

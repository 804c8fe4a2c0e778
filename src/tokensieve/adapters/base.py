"""Adapters: everything model-specific lives here, one file per family.

An adapter knows where a family keeps its vision tower, projector and decoder, how to read the visual tokens
that ``get_image_features`` produced (and in which order they fill the ``<image>`` placeholders), how to rebuild
rotary position embeddings for new position ids, and how to capture the signals a method declares.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn


class UnsupportedModelError(TypeError):
    """The model's family has no adapter, or the family cannot serve a method's stage."""


@dataclass
class FeatureRecord:
    """What one ``get_image_features`` call produced, captured by the sieve."""

    features: list[torch.Tensor]  # per image [n_i, D], in placeholder order
    call_kwargs: dict = field(default_factory=dict)
    projector_input: torch.Tensor | None = None  # family-specific layout, see the adapter
    vision_output: object = None  # raw output of the vision tower call (Qwen: pre-merger patches)
    vision_qk: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)  # layer -> q/k/v [crops, T, H, d]
    vision_hidden: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [crops, T, d_v]
    images: list[ImageTokens] | None = None  # the adapter's per-image tokens, computed once per record
    keys: list[int] | None = None  # per image: content key (hash of its pixels), see core.images


@dataclass
class ImageTokens:
    """One image's visual tokens, in placeholder order, with what pre-LLM methods may read."""

    features: torch.Tensor  # [n, D]
    grid_rc: torch.Tensor  # [n, 2]
    grid_hw: tuple[int, int]
    groups: torch.Tensor  # [n] crop id
    always_keep: torch.Tensor  # [n] bool
    pre_features: torch.Tensor | None = None  # [n, d_in]
    crops: list[int] = field(default_factory=list)  # rows of the vision tensors (crops) owned by this image
    vision_patch_index: torch.Tensor | None = None  # [n] patch row inside its crop's vision tensors
    sample: int = -1
    image: int = -1
    positions: torch.Tensor | None = None  # [n] positions in the prompt
    record: FeatureRecord | None = None  # the capture this image came from


def square_grid(n: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Row/col of ``n`` tokens laid out row-major on the smallest square grid that holds them."""
    side = max(1, math.isqrt(n))
    if side * side < n:
        side += 1
    idx = torch.arange(n)
    return torch.stack([idx // side, idx % side], dim=1), (side, side)


class Adapter:
    """Base adapter. Subclasses set ``family`` and ``model_classes`` and implement the image layout."""

    family: ClassVar[str] = ""
    model_classes: ClassVar[tuple[str, ...]] = ()
    supports_vision_qk: ClassVar[bool] = False
    mrope: ClassVar[bool] = False  # 3-D multimodal rotary positions (Qwen2-VL family)

    def __init__(self, model: nn.Module):
        self.model = model
        self.base = model.model
        self.text_model = self.base.language_model
        self.layers = self.text_model.layers
        self.config = model.config
        self.image_token_id = int(self.config.image_token_id)

    # ----- structure -------------------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return len(self.layers)

    def projector_module(self) -> nn.Module:
        raise NotImplementedError

    def fixed_tokens_per_image(self) -> int | None:
        """Visual tokens per image when the family fixes it (LLaVA-1.5), so budgets can be checked up front."""
        return None

    def project_fn(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """The projector M as a function of per-token pre-features [m, d_in] -> [m, D]."""
        return self.projector_module()

    def vision_attention_layers(self) -> list[nn.Module]:
        return []

    def vision_encoder_layers(self) -> list[nn.Module]:
        return []

    def vision_feature_layer_index(self) -> int:
        """Index of the vision-tower layer whose output the projector reads (CLIP in LLaVA: ``n + vision_feature_layer``
        for the usual negative config value, e.g. 22 of 24 for -2)."""
        n = len(self.vision_attention_layers())
        value = getattr(self.config, "vision_feature_layer", -2)
        value = value[-1] if isinstance(value, (list, tuple)) else int(value)
        # hidden_states[0] is the embedding output, hidden_states[i] the output of layer i - 1
        return min(n - 1, max(0, n + value if value < 0 else value - 1))

    def vision_layout(self) -> tuple[bool, int]:
        """(the vision tensors start with a CLS row, patches per LLM token along each axis). CLIP: (True, 1)."""
        return True, 1

    def install_vision_capture(self, layers: list[int], sink: Callable[[], FeatureRecord | None]) -> list:
        """Hook the vision tower so that each call stores q/k/v [crops, T, H, d] and the output hidden states
        [crops, T, d_v] of ``layers`` into ``sink()`` (the record being captured). Returns the hook handles."""
        attn_layers, enc_layers = self.vision_attention_layers(), self.vision_encoder_layers()
        handles = []
        for layer in layers:
            attn = attn_layers[layer]
            heads = attn.num_heads if hasattr(attn, "num_heads") else attn.config.num_attention_heads
            for name in ("q", "k", "v"):

                def hook(module, args, output, layer=layer, name=name, heads=heads):
                    record = sink()
                    if record is not None:
                        b, t, _ = output.shape
                        record.vision_qk.setdefault(layer, {})[name] = output.detach().view(b, t, heads, -1)

                handles.append(getattr(attn, f"{name}_proj").register_forward_hook(hook))

            def hidden_hook(module, args, output, layer=layer):
                record = sink()
                if record is not None:
                    value = output[0] if isinstance(output, tuple) else output
                    record.vision_hidden[layer] = value.detach()

            handles.append(enc_layers[layer].register_forward_hook(hidden_hook))
        return handles

    def install_projector_capture(self, sink: Callable[[], FeatureRecord | None]) -> list:
        """Hook what ``pre_features`` are read from into ``sink()``: here the projector's input."""

        def hook(module, args, output):
            record = sink()
            if record is not None:
                record.projector_input = args[0].detach()

        return [self.projector_module().register_forward_hook(hook)]

    def image_pixels(self, record: FeatureRecord) -> list[torch.Tensor] | None:
        """Per image (placeholder order), the pixel tensor it was encoded from; None when unknown."""
        pixels = record.call_kwargs.get("pixel_values")
        if not isinstance(pixels, torch.Tensor) or pixels.shape[0] != len(record.features):
            return None
        return list(pixels)

    def final_norm(self) -> nn.Module | None:
        """The decoder's final norm (applied before the LM head), for methods that read logit-lens signals."""
        return getattr(self.text_model, "norm", None)

    def decoder_position_ids(self, position_ids: torch.Tensor | None) -> torch.Tensor | None:
        """The position ids the decoder layers use, from what the text model was called with."""
        return position_ids

    def attn_implementation(self) -> str:
        return str(getattr(self.text_model.config, "_attn_implementation", None) or "eager")

    # ----- rotary ----------------------------------------------------------------------------------------
    def rotary(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) for ``position_ids`` [B, L] (or [3, B, L] for M-RoPE), as the decoder computes them."""
        return self.text_model.rotary_emb(hidden, position_ids)

    def rotate_qk(self, layer: int, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Apply the family's RoPE to captured q [B, H, L, d] and k [B, H_kv, L, d]."""
        attn = self.layers[layer].self_attn
        apply = sys.modules[type(attn).__module__].apply_rotary_pos_emb
        return apply(q, k, cos, sin)

    def layer_qk(
        self, layer: int, hidden: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Queries [B, H, L, d] and keys [B, H_kv, L, d] after RoPE that decoder layer ``layer`` computes from its
        input ``hidden`` [B, L, D] (its input norm, q/k projections, q/k norms if any, RoPE from ``cos_sin``).
        Only the projections run: no attention, no cache write."""
        block = self.layers[layer]
        attn = block.self_attn
        _, _, heads, kv_heads, head_dim = self.qk_projections(layer)
        x = block.input_layernorm(hidden)
        b, length, _ = x.shape
        q = attn.q_proj(x).view(b, length, heads, head_dim)
        k = attn.k_proj(x).view(b, length, kv_heads, head_dim)
        if getattr(attn, "q_norm", None) is not None:
            q, k = attn.q_norm(q), attn.k_norm(k)
        cos, sin = cos_sin
        return self.rotate_qk(layer, q.transpose(1, 2), k.transpose(1, 2), cos, sin)

    def qk_projections(self, layer: int) -> tuple[nn.Module, nn.Module, int, int, int]:
        attn = self.layers[layer].self_attn
        cfg = self.text_model.config
        heads = cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
        head_dim = getattr(attn, "head_dim", None) or cfg.hidden_size // heads
        return attn.q_proj, attn.k_proj, heads, kv_heads, head_dim

    def sublayers(self, layer: int) -> dict[str, nn.Module]:
        """Modules whose outputs are the normed inputs and the outputs of the attention and MLP blocks."""
        block = self.layers[layer]
        return {
            "attn_in": block.input_layernorm,
            "attn_out": block.self_attn,
            "mlp_in": block.post_attention_layernorm,
            "mlp_out": block.mlp,
        }

    def embed_tokens(self) -> nn.Module:
        return self.base.get_input_embeddings()

    # ----- the visual tokens -------------------------------------------------------------------------------
    def image_features_output(self, output) -> list[torch.Tensor]:
        pooled = output.pooler_output if hasattr(output, "pooler_output") else output
        return list(pooled)

    def image_tokens(self, record: FeatureRecord) -> list[ImageTokens]:
        """Per image, in placeholder order: features, grid layout, pre-projector features."""
        raise NotImplementedError


_ADAPTERS: list[type[Adapter]] = []


def register_adapter(cls: type[Adapter]) -> type[Adapter]:
    """Class decorator of the concrete adapters: add ``cls`` to the registry (``adapters/__init__`` imports them)."""
    if cls not in _ADAPTERS:
        _ADAPTERS.append(cls)
    return cls


def supported_families() -> list[str]:
    return [f"{a.family} ({', '.join(a.model_classes)})" for a in _ADAPTERS]


def get_adapter(model: nn.Module) -> Adapter:
    """The adapter for ``model``, chosen by its class (and so by its config), never by hard-coded offsets."""
    names = {cls.__name__ for cls in type(model).__mro__}
    for adapter in _ADAPTERS:
        if names & set(adapter.model_classes):
            return adapter(model)
    raise UnsupportedModelError(
        f"{type(model).__name__} is not a supported model family. Supported: {'; '.join(supported_families())}. "
        f"Load the model with its *ForConditionalGeneration class (e.g. LlavaForConditionalGeneration)."
    )

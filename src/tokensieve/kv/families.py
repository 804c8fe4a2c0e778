"""Which model families the KV sieve supports, and the few model facts it needs (no modeling code copied)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

ATTENTION_FAMILIES = {"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3"}
INDEXER_FAMILIES = {"deepseek_v32": "DeepseekV32"}


class UnsupportedKVModelError(ValueError):
    """The model is not a decoder family the KV sieve knows."""


def supported_kv_families() -> list[str]:
    return [*ATTENTION_FAMILIES.values(), *INDEXER_FAMILIES.values()]


@dataclass(frozen=True)
class ModelInfo:
    """What a method may validate against: family, shapes and whether the model rotates q/k with RoPE."""

    family: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    has_rope: bool
    attn_implementation: str


def _config(model: nn.Module):
    config = getattr(model, "config", None)
    if config is None:
        raise UnsupportedKVModelError(
            f"{type(model).__name__} has no .config: pass a HuggingFace causal LM "
            f"(supported families: {', '.join(supported_kv_families())})."
        )
    return config


def model_info(model: nn.Module) -> ModelInfo:
    """Read the family and attention shapes, or raise naming the supported families."""
    config = _config(model)
    family = getattr(config, "model_type", None)
    if family not in ATTENTION_FAMILIES and family not in INDEXER_FAMILIES:
        raise UnsupportedKVModelError(
            f"model_type {family!r} ({type(model).__name__}) is not supported by the KV sieve; "
            f"supported families: {', '.join(supported_kv_families())} (DeepseekV32 for hisa only)."
        )
    n_heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    rope = rotary_module(model)
    return ModelInfo(
        family=family,
        n_layers=config.num_hidden_layers,
        n_heads=n_heads,
        n_kv_heads=getattr(config, "num_key_value_heads", None) or n_heads,
        head_dim=head_dim,
        has_rope=rope is not None,
        attn_implementation=getattr(config, "_attn_implementation", None) or "eager",
    )


def rotary_module(model: nn.Module) -> nn.Module | None:
    """The model's shared rotary embedding (``model.model.rotary_emb`` in Llama / Qwen2 / Qwen3), if any."""
    base = getattr(model, "model", model)
    return getattr(base, "rotary_emb", None)


def rope_cos_sin(model: nn.Module, positions: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [n, d] for 1-D ``positions``, from the model's own rotary module."""
    rope = rotary_module(model)
    if rope is None:
        raise UnsupportedKVModelError(f"{type(model).__name__} has no rotary embedding (RoPE) to read.")
    cos, sin = rope(like, positions.view(1, -1))
    return cos[0].to(like.dtype), sin[0].to(like.dtype)

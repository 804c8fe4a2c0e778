"""Tiny random-weight causal LMs of the supported families (no downloads), for tests and kv-bench timing."""

from __future__ import annotations

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

_FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
}


def tiny_causal_lm(family: str = "llama", *, layers: int = 2, hidden: int = 64, heads: int = 4, kv_heads: int = 2,
                   vocab: int = 128, max_pos: int = 4096, attn: str = "sdpa", seed: int = 0,
                   intermediate: int | None = None):
    """A random-weight model in eval mode; head_dim = hidden // heads."""
    config_cls, model_cls = _FAMILIES[family]
    config = config_cls(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate or 2 * hidden,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        head_dim=hidden // heads, max_position_embeddings=max_pos, attn_implementation=attn,
        rope_theta=10000.0, tie_word_embeddings=True, pad_token_id=0,
    )
    torch.manual_seed(seed)
    return model_cls(config).eval()

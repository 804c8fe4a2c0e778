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


def tiny_deepseek_v32(*, layers: int = 2, index_topk: int = 16, attn: str = "sdpa", seed: int = 0,
                      max_pos: int = 4096):
    """A random-weight ``DeepseekV32ForCausalLM`` (MLA + DSA indexer + a small MoE), for HISA."""
    from transformers import DeepseekV32Config, DeepseekV32ForCausalLM

    config = DeepseekV32Config(
        vocab_size=128, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=4, n_group=1,
        topk_group=1, num_experts_per_tok=2, kv_lora_rank=32, q_lora_rank=32, qk_rope_head_dim=8, v_head_dim=16,
        qk_nope_head_dim=16, index_topk=index_topk, index_head_dim=16, index_n_heads=4, head_dim=8,
        first_k_dense_replace=1, max_position_embeddings=max_pos, attn_implementation=attn, pad_token_id=0,
    )
    torch.manual_seed(seed)
    return DeepseekV32ForCausalLM(config).eval()


_SHARED: dict[str, torch.nn.Module] = {}


def shared_deepseek_v32() -> torch.nn.Module:
    """One default :func:`tiny_deepseek_v32` per process, for tests that only read it (built once: it is slow)."""
    if "deepseek_v32" not in _SHARED:
        _SHARED["deepseek_v32"] = tiny_deepseek_v32()
    return _SHARED["deepseek_v32"]


def token_ids(n: int = 200, seed: int = 1, vocab: int = 128) -> torch.Tensor:
    """Seeded random prompt ids [1, n] in [1, vocab)."""
    return torch.randint(1, vocab, (1, n), generator=torch.Generator().manual_seed(seed))

"""Training-only attention "pointer" losses, shared by the v1 recipe and v2's instruction stage.

Our decoder starts from scratch, whereas LLaVA's arrives pretrained and already able to look things up in its
context. Without that skill, three full runs of answer-only instruction tuning stayed at 36-45% (docs/embedded.md).
The pointer losses are our stand-in for it: at each position that predicts an answer word, the first ``heads``
heads of one layer attend to the question's colour/shape words, and those of the next layer to the tokens of the
objects the question is about. v2 spreads that target over every token an object covers, each object with equal
weight (``BatchBuilder(spread_pointers=True)``), so no single token of an object is privileged; v1 pointed at the
centre token. The sequence start is a target too for existence and counting questions (a "none / how many" sink).
The losses only shape the model's own attention: the exported model is a plain HF Llava with no extra parts.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

POINTER_FIELDS = ("pointer_row", "pointer_query", "pointer_target", "word_target")


def capture_attention_input(store: dict):
    """A forward pre-hook (``with_kwargs=True``) that keeps an attention layer's input and rotary embeddings."""

    def capture(module, args, kwargs):
        store["hidden_states"] = args[0] if args else kwargs["hidden_states"]
        store["position_embeddings"] = kwargs["position_embeddings"]

    return capture


def pointer_loss(
    attention: nn.Module, captured: dict, batch: dict[str, torch.Tensor], heads: int, target: torch.Tensor
) -> torch.Tensor:
    """Cross-entropy between the first ``heads`` attention heads' distributions at each pointer's query position
    (recomputed from the layer's own q/k projections after RoPE) and ``target`` (pointers, length).

    ``batch`` holds ``pointer_row`` / ``pointer_query`` (pointers,) and ``attention_mask`` (rows, length)."""
    hidden = captured["hidden_states"]
    cos, sin = captured["position_embeddings"]
    n_rows, length, _ = hidden.shape
    query = attention.q_proj(hidden).view(n_rows, length, -1, attention.head_dim).transpose(1, 2)
    key = attention.k_proj(hidden).view(n_rows, length, -1, attention.head_dim).transpose(1, 2)
    query, key = apply_rotary_pos_emb(query, key, cos, sin)
    rows, positions = batch["pointer_row"], batch["pointer_query"]
    query = query[rows, :heads, positions]  # (pointers, heads, head_dim)
    key = key[rows, :heads]  # (pointers, heads, length, head_dim)
    logits = torch.einsum("thd,thld->thl", query, key).float() * attention.scaling
    allowed = (torch.arange(length)[None, :] <= positions[:, None]) & batch["attention_mask"][rows].bool()
    log_probs = logits.masked_fill(~allowed[:, None, :], float("-inf")).log_softmax(dim=-1)
    log_probs = log_probs.masked_fill(~allowed[:, None, :], 0.0)
    return -(target[:, None, :] * log_probs).sum(dim=-1).mean()


def lm_and_pointer_losses(model, batch: dict[str, torch.Tensor], pointer_layer: int, heads: int) -> dict:
    """HF's own loss (the plain forward with ``labels``) plus the word and pointer losses of the layers
    ``pointer_layer - 1`` and ``pointer_layer``; a batch without pointers (captioning) gets the HF loss only."""
    if pointer_layer < 1:
        raise ValueError(f"pointer_layer must be >= 1 (its word pointer is the layer before), got {pointer_layer}")
    pointers = {k: batch[k] for k in POINTER_FIELDS if k in batch}
    inputs = {k: v for k, v in batch.items() if k not in POINTER_FIELDS}
    layers = {"word": pointer_layer - 1, "pointer": pointer_layer}
    decoder = model.model.language_model.layers
    captured: dict[str, dict] = {name: {} for name in layers}
    handles = [
        decoder[index].self_attn.register_forward_pre_hook(capture_attention_input(captured[name]), with_kwargs=True)
        for name, index in layers.items()
    ]
    try:
        output = model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    losses = {"loss": output.loss}
    if pointers and len(pointers["pointer_row"]):
        context = {**pointers, "attention_mask": inputs["attention_mask"]}
        for name, index in layers.items():
            target = pointers[f"{name}_target"]
            losses[name] = pointer_loss(decoder[index].self_attn, captured[name], context, heads, target)
    return losses

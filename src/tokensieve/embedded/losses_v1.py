"""Losses of the v1 recipe (:mod:`tokensieve.embedded.train_v1`): the answer loss, the dense per-token auxiliary
losses on the projected visual tokens, and the training-only attention "pointer" losses."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from tokensieve.embedded.synthetic import COLORS, GRID, SHAPES

# Auxiliary per-token heads: name -> number of classes.
AUX_HEADS: dict[str, int] = {
    "object": 1 + len(SHAPES) * len(COLORS),
    "digit": 11,
    "anchor": 2,
    "row": GRID,
    "col": GRID,
}


def pointer_loss(
    attention: nn.Module, captured: dict, batch: dict[str, torch.Tensor], heads: int, target: torch.Tensor
) -> torch.Tensor:
    """Cross-entropy between the first ``heads`` attention heads' distributions at each ``answer:`` token
    (recomputed from the layer's own q/k projections after RoPE) and the target key positions."""
    hidden = captured["hidden_states"]
    cos, sin = captured["position_embeddings"]
    n_rows, length, _ = hidden.shape
    query = attention.q_proj(hidden).view(n_rows, length, -1, attention.head_dim).transpose(1, 2)
    key = attention.k_proj(hidden).view(n_rows, length, -1, attention.head_dim).transpose(1, 2)
    query, key = apply_rotary_pos_emb(query, key, cos, sin)
    rows, positions = batch["pointer_row"], batch["pointer_query"]
    query = query[rows, :heads, positions]  # (turns, heads, head_dim)
    key = key[rows, :heads]  # (turns, heads, length, head_dim)
    logits = torch.einsum("thd,thld->thl", query, key).float() * attention.scaling
    allowed = (torch.arange(length)[None, :] <= positions[:, None]) & batch["attention_mask"][rows].bool()
    log_probs = logits.masked_fill(~allowed[:, None, :], float("-inf")).log_softmax(dim=-1)
    log_probs = log_probs.masked_fill(~allowed[:, None, :], 0.0)
    return -(target[:, None, :] * log_probs).sum(dim=-1).mean()


def forward_losses(
    model, aux_head: nn.Linear, batch: dict[str, torch.Tensor], pointer_layer: int = 1, pointer_heads: int = 2
) -> dict[str, torch.Tensor]:
    """Answer loss, per-head aux losses, pointer losses and feature statistics for one batch.

    Pointer losses: at each ``answer:`` token, heads of layer ``pointer_layer - 1`` attend to the question's
    colour/shape words and heads of layer ``pointer_layer`` to the centre tokens of the matching objects.
    """
    inner = model.model
    layers = {"word": pointer_layer - 1, "pointer": pointer_layer}
    attentions = {name: inner.language_model.layers[index].self_attn for name, index in layers.items()}
    captured: dict[str, dict] = {name: {} for name in layers}

    def capture_into(store: dict):
        def capture(module, args, kwargs):
            store["hidden_states"] = args[0] if args else kwargs["hidden_states"]
            store["position_embeddings"] = kwargs["position_embeddings"]

        return capture

    features = inner.get_image_features(
        pixel_values=batch["pixel_values"], vision_feature_layer=-1, vision_feature_select_strategy="default"
    ).pooler_output
    features = torch.stack(list(features))  # (images, tokens, hidden)
    embeds = inner.get_input_embeddings()(batch["input_ids"])
    image_mask = (batch["input_ids"] == model.config.image_token_id).unsqueeze(-1)
    embeds = embeds.masked_scatter(image_mask, features.to(embeds.dtype))
    handles = [
        attentions[name].register_forward_pre_hook(capture_into(captured[name]), with_kwargs=True) for name in layers
    ]
    try:
        output = inner.language_model(inputs_embeds=embeds, attention_mask=batch["attention_mask"])
    finally:
        for handle in handles:
            handle.remove()
    hidden = output.last_hidden_state
    next_labels = batch["labels"][:, 1:]
    supervised = next_labels != -100
    logits = model.lm_head(hidden[:, :-1][supervised])
    losses = {"answer": F.cross_entropy(logits.float(), next_labels[supervised])}
    if len(batch["pointer_row"]):
        for name in layers:
            target = batch[f"{name}_target"]
            losses[name] = pointer_loss(attentions[name], captured[name], batch, pointer_heads, target)
    # The aux head sees RMS-normalised features, so it gives no incentive to grow their norm.
    normalised = F.rms_norm(features, (features.shape[-1],))
    aux_logits = aux_head(normalised).float().split(list(AUX_HEADS.values()), dim=-1)
    for (name, classes), head_logits in zip(AUX_HEADS.items(), aux_logits, strict=True):
        losses[f"aux_{name}"] = F.cross_entropy(head_logits.reshape(-1, classes), batch[f"aux_{name}"].reshape(-1))
    with torch.no_grad():
        flat = features.float()
        losses["feat_norm"] = flat.norm(dim=-1).mean()
        losses["feat_spread"] = flat.std(dim=1).mean() / flat.pow(2).mean().sqrt()
    return losses

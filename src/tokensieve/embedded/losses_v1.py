"""Losses of the v1 recipe (:mod:`tokensieve.embedded.train_v1`): the answer loss, the dense per-token auxiliary
losses on the projected visual tokens, and the training-only attention "pointer" losses."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tokensieve.embedded.pointers import capture_attention_input, pointer_loss
from tokensieve.embedded.synthetic import COLORS, GRID, SHAPES

# Auxiliary per-token heads: name -> number of classes.
AUX_HEADS: dict[str, int] = {
    "object": 1 + len(SHAPES) * len(COLORS),
    "digit": 11,
    "anchor": 2,
    "row": GRID,
    "col": GRID,
}


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

    features = inner.get_image_features(
        pixel_values=batch["pixel_values"], vision_feature_layer=-1, vision_feature_select_strategy="default"
    ).pooler_output
    features = torch.stack(list(features))  # (images, tokens, hidden)
    embeds = inner.get_input_embeddings()(batch["input_ids"])
    image_mask = (batch["input_ids"] == model.config.image_token_id).unsqueeze(-1)
    embeds = embeds.masked_scatter(image_mask, features.to(embeds.dtype))
    handles = [
        attentions[name].register_forward_pre_hook(capture_attention_input(captured[name]), with_kwargs=True)
        for name in layers
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

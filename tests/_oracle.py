"""Shared plumbing of the oracle tests: an unpruned reference forward of a tiny model, and the prompt layout.

The oracles themselves (``test_oracle_*.py``) are transcriptions of the official code and never import
``tokensieve.methods``; they run on tensors taken from the unpruned model (eager attention weights, the KV
cache's keys after RoPE, hidden states), which is exactly what the official code reads at its first stage.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from conftest import build, prompt

from tokensieve.testing import random_image


@dataclass
class Reference:
    """One sample of an unpruned forward: per-layer tensors without the batch axis."""

    ids: torch.Tensor  # [L]
    image: torch.Tensor  # [n] positions of the image's tokens (one image per prompt)
    attentions: list[torch.Tensor]  # per layer [H, L, L], the layer's own attention on its input
    hidden: list[torch.Tensor]  # per layer input [L, D]; hidden[n_layers] is the final (normed) output
    keys: list[torch.Tensor]  # per layer [H_kv, L, d] after RoPE (the cache)
    model: torch.nn.Module

    @property
    def after_image(self) -> torch.Tensor:
        return torch.arange(int(self.image.max()) + 1, self.ids.numel())

    @property
    def text_model(self):
        return self.model.model.language_model


def inputs_for(family: str, text: str = "what is the color of the square in this picture ?", seed: int = 3,
               size: tuple[int, int] = (56, 56)):  # fmt: skip
    _, proc = build(family, "eager")
    return proc(images=[random_image(seed, size)], text=[prompt(family, text)], return_tensors="pt")


def reference(family: str, inputs) -> Reference:
    """Unpruned eager forward of one sample (batch 1, no padding: the official codes' setting)."""
    model, _ = build(family, "eager")
    with torch.no_grad():
        out = model(**inputs, output_attentions=True, output_hidden_states=True, use_cache=True)
    ids = inputs["input_ids"][0]
    image = torch.nonzero(ids == model.config.image_token_id).flatten()
    keys = [layer.keys[0] for layer in out.cache.layers]
    return Reference(ids, image, [a[0] for a in out.attentions], [h[0] for h in out.hidden_states], keys, model)

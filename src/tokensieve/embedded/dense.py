"""Dense (per-patch) objectives of the v2 vision-tower pretraining, beside CLIP's contrastive loss.

Towers that VLMs use today are not trained with a pooled contrastive loss alone: SigLIP 2 (arXiv 2502.14786)
adds a localisation-aware captioning decoder and patch-level self-distillation, DINOv2 an iBOT patch loss, and
Florence-2 region-level tasks, because a pooled loss leaves patch tokens poor at "what is here". Our stand-in
is the cheapest dense objective the generator offers for free: every patch of an object predicts that object's
shape, colour, printed digit and cell, background patches predict "background". Every patch of an object
carries the whole object (its digit included, though the glyph covers only some patches), so the information a
question needs is spread over all of the object's 4-16 tokens, as in a real tower.

The heads read the layer LLaVA takes its features from (``vision_feature_layer=-2``), through a LayerNorm, and
exist only in this stage: they are not part of the exported LLaVA model.

Shapes: features [B, 144, D]; targets [B, 144] per head (0 = background / no digit).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tokensieve.embedded.scenes import COLORS, DIGITS, GRID, SHAPES, Scene

DENSE_HEADS: dict[str, int] = {"shape": 1 + len(SHAPES), "color": 1 + len(COLORS), "digit": 1 + len(DIGITS)}


def dense_targets(scene: Scene, object_tokens: dict[int, list[int]]) -> dict[str, np.ndarray]:
    """Per-token targets [GRID * GRID] of one scene from its objects' covered tokens (render_scene)."""
    targets = {name: np.zeros(GRID * GRID, dtype=np.int64) for name in (*DENSE_HEADS, "cell")}
    for index, tokens in object_tokens.items():
        obj = scene.objects[index]
        targets["shape"][tokens] = 1 + SHAPES.index(obj.shape)
        targets["color"][tokens] = 1 + COLORS.index(obj.color)
        targets["digit"][tokens] = 0 if obj.digit is None else 1 + int(obj.digit)
        targets["cell"][tokens] = 1 + obj.cell[0] * scene.layout.cells + obj.cell[1]
    return targets


class DenseHeads(nn.Module):
    """LayerNorm, then one linear classifier per target (shape, colour, digit, cell) on each patch token of
    the vision tower's hidden states at ``feature_layer`` (the layer the LLaVA model reads)."""

    def __init__(self, hidden: int, cells: int, feature_layer: int) -> None:
        super().__init__()
        self.classes = {**DENSE_HEADS, "cell": 1 + cells}
        self.feature_layer = feature_layer
        self.norm = nn.LayerNorm(hidden)
        self.linear = nn.Linear(hidden, sum(self.classes.values()))

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.linear(self.norm(features)).split(list(self.classes.values()), dim=-1)
        return dict(zip(self.classes, logits, strict=True))

    def patch_features(self, vision_outputs) -> torch.Tensor:
        """[B, 144, D] patch tokens of ``feature_layer`` (CLS dropped, LLaVA's "default" strategy)."""
        return vision_outputs.hidden_states[self.feature_layer][:, 1:]


def dense_losses(heads: DenseHeads, vision_outputs, targets: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Mean cross-entropy over the heads (``dense``) and the object-token accuracy of each head (``dense_<name>``),
    on a vision-tower output computed with ``output_hidden_states=True``."""
    logits = heads(heads.patch_features(vision_outputs))
    losses = [F.cross_entropy(logits[n].reshape(-1, k), targets[n].reshape(-1)) for n, k in heads.classes.items()]
    out = {"dense": torch.stack(losses).mean()}
    with torch.no_grad():
        on_object = targets["cell"] > 0
        for name in heads.classes:
            right = logits[name].argmax(dim=-1) == targets[name]
            out[f"dense_{name}"] = right[on_object].float().mean()
    return out

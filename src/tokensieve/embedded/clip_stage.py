"""Stage 0 of the v2 recipe: contrastive image-text pretraining of the vision tower, as CLIP does.

A real ``transformers.CLIPModel`` (the vision tower that LLaVA later reuses, plus a small text tower) learns
to match each scene with its caption (:func:`caption`: every object, row by row, with its colour, shape,
printed digit and quadrant) against the other captions of the batch and against one hard negative per image
(:func:`hard_negative`: the same caption with one object's colour, shape, digit or quadrant changed, or one
object left out), the NegCLIP recipe (Yuksekgonul et al., ICLR 2023) that makes CLIP encode attributes
rather than a bag of words. Beside it, dense per-patch heads (:mod:`tokensieve.embedded.dense`, attached as
``clip.dense_heads``) train the patch tokens LLaVA reads, as the dense objectives of SigLIP 2 do. Only
``clip.vision_model`` is kept: it becomes the LLaVA vision tower.

Shapes: ``pixel_values`` [B, 3, 168, 168]; captions [2B, T] (B true, B hard negatives); logits [B, 2B].
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from transformers import CLIPConfig, CLIPModel

from tokensieve.embedded.dense import DenseHeads, dense_losses
from tokensieve.embedded.synthetic import COLORS, DIGITS, SHAPES, Scene, quadrant_of


def caption(scene: Scene) -> str:
    """``"red circle with 3 top left . blue square . ..."``: objects in reading order (cell row, column)."""
    parts = []
    for obj in sorted(scene.objects, key=lambda o: o.cell):
        words = [obj.color, obj.shape]
        if obj.digit is not None:
            words += ["with", obj.digit]
        quadrant = quadrant_of(obj, scene.layout)
        if quadrant is not None:
            words.append(quadrant)
        parts.append(" ".join(words))
    return " . ".join(parts)


def hard_negative(scene: Scene, rng: np.random.Generator) -> str:
    """The caption of ``scene`` with one object changed (colour, shape, digit or cell) or left out."""
    true = caption(scene)
    for _ in range(20):
        other = copy.deepcopy(scene)
        index = int(rng.integers(len(other.objects)))
        obj = other.objects[index]
        kind = int(rng.integers(5))
        if kind == 0:
            obj.color = COLORS[int(rng.integers(len(COLORS)))]
        elif kind == 1:
            obj.shape = SHAPES[int(rng.integers(len(SHAPES)))]
        elif kind == 2 and obj.digit is not None:
            obj.digit = DIGITS[int(rng.integers(len(DIGITS)))]
        elif kind == 3:
            n = scene.layout.cells
            used = {o.cell for o in other.objects}
            free = [(r, c) for r in range(n) for c in range(n) if (r, c) not in used]
            if free:
                obj.cell = free[int(rng.integers(len(free)))]
        elif len(other.objects) > 1:
            other.objects.pop(index)
        negative = caption(other)
        if negative != true:
            return negative
    return true  # a scene with nothing to change (never seen in practice); counts as a plain duplicate


def build_clip(llava_config, vocab_size: int, pad_id: int, bos_id: int, eos_id: int, cells: int) -> CLIPModel:
    """A CLIP model whose vision tower has exactly the LLaVA tower's config, with ``dense_heads`` on the layer
    the LLaVA model reads, for a layout of ``cells`` x ``cells`` cells."""
    vision_config = llava_config.vision_config
    hidden = vision_config.hidden_size
    text = {
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": 4 * hidden,
        "num_hidden_layers": 3,
        "num_attention_heads": vision_config.num_attention_heads,
        "max_position_embeddings": 96,
        "pad_token_id": pad_id,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
    }
    config = CLIPConfig(text_config=text, vision_config=vision_config.to_dict(), projection_dim=hidden)
    clip = CLIPModel(config)
    clip.dense_heads = DenseHeads(hidden, cells * cells, llava_config.vision_feature_layer)
    return clip


def caption_ids(texts: list[str], encode, bos_id: int, eos_id: int, pad_id: int):
    """Right-padded ``[<s>, words..., </s>]`` ids and attention mask for the text tower."""
    rows = [[bos_id, *encode(text), eos_id] for text in texts]
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return ids, mask


def clip_losses(clip: CLIPModel, pixel_values, ids, mask, dense_targets) -> dict[str, torch.Tensor]:
    """Symmetric InfoNCE over the batch (texts beyond the first B are hard negatives of image i - B), plus the
    dense loss on the patch tokens the LLaVA model reads."""
    vision = clip.get_image_features(pixel_values=pixel_values, output_hidden_states=True)
    images = F.normalize(vision.pooler_output, dim=-1)
    texts = F.normalize(clip.get_text_features(input_ids=ids, attention_mask=mask).pooler_output, dim=-1)
    n = images.shape[0]
    logits = clip.logit_scale.exp().clamp(max=100.0) * images @ texts.T  # [B, 2B]
    target = torch.arange(n)
    loss = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits[:, :n].T, target))
    with torch.no_grad():
        retrieval = (logits.argmax(dim=1) == target).float().mean()
        beats_negative = (logits[target, target] > logits[target, target + n]).float().mean()
    dense = dense_losses(clip.dense_heads, vision, dense_targets)
    return {"clip": loss, "retrieval": retrieval, "hard_negative": beats_negative, **dense}

"""Batches and losses of the four v2 training stages (see :mod:`tokensieve.embedded.train`).

- ``clip``: images and captions for :mod:`tokensieve.embedded.clip_stage`, plus the dense per-patch targets;
- ``dense``: the dense per-patch objective alone (:mod:`tokensieve.embedded.dense`);
- ``align`` (LLaVA stage 1, feature alignment): ``<s> <image>x144 answer: <caption> </s>``, loss on the caption;
- ``instruct`` (LLaVA stage 2, visual instruction tuning): multi-turn questions about one image
  (``<s> <image>x144 q1 answer: a1 </s> q2 answer: a2 </s> ...``), loss on the answers; a small share of rows
  hold 2-3 images with answered demonstrations, so in-context prompts stay in distribution.

Every LLaVA batch goes through the plain HF forward (``model(input_ids, pixel_values, attention_mask,
labels)``): no extra heads. The instruction stage adds training-only attention pointer losses
(:mod:`tokensieve.embedded.pointers`), computed from two layers' own inputs captured by hooks on that forward.
"""

from __future__ import annotations

import numpy as np
import torch

from tokensieve.embedded.batches import BatchBuilder, pixel_tensor, pointer_targets
from tokensieve.embedded.clip_stage import caption, caption_ids, clip_losses, hard_negative
from tokensieve.embedded.dense import dense_losses, dense_targets
from tokensieve.embedded.synthetic import ANSWER_MARK, V2, TrainingExample, make_training_example


def examples(
    rng: np.random.Generator, n: int, max_turns: int = 8, family_weights: dict[str, float] | None = None
) -> list[TrainingExample]:
    return [make_training_example(rng, max_turns, V2, family_weights) for _ in range(n)]


def collate(rows: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ids, labels (-100 unsupervised) and attention mask (right padding is fine in training)."""
    length = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), length), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, (ids, row_labels) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(ids)] = torch.tensor(row_labels)
        mask[i, : len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}


def clip_step(clip, builder: BatchBuilder, rng: np.random.Generator, batch_size: int) -> dict[str, torch.Tensor]:
    """Contrastive losses for ``batch_size`` fresh scenes, each with its caption and one hard negative."""
    batch = examples(rng, batch_size, max_turns=1)
    texts = [caption(e.scene) for e in batch] + [hard_negative(e.scene, rng) for e in batch]
    tok = builder.tokenizer
    ids, mask = caption_ids(texts, builder._ids, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    return clip_losses(clip, pixel_tensor([e.image for e in batch]), ids, mask, _dense_targets(batch))


def _dense_targets(batch: list[TrainingExample]) -> dict[str, torch.Tensor]:
    per_image = [dense_targets(e.scene, e.object_tokens) for e in batch]
    return {k: torch.from_numpy(np.stack([t[k] for t in per_image])) for k in per_image[0]}


def dense_step(clip, rng: np.random.Generator, batch_size: int) -> dict[str, torch.Tensor]:
    """The dense objective alone on ``batch_size`` fresh scenes (the vision tower and its dense heads)."""
    batch = examples(rng, batch_size, max_turns=1)
    vision = clip.vision_model(pixel_values=pixel_tensor([e.image for e in batch]), output_hidden_states=True)
    return dense_losses(clip.dense_heads, vision, _dense_targets(batch))


def align_batch(builder: BatchBuilder, rng: np.random.Generator, batch_size: int) -> dict[str, torch.Tensor]:
    """Captioning rows (LLaVA's pretraining format: the image, then its description)."""
    batch = examples(rng, batch_size, max_turns=1)
    rows = []
    for example in batch:
        prompt = [builder.bos_id] + [builder.image_id] * builder.image_tokens + builder._ids(ANSWER_MARK)
        target = builder._ids(caption(example.scene)) + [builder.eos_id]
        rows.append((prompt + target, [-100] * len(prompt) + target))
    return {**collate(rows, builder.pad_id), "pixel_values": pixel_tensor([e.image for e in batch])}


def instruct_batch(
    builder: BatchBuilder,
    rng: np.random.Generator,
    batch_size: int,
    multi_image_fraction: float,
    caption_fraction: float = 0.0,
    with_pointers: bool = False,
    family_weights: dict[str, float] | None = None,
) -> dict[str, torch.Tensor]:
    """Multi-turn question rows; with probability ``multi_image_fraction`` half as many 2-3 image rows, and
    with probability ``caption_fraction`` a captioning batch (LLaVA's stage-2 mix keeps caption data too).
    ``with_pointers`` adds the targets of :mod:`tokensieve.embedded.pointers` (the data stream is unchanged);
    ``family_weights`` weights the primary question's family of the single-image rows."""
    if caption_fraction > 0 and rng.random() < caption_fraction:
        return align_batch(builder, rng, batch_size)
    if rng.random() < multi_image_fraction:
        segments = []
        for _ in range(max(1, batch_size // 2)):
            demos = examples(rng, int(rng.integers(1, 3)), max_turns=1)
            segments.append(demos + examples(rng, 1, max_turns=2))
    else:
        segments = [[e] for e in examples(rng, batch_size, family_weights=family_weights)]
    encoded = [builder.row_with_pointers(row) for row in segments]
    batch = collate([(ids, labels) for ids, labels, _ in encoded], builder.pad_id)
    if with_pointers:
        batch.update(pointer_targets(encoded, batch["input_ids"].shape[1]))
    images = [e.image for row in segments for e in row]
    return {**batch, "pixel_values": pixel_tensor(images)}


def lm_losses(model, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF's own loss on the supervised tokens, plus the visual-token statistics that reveal a collapse."""
    output = model(**batch)
    losses = {"loss": output.loss}
    with torch.no_grad():
        features = torch.cat(list(output.image_outputs.pooler_output)).float()  # [images * tokens, D]
        losses["feat_norm"] = features.norm(dim=-1).mean()
    return losses

"""Training batches of ``scripts/kv_train.py``: length mixes, and padded (ids, labels) of task sequences."""

from __future__ import annotations

import random

import torch

from .tasks import PAD, TASKS, repeat_sequence, training_sequence


def parse_weights(text: str) -> tuple[list[int], list[float]]:
    pairs = [p.split(":") for p in text.split(",")]
    return [int(a) for a, _ in pairs], [float(b) for _, b in pairs]


def batch(rng: random.Random, length: int, tokens_per_step: int, extra: int, task_weights: list[float],
          key_label: bool = False, repeat: float = 0.0,
          group: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(1, tokens_per_step // length)
    seqs = []
    short = length < 128  # warm-up lengths: fewer distractors, and no multikey (its 16 needles do not fit)
    weights = [0.0 if short and t == "multikey" else w for t, w in zip(TASKS, task_weights, strict=True)]
    distract = (2, max(3, length // 8)) if short else (4, 16)
    for _ in range(n):
        if rng.random() < repeat:  # an induction sequence (a copied span), the lookup's simplest form
            seqs.append(repeat_sequence(length, rng))
            continue
        task = rng.choices(TASKS, weights=weights)[0]
        seqs.append(training_sequence(length, rng, extra=extra, task=task, distract=distract, key_label=key_label,
                                       group=group))
    width = max(len(t) for t, _ in seqs)
    ids = torch.full((n, width), PAD, dtype=torch.long)
    labels = torch.full((n, width), -100, dtype=torch.long)
    for i, (t, y) in enumerate(seqs):
        ids[i, : len(t)] = torch.tensor(t)
        labels[i, : len(y)] = torch.tensor(y)
    return ids, labels


def draw_length(frac: float, rng: random.Random, lengths: list[int], weights: list[float], warm: float,
                warm_lengths: tuple[list[int], list[float]]) -> int:
    if frac < warm:
        lengths, weights = warm_lengths
    return rng.choices(lengths, weights=weights)[0]

"""Greedy-decoding evaluation of a VLM on synthetic samples."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch

from tokensieve.embedded.synthetic import FAMILIES, Sample, prompt_for


def answer(model, processor, samples: Sequence[Sample], batch_size: int = 16, max_new_tokens: int = 2) -> list[str]:
    """Greedy answers (new tokens only, special tokens removed) for ``samples``.

    Prompts are left-padded so that every row's answer starts right after its prompt. ``model.generate``
    is called on the object given, so wrappers that hook it (pruning) are exercised.
    """
    tokenizer = processor.tokenizer
    original_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    predictions: list[str] = []
    try:
        for start in range(0, len(samples), batch_size):
            batch = samples[start : start + batch_size]
            images = []
            for sample in batch:
                images.extend(sample.image if isinstance(sample.image, list) else [sample.image])
            inputs = processor(images=images, text=[prompt_for(s) for s in batch], return_tensors="pt", padding=True)
            inputs = {k: v.to(device) for k, v in inputs.items()}
            inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
            with torch.inference_mode():
                output = model.generate(
                    **inputs,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                )
            new_tokens = output[:, inputs["input_ids"].shape[1] :]
            decoded = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
            predictions.extend(" ".join(text.split()) for text in decoded)
    finally:
        tokenizer.padding_side = original_side
    return predictions


def accuracy(samples: Sequence[Sample], predictions: Sequence[str]) -> dict[str, float]:
    """Exact-match accuracy per family present in ``samples`` plus ``"mean"`` (unweighted over families)."""
    if len(samples) != len(predictions):
        raise ValueError(f"{len(samples)} samples but {len(predictions)} predictions")
    correct: dict[str, list[bool]] = defaultdict(list)
    for sample, prediction in zip(samples, predictions, strict=True):
        correct[sample.family].append(" ".join(prediction.split()) == sample.answer)
    ordered = [f for f in FAMILIES if f in correct] + sorted(set(correct) - set(FAMILIES))
    result = {family: sum(correct[family]) / len(correct[family]) for family in ordered}
    result["mean"] = sum(result.values()) / len(result) if result else 0.0
    return result

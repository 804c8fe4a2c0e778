"""Tests of the embedded default: synthetic tasks, offline processor, and the shipped trained model."""

from __future__ import annotations

import hashlib
from collections import Counter

import numpy as np
import pytest
import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from tokensieve.embedded import synthetic
from tokensieve.embedded.batches import BatchBuilder, pixel_tensor
from tokensieve.embedded.build import EMBEDDED_DIR, build_processor, build_tokenizer, load_embedded
from tokensieve.embedded.check import layout_of
from tokensieve.embedded.evaluate import accuracy, answer
from tokensieve.embedded.synthetic import (
    ANSWERS,
    FAMILIES,
    GRID,
    TrainingExample,
    make_incontext,
    make_split,
    prompt_for,
)

# Minimum per-family accuracy of the shipped model on the first 40 test samples per family: the project's
# target, 0.90 on every family. The shipped v2 weights (seventh run) score 1.00 / 1.00 / 0.95 / 1.00 / 1.00 on
# these 40, and 1.00 / 1.00 / 0.935 / 1.00 / 0.99 on 200 per family (color / exist / count / position / read):
# counting is the family closest to the floor (issue 11, docs/embedded.md).
SHIPPED_MIN_ACCURACY = dict.fromkeys(("color", "exist", "count", "position", "read"), 0.90)
# v1 answers from an object's centre token, so keeping 11% of the visual tokens at random must cost at least this
# much mean accuracy; v2 spreads an object over its 4-16 tokens, so a random 11% must keep at least
# MIN_RANDOM_RETENTION of the unpruned accuracy (issue 11's target) and still cost something.
RANDOM_KEEP_RATIO, MIN_RANDOM_PRUNING_DROP, MIN_RANDOM_RETENTION = 0.11, 0.15, 0.60


def _image_digest(image) -> str:
    return hashlib.sha1(np.asarray(image).tobytes()).hexdigest()


def _key(sample) -> tuple[str, str, str]:
    return _image_digest(sample.image), sample.question, sample.answer


def test_generator_is_deterministic():
    first, second = make_split("val", 3), make_split("val", 3)
    assert [_key(s) for s in first] == [_key(s) for s in second]
    assert [s.relevant_tokens for s in first] == [s.relevant_tokens for s in second]
    train_a, train_b = make_split("train", 2, seed=5), make_split("train", 2, seed=5)
    assert [_key(s) for s in train_a] == [_key(s) for s in train_b]
    assert [_key(s) for s in make_split("train", 2, seed=6)] != [_key(s) for s in train_a]
    assert [_key(s) for s in make_split("test", 2, seed=123)] == [_key(s) for s in make_split("test", 2)]


def test_splits_are_disjoint():
    splits = ("train", "val", "test")
    images = {split: {_image_digest(s.image) for s in make_split(split, 12, seed=0)} for split in splits}
    assert not images["train"] & images["val"]
    assert not images["train"] & images["test"]
    assert not images["val"] & images["test"]


def test_answers_are_balanced_per_family():
    samples = make_split("test", 40)
    assert [s.family for s in samples].count("read") == 40
    for family in FAMILIES:
        counts = Counter(s.answer for s in samples if s.family == family)
        assert set(counts) == set(ANSWERS[family])
        assert max(counts.values()) - min(counts.values()) <= 1, (family, counts)


def test_answers_are_short_and_in_vocabulary():
    tokenizer = build_tokenizer()
    for family, answers in ANSWERS.items():
        for reply in answers:
            ids = tokenizer(reply, add_special_tokens=False)["input_ids"]
            assert 1 <= len(ids) <= 2, (family, reply)
            assert tokenizer.unk_token_id not in ids
    for sample in make_split("val", 4) + make_incontext(5):
        ids = tokenizer(prompt_for(sample))["input_ids"]
        assert tokenizer.unk_token_id not in ids, prompt_for(sample)


def test_samples_are_well_formed():
    for sample in make_split("val", 6):
        assert sample.family in FAMILIES
        assert sample.image.size == (synthetic.IMAGE_SIZE, synthetic.IMAGE_SIZE)
        assert sample.image.mode == "RGB"
        assert sample.relevant_tokens and all(0 <= t < GRID * GRID for t in sample.relevant_tokens)
        assert prompt_for(sample).count(synthetic.IMAGE_TOKEN) == 1


def test_incontext_prompts_have_one_placeholder_per_image():
    samples = make_incontext(10, shots=2)
    assert [s.family for s in samples[:5]] == list(FAMILIES)
    for sample in samples:
        assert isinstance(sample.image, list) and len(sample.image) == 3
        assert len(sample.context) == 2
        assert prompt_for(sample).count(synthetic.IMAGE_TOKEN) == 3
        assert prompt_for(sample).endswith(f"{sample.question} {synthetic.ANSWER_MARK}")


def test_processor_expands_image_tokens():
    processor = build_processor()
    image_id = processor.tokenizer.convert_tokens_to_ids(synthetic.IMAGE_TOKEN)
    per_image = GRID * GRID
    single = make_split("val", 1)[:2]
    texts = [prompt_for(s) for s in single]
    inputs = processor(images=[s.image for s in single], text=texts, return_tensors="pt", padding=True)
    assert inputs["pixel_values"].shape == (2, 3, synthetic.IMAGE_SIZE, synthetic.IMAGE_SIZE)
    assert (inputs["input_ids"] == image_id).sum(dim=1).tolist() == [per_image, per_image]
    multi = make_incontext(1, shots=2)[0]
    inputs = processor(images=multi.image, text=[prompt_for(multi)], return_tensors="pt")
    assert int((inputs["input_ids"] == image_id).sum()) == 3 * per_image


def test_training_inputs_match_the_processor():
    """The training fast path (ids and pixels) reproduces what the processor feeds the model at test time."""
    processor = build_processor()
    sample = make_split("val", 1)[2]
    inputs = processor(images=[sample.image], text=[prompt_for(sample)], return_tensors="pt")
    builder = BatchBuilder(processor.tokenizer, GRID * GRID)
    example = TrainingExample(sample.image, [(sample.question, sample.answer)], labels=None)
    ids, labels = builder.row([example])
    prompt_ids = inputs["input_ids"][0].tolist()
    assert ids[: len(prompt_ids)] == prompt_ids
    tokenizer = processor.tokenizer
    target = tokenizer.convert_tokens_to_ids(sample.answer.split()) + [tokenizer.eos_token_id]
    assert ids[len(prompt_ids) :] == target
    assert labels[len(prompt_ids) :] == target
    assert torch.equal(pixel_tensor([sample.image]), inputs["pixel_values"])


@pytest.fixture(scope="module")
def shipped():
    if not (EMBEDDED_DIR / "model.safetensors").exists():
        pytest.skip("embedded weights not present")
    torch.set_num_threads(2)
    return load_embedded()


def test_shipped_model_is_small_and_plain(shipped):
    model, processor = shipped
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    total_bytes = sum(p.stat().st_size for p in EMBEDDED_DIR.iterdir() if p.is_file())
    assert total_bytes <= 25 * 1024 * 1024
    assert processor.tokenizer.padding_side == "left"


def test_shipped_model_accuracy(shipped):
    model, processor = shipped
    samples = make_split("test", 40)
    scores = accuracy(samples, answer(model, processor, samples, batch_size=40))
    for family in FAMILIES:
        assert scores[family] >= SHIPPED_MIN_ACCURACY[family], scores


def _answer_with_random_tokens(model, processor, samples, keep_ratio: float, seed: int = 0) -> list[str]:
    """Greedy answers when only a random subset of each image's visual tokens reaches the LM (plain HF)."""
    tokenizer = processor.tokenizer
    generator = torch.Generator().manual_seed(seed)
    texts = [prompt_for(s) for s in samples]
    inputs = processor(images=[s.image for s in samples], text=texts, return_tensors="pt", padding=True)
    ids = inputs["input_ids"]
    with torch.inference_mode():
        features = model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
        kept_features, keep_positions = [], torch.ones_like(ids, dtype=torch.bool)
        for row, image_features in enumerate(features):
            n_tokens = image_features.shape[0]
            keep = torch.randperm(n_tokens, generator=generator)[: round(keep_ratio * n_tokens)].sort().values
            dropped = torch.ones(n_tokens, dtype=torch.bool)
            dropped[keep] = False
            image_positions = (ids[row] == model.config.image_token_id).nonzero().squeeze(1)
            keep_positions[row, image_positions[dropped]] = False
            kept_features.append(image_features[keep])
        pruned_ids = ids[keep_positions].view(len(samples), -1)
        output = model.generate(
            input_ids=pruned_ids,
            attention_mask=inputs["attention_mask"][keep_positions].view(len(samples), -1),
            mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=kept_features)},
            max_new_tokens=2,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    decoded = tokenizer.batch_decode(output[:, pruned_ids.shape[1] :], skip_special_tokens=True)
    return [" ".join(text.split()) for text in decoded]


def test_random_pruning_costs_accuracy(shipped):
    model, processor = shipped
    samples = make_split("test", 40)  # in the shipped model's layout
    full = accuracy(samples, answer(model, processor, samples, batch_size=40))["mean"]
    kept_all = _answer_with_random_tokens(model, processor, samples[:20], keep_ratio=1.0)
    assert kept_all == answer(model, processor, samples[:20])
    pruned_answers = _answer_with_random_tokens(model, processor, samples, RANDOM_KEEP_RATIO)
    pruned = accuracy(samples, pruned_answers)["mean"]
    if layout_of(model) == "v1":
        assert full - pruned >= MIN_RANDOM_PRUNING_DROP, (full, pruned)
    else:
        assert MIN_RANDOM_RETENTION * full <= pruned < full, (full, pruned)

"""Training batches of the embedded model: token ids with answer-only labels, CLIP-normalised pixels, and the
v1 recipe's auxiliary targets (per-token labels, attention pointers) that the v2 stages ignore."""

from __future__ import annotations

import numpy as np
import torch

from tokensieve.embedded.synthetic import ANSWER_MARK, COLORS, GRID, SHAPE_PLURALS, SHAPES, TrainingExample

ATTRIBUTE_WORDS = frozenset(COLORS + SHAPES + tuple(SHAPE_PLURALS.values()))
CLIP_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)
CLIP_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)


def pixel_tensor(images) -> torch.Tensor:
    """CLIP-normalised pixels, identical to ``LlavaImageProcessorPil`` for 224x224 inputs."""
    arrays = np.stack([np.asarray(image, dtype=np.uint8) for image in images])
    pixels = torch.from_numpy(arrays).permute(0, 3, 1, 2).float().div_(255.0)
    return (pixels - CLIP_MEAN) / CLIP_STD


class BatchBuilder:
    """Turns training examples into token ids, answer labels, pixels and aux targets."""

    def __init__(self, tokenizer, image_tokens: int, spread_pointers: bool = False, sink_weight: float = 1.0) -> None:
        if sink_weight <= 0:
            raise ValueError(
                f"sink_weight must be > 0 (the start token's share against one object's), got {sink_weight}"
            )
        self.tokenizer = tokenizer
        self.image_tokens = image_tokens
        self.spread_pointers = spread_pointers  # pointers on every token of the objects, not their centres
        # The start token's target weight, one object's being 1 (its share is w / (w + n) for n matches). Larger
        # w spreads the shares of large counts, but w = 4 counted worse than w = 1 in the sixth run (docs/embedded.md).
        self.sink_weight = sink_weight
        self.image_id = tokenizer.convert_tokens_to_ids("<image>")
        self.bos_id, self.eos_id, self.pad_id = (
            tokenizer.bos_token_id,
            tokenizer.eos_token_id,
            tokenizer.pad_token_id,
        )
        self._cache: dict[str, list[int]] = {}

    def _ids(self, text: str) -> list[int]:
        if text not in self._cache:
            ids = self.tokenizer.convert_tokens_to_ids(text.split())
            if self.tokenizer.unk_token_id in ids:
                raise ValueError(f"out-of-vocabulary word in {text!r}")
            self._cache[text] = ids
        return self._cache[text]

    def row(self, segments: list[TrainingExample]) -> tuple[list[int], list[int]]:
        """Ids and labels (-100 where unsupervised) for one row of one or more images with their turns."""
        ids, labels, _ = self.row_with_pointers(segments)
        return ids, labels

    def row_with_pointers(self, segments: list[TrainingExample]) -> tuple[list[int], list[int], list]:
        """Like :meth:`row`, plus per turn (position of ``answer:``, target key weights by position, positions
        of the question's attribute words) for the pointer losses; the sequence start (position 0) is a target
        for existence/count questions."""
        ids, labels, pointers = [self.bos_id], [-100], []
        for segment in segments:
            image_start = len(ids)
            ids += [self.image_id] * self.image_tokens
            labels += [-100] * self.image_tokens
            for turn, (question, reply) in enumerate(segment.turns):
                prompt = self._ids(f"{question} {ANSWER_MARK}")
                target = self._ids(reply) + [self.eos_id]
                ids += prompt + target
                labels += [-100] * len(prompt) + target
                if turn < len(segment.pointers):
                    keys = self._pointer_keys(segment, turn, image_start)
                    prompt_start = len(ids) - len(target) - len(prompt)
                    words = [prompt_start + i for i, w in enumerate(question.split()) if w in ATTRIBUTE_WORDS]
                    if keys and words:
                        # Every position that predicts an answer word points at the object: the ``answer:``
                        # token and, for two-word answers ("top left"), the first answer word too; without
                        # the second the model never learned to read the column back.
                        first_query = len(ids) - len(target) - 1
                        pointers += [(first_query + j, keys, words) for j in range(len(target) - 1)]
        return ids, labels, pointers

    def _pointer_keys(self, segment: TrainingExample, turn: int, image_start: int) -> dict[int, float]:
        """Unnormalised target weights by position: one per matching object's centre token (v1), or with
        ``spread_pointers`` one per matching object shared by all the tokens it covers; ``sink_weight`` for the
        start."""
        keys: dict[int, float] = {}
        if self.spread_pointers and segment.object_tokens is not None:
            objects, with_start = segment.pointer_objects[turn]
            for index in objects:
                tokens = segment.object_tokens[index]
                for token in tokens:
                    keys[image_start + token] = keys.get(image_start + token, 0.0) + 1.0 / len(tokens)
        else:
            anchors, with_start = segment.pointers[turn]
            keys = {image_start + anchor: 1.0 for anchor in anchors}
        if with_start:
            keys[0] = keys.get(0, 0.0) + self.sink_weight
        return keys

    def batch(self, rows: list[list[TrainingExample]]) -> dict[str, torch.Tensor]:
        encoded = [self.row_with_pointers(segments) for segments in rows]
        length = max(len(ids) for ids, _, _ in encoded)
        input_ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), length), -100, dtype=torch.long)
        attention = torch.zeros((len(rows), length), dtype=torch.long)
        for i, (ids, row_labels, _) in enumerate(encoded):  # right padding is fine for causal training
            input_ids[i, : len(ids)] = torch.tensor(ids)
            labels[i, : len(ids)] = torch.tensor(row_labels)
            attention[i, : len(ids)] = 1
        examples = [segment for segments in rows for segment in segments]
        return {
            "input_ids": input_ids,
            "labels": labels,
            "attention_mask": attention,
            "pixel_values": pixel_tensor([e.image for e in examples]),
            **pointer_targets(encoded, length),
            **_aux_targets(examples),
        }


def pointer_targets(encoded: list[tuple[list[int], list[int], list]], length: int) -> dict[str, torch.Tensor]:
    """Rows, query positions and uniform target distributions over key positions of every pointer."""
    flat = [(i, query, keys, words) for i, (_, _, pointers) in enumerate(encoded) for query, keys, words in pointers]
    pointer_target = torch.zeros((len(flat), length))
    word_target = torch.zeros((len(flat), length))
    for t, (_, _, keys, words) in enumerate(flat):
        total = sum(keys.values())
        for position, weight in keys.items():
            pointer_target[t, position] = weight / total
        word_target[t, words] = 1.0 / len(words)
    return {
        "pointer_row": torch.tensor([f[0] for f in flat], dtype=torch.long),
        "pointer_query": torch.tensor([f[1] for f in flat], dtype=torch.long),
        "pointer_target": pointer_target,
        "word_target": word_target,
    }


def _aux_targets(examples: list[TrainingExample]) -> dict[str, torch.Tensor]:
    """Per-token labels of every image: object class, digit, centre-token anchor, grid row and column."""
    targets = {
        "object": np.stack([e.labels.object_class for e in examples]),
        "digit": np.stack([e.labels.digit for e in examples]),
        "anchor": np.stack([e.labels.anchor for e in examples]),
    }
    grid = np.arange(GRID * GRID)
    targets["row"] = np.broadcast_to(grid // GRID, (len(examples), grid.size))
    targets["col"] = np.broadcast_to(grid % GRID, (len(examples), grid.size))
    return {f"aux_{k}": torch.as_tensor(np.ascontiguousarray(v)) for k, v in targets.items()}

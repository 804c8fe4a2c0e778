"""Synthetic long-context retrieval tasks (RULER analogues with a controlled token layout).

Vocabulary: 0 PAD, 1 BOS, 3 Q, 4 A, 5 NEEDLE; filler 16..255; keys 256..511; values 512..767.
A needle is ``NEEDLE key value``; the question is ``Q key A`` and the answer follows.

Tasks (``make_sample(task, length, rng)``):
- ``single``: one needle in filler (NIAH).
- ``multikey``: 16 needles with distinct keys, one is asked (multi-key NIAH).
- ``multivalue``: one key carries 3 values in 3 scattered needles; the answer lists them in order.
- ``vartrack``: a chain ``x0 = v``, ``x1 = x0``, ... (3 hops) scattered; asked ``x3``, the answer walks the
  chain back: ``x2 x1 x0 v`` (each answer token is one lookup, so each decode step needs other needles).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

PAD, BOS, Q, A, NEEDLE = 0, 1, 3, 4, 5
FILLER = (16, 256)
KEYS = (256, 512)
VALUES = (512, 768)
VOCAB = 768
TASKS = ("single", "multikey", "multivalue", "vartrack")


@dataclass
class Sample:
    prompt: list[int]
    answer: list[int]
    task: str
    needle_pos: list[int]
    others: list[tuple[int, int]]  # (key, value) of the distractor needles, for extra training questions


def group_keys(others: list[list[int]], rng: random.Random, share: float, most: int = 3) -> None:
    """In place: each distractor needle takes the key of the one before it with probability ``share`` (groups of
    at most ``most`` values), which makes multivalue-like key groups among the distractors (training only)."""
    size = 1
    for prev, needle in zip(others, others[1:], strict=False):
        size = size + 1 if size < most and rng.random() < share else 1
        if size > 1:
            needle[1] = prev[1]


def _needles(task: str, rng: random.Random, n_distract: int
             ) -> tuple[list[list[int]], list[int], int, list[list[int]]]:
    """(needles, answer, key asked, distractor needles); needles in order of appearance."""
    keys = rng.sample(range(*KEYS), 24)
    vals = [rng.randrange(*VALUES) for _ in keys]
    if task == "vartrack":
        chain = keys[:4]
        needles = [[NEEDLE, chain[0], vals[0]]] + [[NEEDLE, chain[i], chain[i - 1]] for i in range(1, 4)]
        others = [[NEEDLE, k, v] for k, v in zip(keys[4 : 4 + n_distract], vals[4:], strict=False)]
        return needles, [chain[2], chain[1], chain[0], vals[0]], chain[3], others
    if task == "multivalue":
        needles = [[NEEDLE, keys[0], v] for v in vals[:3]]
        others = [[NEEDLE, k, v] for k, v in zip(keys[3 : 3 + n_distract], vals[3:], strict=False)]
        return needles, vals[:3], keys[0], others
    n = 1 if task == "single" else 16
    needles = [[NEEDLE, k, v] for k, v in zip(keys[:n], vals[:n], strict=True)]
    i = rng.randrange(n)
    return [needles[i]], [vals[i]], keys[i], [x for j, x in enumerate(needles) if j != i]


def make_sample(task: str, length: int, rng: random.Random, n_distract: int = 0, group: float = 0.0) -> Sample:
    """A prompt of exactly ``length`` tokens (BOS ... Q key A) and its answer; ``group``: ``group_keys``'s share
    (0 draws exactly what it always did)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")
    ordered, answer, key, others = _needles(task, rng, n_distract)
    if group > 0:
        group_keys(others, rng, group)
    blocks = [(b, True) for b in ordered] + [(b, False) for b in others]
    body = length - 1 - 3
    n_fill = body - sum(len(b) for b, _ in blocks)
    if n_fill < len(blocks):
        raise ValueError(f"length {length} is too short for task {task}")
    cuts = sorted(rng.sample(range(n_fill + 1), len(blocks)))
    order = list(range(len(ordered)))  # ordered needles keep their order; others go anywhere
    slots = sorted(rng.sample(range(len(blocks)), len(ordered)))
    rest = [i for i in range(len(blocks)) if i not in slots]
    placed: list[list[int] | None] = [None] * len(blocks)
    for s, i in zip(slots, order, strict=True):
        placed[s] = ordered[i]
    for s, j in zip(rest, range(len(others)), strict=True):
        placed[s] = others[j]
    tokens, pos, prev = [BOS], [], 0
    for cut, block in zip(cuts, placed, strict=True):
        tokens += [rng.randrange(*FILLER) for _ in range(cut - prev)]
        prev = cut
        if block in ordered:
            pos.append(len(tokens))
        tokens += block
    tokens += [rng.randrange(*FILLER) for _ in range(n_fill - prev)]
    tokens += [Q, key, A]
    return Sample(tokens, answer, task, pos, [(b[1], b[2]) for b in others])


def training_sequence(length: int, rng: random.Random, extra: int = 6, task: str | None = None,
                      distract: tuple[int, int] = (4, 16), key_label: bool = False,
                      group: float = 0.0) -> tuple[list[int], list[int]]:
    """(tokens, labels) for training: a task (``task``, or drawn uniformly), its question and answer, then up to
    ``extra`` questions on distractor needles (``randrange(*distract)`` of them; multikey always has 15).
    labels[i] is the target of position i (already shifted); -100 off-answer. ``key_label``: the question's key
    token is also labelled with the first answer token (an auxiliary target in place of the trivial ``A``: there
    the lookup is a plain induction step, "the token after the earlier occurrence of me"). ``group``: share of
    distractors that join the previous one's key (``group_keys``); such a key's question lists all its values."""
    task = task or rng.choice(TASKS)
    sample = make_sample(task, length, rng, n_distract=rng.randrange(*distract), group=group)
    tokens = sample.prompt + sample.answer
    labels = [-100] * (len(sample.prompt) - 1) + sample.answer + [-100]
    if key_label:
        labels[len(sample.prompt) - 2] = sample.answer[0]
    groups: dict[int, list[int]] = {}
    for key, value in sample.others:  # in order of appearance
        groups.setdefault(key, []).append(value)
    for key in rng.sample(list(groups), min(extra, len(groups))):  # MQAR-style extra questions
        values = groups[key]
        tokens += [Q, key, A, *values]
        labels += [-100, values[0] if key_label else -100, *values, -100]
    return tokens, labels


def fits(task: str, length: int, n_distract: int) -> bool:
    """Whether ``make_sample(task, length, rng, n_distract)`` has room (one filler token per needle at least)."""
    needles = {"single": 1, "multikey": 16, "multivalue": 3 + n_distract, "vartrack": 4 + n_distract}[task]
    return length - 4 >= 4 * needles


def repeat_sequence(length: int, rng: random.Random) -> tuple[list[int], list[int]]:
    """(tokens, labels) of an induction sequence: filler with a random span (tokens from the whole non-special
    vocabulary) copied once at a random gap; the copy's tokens after its first are labelled (the next token of
    the copy), so the target is "the token that followed the earlier occurrence of the current one"."""
    span = rng.randint(4, max(4, length // 8))
    start = rng.randrange(1, length - 2 * span + 1)
    second = rng.randrange(start + span, length - span + 1)
    tokens = [BOS] + [rng.randrange(*FILLER) for _ in range(length - 1)]
    copy = [rng.randrange(FILLER[0], VOCAB) for _ in range(span)]
    tokens[start : start + span] = copy
    tokens[second : second + span] = copy
    labels = [-100] * length
    for i in range(second, second + span - 1):
        labels[i] = tokens[i + 1]
    return tokens, labels

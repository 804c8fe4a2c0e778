"""Deterministic synthetic visual-question tasks for the embedded model: samples, splits and prompts.

The pieces live in :mod:`.scenes` (layouts, objects, rendering), :mod:`.questions` (the five families and the
scenes built for them), :mod:`.derived` (extra training turns) and :mod:`.vocabulary` (words and the prompt
format); this module assembles them into samples and splits and re-exports their public names.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from .derived import centre_tokens, derive_question, matching_objects, pointer_target
from .questions import _pick, build, new_scene, quadrant_of
from .scenes import (  # noqa: F401  (re-exported)
    ANSWERS,
    CELL_PX,
    CELL_TOKENS,
    CELLS,
    COLOR_RGB,
    COLORS,
    COVER_PIXELS,
    DARK_COLORS,
    DIGIT_PROBABILITY,
    DIGITS,
    FAMILIES,
    GRID,
    IMAGE_SIZE,
    LAYOUTS,
    MAX_COUNT,
    PATCH_SIZE,
    QUADRANTS,
    SHAPE_PLURALS,
    SHAPES,
    V1,
    V2,
    Layout,
    Scene,
    SceneObject,
    TokenLabels,
    get_layout,
    glyph_mask,
    render_scene,
)
from .vocabulary import (  # noqa: F401  (re-exported)
    ANSWER_MARK,
    ANSWER_WORDS,
    CAPTION_WORDS,
    END_OF_ANSWER,
    IMAGE_TOKEN,
    QUESTION_WORDS,
    V2_VOCABULARY_WORDS,
    VOCABULARY_WORDS,
    turn_text,
)

__all__ = [
    "Sample",
    "TrainingExample",
    "check_family_weights",
    "derive_question",
    "make_incontext",
    "make_sample",
    "make_split",
    "make_training_example",
    "pointer_target",
    "prompt_for",
    "quadrant_of",
]

SPLIT_CODES = {"train": 0, "val": 1, "test": 2, "incontext": 3}
FIXED_SPLIT_SEEDS = {"val": 1_000_003, "test": 2_000_003}


@dataclass
class Sample:
    """One visual question.

    ``image`` is a PIL image, or a list of them for in-context prompts (demonstrations first, query last).
    ``relevant_tokens`` indexes the (query) image's GRID x GRID patch grid (row-major) for the objects the
    question is about. ``context`` holds the (question, answer) pairs of in-context demonstrations.
    """

    image: Image.Image | list[Image.Image]
    question: str
    answer: str
    family: str
    relevant_tokens: list[int]
    context: list[tuple[str, str]] = field(default_factory=list)


def _tokens_of(covered: dict[int, list[int]], object_indices: list[int]) -> list[int]:
    return sorted({t for i in object_indices for t in covered[i]})


@dataclass
class TrainingExample:
    """One training image with several (question, answer) turns and its per-token labels.

    ``pointers[i]`` is, for turn ``i``, the grid indices of the centre tokens of the objects its question
    describes and whether the sequence start (a "nothing / how many" sink) belongs to the target too;
    ``pointer_objects[i]`` names those objects by index instead (v2 spreads its pointer over all their tokens).
    """

    image: Image.Image
    turns: list[tuple[str, str]]
    labels: TokenLabels | None
    pointers: list[tuple[list[int], bool]] = field(default_factory=list)
    scene: Scene | None = None
    object_tokens: dict[int, list[int]] | None = None  # per object index, the grid tokens it covers
    pointer_objects: list[tuple[list[int], bool]] = field(default_factory=list)


def make_training_example(
    rng: np.random.Generator,
    max_turns: int = 8,
    layout: Layout | str | None = None,
    family_weights: dict[str, float] | None = None,
) -> TrainingExample:
    """A random scene built for one balanced primary question, plus derived questions (other families
    first, then further ones in rounds), without repeating a question; turns are shuffled.

    ``family_weights`` (default: all 1) weights the primary question's family, as a data mix would."""
    family = _pick(rng, FAMILIES) if family_weights is None else _weighted_family(rng, family_weights)
    answer = _pick(rng, ANSWERS[family])
    layout = get_layout(layout)
    objects, question, _ = build(family, answer, rng, layout)
    scene = new_scene(objects, rng, layout)
    image, labels, object_tokens = render_scene(scene, rng)
    turns = {question: answer}
    others = [f for f in FAMILIES if f != family]
    rounds = [others[i] for i in rng.permutation(len(others))] + [FAMILIES[i] for i in rng.permutation(len(FAMILIES))]
    for other in rounds:
        if len(turns) >= max_turns:
            break
        derived = derive_question(scene, other, rng)
        if derived is not None and derived[0] not in turns:
            turns[derived[0]] = derived[1]
    pairs = list(turns.items())
    pairs = [pairs[i] for i in rng.permutation(len(pairs))]
    matches = [matching_objects(scene, question) for question, _ in pairs]
    return TrainingExample(
        image=image,
        turns=pairs,
        labels=labels,
        pointers=[(centre_tokens(scene, objects), with_start) for objects, with_start in matches],
        scene=scene,
        object_tokens=object_tokens,
        pointer_objects=matches,
    )


def check_family_weights(weights: dict[str, float]) -> None:
    """Refuse a primary-question mix with unknown families, negative weights or no weight at all."""
    unknown = set(weights) - set(FAMILIES)
    if unknown or any(w < 0 for w in weights.values()) or not any(weights.get(f, 1.0) for f in FAMILIES):
        raise ValueError(f"family_weights takes non-negative weights for {FAMILIES}, got {weights}")


def _weighted_family(rng: np.random.Generator, weights: dict[str, float]) -> str:
    check_family_weights(weights)
    p = np.array([weights.get(f, 1.0) for f in FAMILIES], dtype=float)
    return FAMILIES[int(rng.choice(len(FAMILIES), p=p / p.sum()))]


def make_sample(family: str, answer: str, rng: np.random.Generator, layout: Layout | str | None = None) -> Sample:
    """One single-image sample of ``family`` whose answer is ``answer``."""
    layout = get_layout(layout)
    objects, question, relevant = build(family, answer, rng, layout)
    scene = new_scene(objects, rng, layout)
    image, _, covered = render_scene(scene, rng)
    return Sample(image, question, answer, family, _tokens_of(covered, relevant))


def _rng(split: str, seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng([SPLIT_CODES[split], seed, *keys])


def make_split(
    split: str, n_per_family: int, seed: int | None = None, layout: Layout | str | None = None
) -> list[Sample]:
    """``n_per_family`` samples of every family, answers cycling evenly over the family's answer set.

    ``layout`` (a :class:`Layout` or its name) defaults to the shipped model's scene layout.

    ``"val"`` and ``"test"`` are fixed by their name (``seed`` is ignored); ``"train"`` draws from the
    stream selected by ``seed`` (default 0). Splits use disjoint random streams.
    """
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be 'train', 'val' or 'test', not {split!r}")
    layout = get_layout(layout)
    stream_seed = FIXED_SPLIT_SEEDS[split] if split in FIXED_SPLIT_SEEDS else (seed or 0)
    samples = []
    for family_index, family in enumerate(FAMILIES):
        answers = ANSWERS[family]
        for i in range(n_per_family):
            rng = _rng(split, stream_seed, family_index, i)
            samples.append(make_sample(family, answers[i % len(answers)], rng, layout))
    return samples


def make_incontext(n_queries: int, shots: int = 2, seed: int = 0, layout: Layout | str | None = None) -> list[Sample]:
    """Multi-image prompts: ``shots`` answered demonstrations of the same family, then one query image.

    Families cycle over :data:`FAMILIES`; ``Sample.image`` is the list of images (query last) and
    ``relevant_tokens`` refers to the query image.
    """
    layout = get_layout(layout)
    samples = []
    for i in range(n_queries):
        family = FAMILIES[i % len(FAMILIES)]
        rng = _rng("incontext", seed, i)
        answers = ANSWERS[family]
        demos = [make_sample(family, _pick(rng, answers), rng, layout) for _ in range(shots)]
        query = make_sample(family, answers[(i // len(FAMILIES)) % len(answers)], rng, layout)
        samples.append(
            Sample(
                image=[d.image for d in demos] + [query.image],
                question=query.question,
                answer=query.answer,
                family=family,
                relevant_tokens=query.relevant_tokens,
                context=[(d.question, d.answer) for d in demos],
            )
        )
    return samples


def prompt_for(sample: Sample) -> str:
    """The exact prompt string for the processor: one ``<image>`` per image, demonstrations answered."""
    parts = [f"{IMAGE_TOKEN} {turn_text(q, a)}" for q, a in sample.context]
    parts.append(f"{IMAGE_TOKEN} {turn_text(sample.question)}")
    return " ".join(parts)

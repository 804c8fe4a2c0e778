"""Questions derived from an existing scene (the extra turns of a training example) and their pointer targets."""

from __future__ import annotations

import numpy as np

from .questions import _pick, quadrant_of
from .scenes import COLORS, FAMILIES, GRID, MAX_COUNT, SHAPE_PLURALS, SHAPES, Scene

Derived = tuple[str, str, list[int]] | None  # (question, answer, relevant object indices)


def _derive_color(scene: Scene, rng: np.random.Generator) -> Derived:
    pairs = [(o.shape, o.color) for o in scene.objects]
    options = []
    for i, o in enumerate(scene.objects):
        if sum(s == o.shape for s, _ in pairs) == 1:
            options.append((f"what color is the {o.shape} ?", o.color, [i]))
        if sum(c == o.color for _, c in pairs) == 1:
            options.append((f"what shape is the {o.color} object ?", o.shape, [i]))
    return options[int(rng.integers(len(options)))] if options else None


def _derive_exist(scene: Scene, rng: np.random.Generator) -> Derived:
    objects = scene.objects
    pairs = [(o.shape, o.color) for o in objects]
    if rng.random() < 0.5:
        o = objects[int(rng.integers(len(objects)))]
        same = [j for j, p in enumerate(pairs) if p == (o.shape, o.color)]
        return f"is there a {o.color} {o.shape} ?", "yes", same
    absent = [(s, c) for s in SHAPES for c in COLORS if (s, c) not in pairs]
    hard = [(s, c) for s, c in absent if any(p[0] == s for p in pairs) and any(p[1] == c for p in pairs)]
    shape, color = (hard or absent)[int(rng.integers(len(hard or absent)))]
    near = [j for j, p in enumerate(pairs) if p[0] == shape or p[1] == color]
    return f"is there a {color} {shape} ?", "no", near


def _derive_count(scene: Scene, rng: np.random.Generator) -> Derived:
    pairs = [(o.shape, o.color) for o in scene.objects]
    if rng.random() < 0.5:
        shape = _pick(rng, SHAPES)
        hits = [j for j, p in enumerate(pairs) if p[0] == shape]
        question = f"how many {SHAPE_PLURALS[shape]} ?"
    else:
        color = _pick(rng, COLORS)
        hits = [j for j, p in enumerate(pairs) if p[1] == color]
        question = f"how many {color} objects ?"
    if len(hits) > MAX_COUNT:
        return None
    return question, str(len(hits)), hits or list(range(len(scene.objects)))


def _unique(scene: Scene) -> list[int]:
    pairs = [(o.shape, o.color) for o in scene.objects]
    return [i for i, o in enumerate(scene.objects) if pairs.count((o.shape, o.color)) == 1]


def _derive_position(scene: Scene, rng: np.random.Generator) -> Derived:
    options = [i for i in _unique(scene) if quadrant_of(scene.objects[i], scene.layout) is not None]
    if not options:
        return None
    i = options[int(rng.integers(len(options)))]
    o = scene.objects[i]
    return f"where is the {o.color} {o.shape} ?", quadrant_of(o, scene.layout), [i]


def _derive_read(scene: Scene, rng: np.random.Generator) -> Derived:
    options = [i for i in _unique(scene) if scene.objects[i].digit is not None]
    if not options:
        return None
    i = options[int(rng.integers(len(options)))]
    o = scene.objects[i]
    return f"what number is on the {o.color} {o.shape} ?", o.digit, [i]


_DERIVERS = {
    "color": _derive_color,
    "exist": _derive_exist,
    "count": _derive_count,
    "position": _derive_position,
    "read": _derive_read,
}


def derive_question(scene: Scene, family: str, rng: np.random.Generator) -> Derived:
    """Ask a ``family`` question about an existing scene (used for extra training turns).

    Returns (question, answer, relevant object indices), or None if the scene does not allow one.
    """
    if family not in _DERIVERS:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    return _DERIVERS[family](scene, rng)


def matching_objects(scene: Scene, question: str) -> tuple[list[int], bool]:
    """Indices of the objects matching every colour/shape word of ``question``, and whether the sequence start
    belongs to the target too (existence and counting questions, where matches may be absent)."""
    words = question.split()
    colors = {w for w in words if w in COLORS}
    shapes = {w for w in words if w in SHAPES} | {s for s, plural in SHAPE_PLURALS.items() if plural in words}
    matches = [
        i
        for i, o in enumerate(scene.objects)
        if (not colors or o.color in colors) and (not shapes or o.shape in shapes)
    ]
    return matches, words[0] in ("is", "how")


def centre_tokens(scene: Scene, indices: list[int]) -> list[int]:
    """Grid indices of the centre tokens of the objects ``indices`` (v1's pointer targets)."""
    anchors = [scene.centre_token(scene.objects[i]) for i in indices]
    return [row * GRID + col for row, col in anchors]


def pointer_target(scene: Scene, question: str) -> tuple[list[int], bool]:
    """Centre tokens of the objects :func:`matching_objects` finds, and its sequence-start flag (v1's pointers)."""
    matches, with_start = matching_objects(scene, question)
    return centre_tokens(scene, matches), with_start

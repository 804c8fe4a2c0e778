"""Question families of the synthetic tasks: scenes built for a balanced answer, and questions derived from a scene.

Five families, each with answers balanced over a small word vocabulary:

- ``color``: ``what color is the circle ?`` / ``what shape is the red object ?`` (GQA-like attribute).
- ``exist``: ``is there a red circle ?`` with adversarial negatives (POPE-like).
- ``count``: ``how many circles ?`` / ``how many red objects ?`` with answers 0-5 (CV-Bench-like).
- ``position``: ``where is the red circle ?`` with answers ``top left`` ... ``bottom right``.
- ``read``: ``what number is on the red circle ?`` with answers 0-9 (TextVQA-like, tied to an object).

Every builder draws from ``rng`` in a fixed order, so a split is the same image by image on every machine.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .scenes import (
    COLORS,
    DIGIT_PROBABILITY,
    DIGITS,
    FAMILIES,
    GRID,
    SHAPE_PLURALS,
    SHAPES,
    V1,
    Layout,
    Scene,
    SceneObject,
)

Built = tuple[str, list[int]]  # (question, relevant object indices)


def _pick(rng: np.random.Generator, options: tuple[str, ...] | list[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _free_cells(layout: Layout, scene_objects: list[SceneObject], allowed: list[tuple[int, int]] | None = None) -> list:
    used = {o.cell for o in scene_objects}
    n = layout.cells
    cells = allowed if allowed is not None else [(r, c) for r in range(n) for c in range(n)]
    return [cell for cell in cells if cell not in used]


def _add(
    rng: np.random.Generator,
    layout: Layout,
    objects: list[SceneObject],
    shape: str,
    color: str,
    digit: str | None = None,
    cells: list[tuple[int, int]] | None = None,
    random_digit: bool = True,
) -> int:
    """Place a new object in a random free cell; returns its index."""
    free = _free_cells(layout, objects, cells)
    cell = free[int(rng.integers(len(free)))]
    if digit is None and random_digit and rng.random() < DIGIT_PROBABILITY:
        digit = _pick(rng, DIGITS)
    low = layout.min_digit_size if digit is not None else layout.min_size
    size = int(rng.integers(low, layout.max_size + 1))
    shift = None
    if layout.jitter:
        low, high = 2, layout.cell_px - size - 2  # a 2 px margin keeps neighbours apart
        shift = (int(rng.integers(low, high + 1)), int(rng.integers(low, high + 1)))
    objects.append(SceneObject(shape, color, cell, size, digit, shift))
    return len(objects) - 1


def _add_distractors(rng: np.random.Generator, layout: Layout, objects: list[SceneObject], count: int, allowed) -> None:
    """Add ``count`` random objects whose (shape, color) satisfies ``allowed``."""
    pairs = [(s, c) for s in SHAPES for c in COLORS if allowed(s, c)]
    for _ in range(count):
        shape, color = pairs[int(rng.integers(len(pairs)))]
        _add(rng, layout, objects, shape, color)


def quadrant_of(obj: SceneObject, layout: Layout = V1) -> str | None:
    """Quadrant name of an object's cell, or None for a middle row/column (odd layouts only)."""
    row, col = obj.cell
    half = layout.cells // 2
    if layout.cells % 2 == 1 and (row == half or col == half):
        return None
    return f"{'top' if row < half else 'bottom'} {'left' if col < half else 'right'}"


def _quadrant_cells(quadrant: str, layout: Layout) -> list[tuple[int, int]]:
    n = layout.cells
    cells = [(r, c) for r in range(n) for c in range(n)]
    return [c for c in cells if quadrant_of(SceneObject("square", "red", c, layout.min_size), layout) == quadrant]


# ------------------------------------------------------------------ scenes built for one question and answer


def _build_color(answer: str, rng: np.random.Generator, layout: Layout, objects: list[SceneObject]) -> Built:
    if answer in COLORS:
        shape = _pick(rng, SHAPES)
        target = _add(rng, layout, objects, shape, answer)
        _add_distractors(rng, layout, objects, int(rng.integers(2, 8)), lambda s, c: s != shape)
        return f"what color is the {shape} ?", [target]
    color = _pick(rng, COLORS)
    target = _add(rng, layout, objects, answer, color)
    _add_distractors(rng, layout, objects, int(rng.integers(2, 8)), lambda s, c: c != color)
    return f"what shape is the {color} object ?", [target]


def _build_exist(answer: str, rng: np.random.Generator, layout: Layout, objects: list[SceneObject]) -> Built:
    shape, color = _pick(rng, SHAPES), _pick(rng, COLORS)
    relevant = []
    if answer == "yes":
        relevant += [_add(rng, layout, objects, shape, color) for _ in range(1 + int(rng.random() < 0.2))]
    # Adversarial near-misses appear for both answers, so their presence says nothing.
    if answer == "no" or rng.random() < 0.7:
        relevant.append(_add(rng, layout, objects, shape, _pick(rng, [c for c in COLORS if c != color])))
    if answer == "no" or rng.random() < 0.7:
        relevant.append(_add(rng, layout, objects, _pick(rng, [s for s in SHAPES if s != shape]), color))
    _add_distractors(rng, layout, objects, int(rng.integers(1, 6)), lambda s, c: (s, c) != (shape, color))
    return f"is there a {color} {shape} ?", relevant


def _build_count(answer: str, rng: np.random.Generator, layout: Layout, objects: list[SceneObject]) -> Built:
    n = int(answer)
    if rng.random() < 0.5:
        shape = _pick(rng, SHAPES)
        relevant = [_add(rng, layout, objects, shape, _pick(rng, COLORS)) for _ in range(n)]
        _add_distractors(rng, layout, objects, int(rng.integers(1, 10 - n)), lambda s, c: s != shape)
        question = f"how many {SHAPE_PLURALS[shape]} ?"
    else:
        color = _pick(rng, COLORS)
        relevant = [_add(rng, layout, objects, _pick(rng, SHAPES), color) for _ in range(n)]
        _add_distractors(rng, layout, objects, int(rng.integers(1, 10 - n)), lambda s, c: c != color)
        question = f"how many {color} objects ?"
    return question, relevant if n else list(range(len(objects)))


def _build_position(answer: str, rng: np.random.Generator, layout: Layout, objects: list[SceneObject]) -> Built:
    shape, color = _pick(rng, SHAPES), _pick(rng, COLORS)
    target = _add(rng, layout, objects, shape, color, cells=_quadrant_cells(answer, layout))
    _add_distractors(rng, layout, objects, int(rng.integers(2, 8)), lambda s, c: (s, c) != (shape, color))
    return f"where is the {color} {shape} ?", [target]


def _build_read(answer: str, rng: np.random.Generator, layout: Layout, objects: list[SceneObject]) -> Built:
    shape, color = _pick(rng, SHAPES), _pick(rng, COLORS)
    target = _add(rng, layout, objects, shape, color, digit=answer)
    other_digits = [d for d in DIGITS if d != answer]
    for _ in range(1 + int(rng.integers(2))):  # same shape or same colour, with a different digit
        if rng.random() < 0.5:
            other_color = _pick(rng, [c for c in COLORS if c != color])
            _add(rng, layout, objects, shape, other_color, _pick(rng, other_digits))
        else:
            other_shape = _pick(rng, [s for s in SHAPES if s != shape])
            _add(rng, layout, objects, other_shape, color, _pick(rng, other_digits))
    _add_distractors(rng, layout, objects, int(rng.integers(1, 5)), lambda s, c: (s, c) != (shape, color))
    return f"what number is on the {color} {shape} ?", [target]


_BUILDERS: dict[str, Callable[..., Built]] = {
    "color": _build_color,
    "exist": _build_exist,
    "count": _build_count,
    "position": _build_position,
    "read": _build_read,
}


def build(
    family: str, answer: str, rng: np.random.Generator, layout: Layout = V1
) -> tuple[list[SceneObject], str, list[int]]:
    """Objects, question and relevant object indices for a question of ``family`` with ``answer``."""
    if family not in _BUILDERS:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    objects: list[SceneObject] = []
    question, relevant = _BUILDERS[family](answer, rng, layout, objects)
    return objects, question, relevant


def new_scene(objects: list[SceneObject], rng: np.random.Generator, layout: Layout = V1) -> Scene:
    """The objects on a randomly offset cell layout over a random background tone."""
    slack = GRID - layout.cells * layout.cell_tokens + 1
    offset = (int(rng.integers(slack)), int(rng.integers(slack)))
    return Scene(objects=objects, offset=offset, background=int(rng.integers(225, 256)), layout=layout)

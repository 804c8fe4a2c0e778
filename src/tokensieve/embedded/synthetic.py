"""Deterministic synthetic visual-question tasks for the embedded model.

Images are 168x168 RGB. With the CLIP patch size of 14 they form a 12x12 grid of 144 visual tokens.
Two scene layouts (:class:`Layout`) share the questions below:

- :data:`V1` (the shipped model v1): objects (square, circle, triangle in six colours, 14-40 px wide) sit
  centred in a 4x4 layout of cells of 3x3 tokens, on a flat background; some carry a small printed digit
  (a 10x14 px glyph) on the centre token of their cell, so reading needs that one token.
- :data:`V2` (model v2): a 3x3 layout of cells of 4x4 tokens; objects are 28-52 px (4-16 tokens) placed
  anywhere inside their cell, with a textured fill, on a textured background (gradient, noise or stripes);
  digits are 20x28 px glyphs spanning several tokens. Visual information is spread over many tokens, as in
  photographs.

Five question families, each with answers balanced over a small word vocabulary:

- ``color``: ``what color is the circle ?`` / ``what shape is the red object ?`` (GQA-like attribute).
- ``exist``: ``is there a red circle ?`` with adversarial negatives (POPE-like).
- ``count``: ``how many circles ?`` / ``how many red objects ?`` with answers 0-5 (CV-Bench-like).
- ``position``: ``where is the red circle ?`` with answers ``top left`` ... ``bottom right``.
- ``read``: ``what number is on the red circle ?`` with answers 0-9 (TextVQA-like, tied to an object).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 168
PATCH_SIZE = 14
GRID = IMAGE_SIZE // PATCH_SIZE  # 12 tokens per side
CELL_TOKENS = 3
CELLS = 4
CELL_PX = CELL_TOKENS * PATCH_SIZE  # 42

FAMILIES: tuple[str, ...] = ("color", "exist", "count", "position", "read")
SHAPES: tuple[str, ...] = ("square", "circle", "triangle")
SHAPE_PLURALS: dict[str, str] = {"square": "squares", "circle": "circles", "triangle": "triangles"}
COLORS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange")
COLOR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 165, 60),
    "blue": (45, 80, 220),
    "yellow": (235, 205, 40),
    "purple": (145, 60, 190),
    "orange": (245, 135, 30),
}
DARK_COLORS = frozenset({"red", "green", "blue", "purple"})  # digits are printed white on these
DIGITS: tuple[str, ...] = tuple(str(d) for d in range(10))
QUADRANTS: tuple[str, ...] = ("top left", "top right", "bottom left", "bottom right")
MAX_COUNT = 5

ANSWERS: dict[str, tuple[str, ...]] = {
    "color": COLORS + SHAPES,
    "exist": ("yes", "no"),
    "count": DIGITS[: MAX_COUNT + 1],
    "position": QUADRANTS,
    "read": DIGITS,
}

QUESTION_WORDS: tuple[str, ...] = (
    "what", "color", "shape", "is", "the", "object", "there", "a", "how", "many", "objects", "where",
    "number", "on", "?", "answer:",
)  # fmt: skip
ANSWER_WORDS: tuple[str, ...] = COLORS + SHAPES + DIGITS + ("yes", "no", "top", "bottom", "left", "right")
VOCABULARY_WORDS: tuple[str, ...] = tuple(dict.fromkeys(QUESTION_WORDS + tuple(SHAPE_PLURALS.values()) + ANSWER_WORDS))
# Caption words (v2's CLIP and alignment stages), after the v1 words so v1's ids are unchanged.
CAPTION_WORDS: tuple[str, ...] = (".", "with")
V2_VOCABULARY_WORDS: tuple[str, ...] = VOCABULARY_WORDS + CAPTION_WORDS

MIN_SIZE, MAX_SIZE, MIN_DIGIT_SIZE = 14, 40, 34


@dataclass(frozen=True)
class Layout:
    """Scene geometry and style: ``cells`` x ``cells`` cells of ``cell_tokens`` x ``cell_tokens`` tokens."""

    name: str
    cells: int
    cell_tokens: int
    min_size: int
    max_size: int
    min_digit_size: int
    glyph_scale: int  # one glyph pixel becomes glyph_scale x glyph_scale image pixels
    jitter: bool  # objects anywhere inside their cell (else centred)
    textured: bool  # textured backgrounds and object fills (else flat)

    @property
    def cell_px(self) -> int:
        return self.cell_tokens * PATCH_SIZE


V1 = Layout("v1", CELLS, CELL_TOKENS, MIN_SIZE, MAX_SIZE, MIN_DIGIT_SIZE, 2, jitter=False, textured=False)
V2 = Layout("v2", 3, 4, 28, 52, 44, 4, jitter=True, textured=True)
LAYOUTS = {"v1": V1, "v2": V2}
DIGIT_PROBABILITY = 0.3
# Token-label threshold: a token belongs to an object when the object covers at least this many pixels of it.
COVER_PIXELS = 30

_GLYPHS = {
    "0": ("01110", "10001", "10011", "10101", "11001", "10001", "01110"),
    "1": ("00100", "01100", "00100", "00100", "00100", "00100", "01110"),
    "2": ("01110", "10001", "00001", "00010", "00100", "01000", "11111"),
    "3": ("11111", "00010", "00100", "00010", "00001", "10001", "01110"),
    "4": ("00010", "00110", "01010", "10010", "11111", "00010", "00010"),
    "5": ("11111", "10000", "11110", "00001", "00001", "10001", "01110"),
    "6": ("00110", "01000", "10000", "11110", "10001", "10001", "01110"),
    "7": ("11111", "00001", "00010", "00100", "01000", "01000", "01000"),
    "8": ("01110", "10001", "10001", "01110", "10001", "10001", "01110"),
    "9": ("01110", "10001", "10001", "01111", "00001", "00010", "01100"),
}


def glyph_mask(digit: str, scale: int) -> np.ndarray:
    """The 5x7 bitmap of ``digit`` with every pixel scaled to ``scale`` x ``scale`` (v1: 10x14 px)."""
    rows = _GLYPHS[digit]
    bitmap = np.array([[c == "1" for c in row] for row in rows], dtype=bool)
    return np.kron(bitmap, np.ones((scale, scale), dtype=bool))


GLYPH_MASKS: dict[str, np.ndarray] = {d: glyph_mask(d, 2) for d in _GLYPHS}

SPLIT_CODES = {"train": 0, "val": 1, "test": 2, "incontext": 3}
FIXED_SPLIT_SEEDS = {"val": 1_000_003, "test": 2_000_003}


@dataclass
class SceneObject:
    """One drawn object: its attributes, its cell (row, col in the layout), its size in px and digit.

    ``shift`` is the (y, x) px offset of its bounding box inside the cell (None: centred, as in v1)."""

    shape: str
    color: str
    cell: tuple[int, int]
    size: int
    digit: str | None = None
    shift: tuple[int, int] | None = None


@dataclass
class Scene:
    """A full image description: objects plus the token offset of the cell layout and the background."""

    objects: list[SceneObject]
    offset: tuple[int, int]  # (row, col) shift of the cell layout in tokens (0 when the cells fill the grid)
    background: int
    layout: Layout = V1

    def box(self, obj: SceneObject) -> tuple[int, int]:
        """(top, left) px of the object's bounding box."""
        lay = self.layout
        top = (self.offset[0] + lay.cell_tokens * obj.cell[0]) * PATCH_SIZE
        left = (self.offset[1] + lay.cell_tokens * obj.cell[1]) * PATCH_SIZE
        shift = obj.shift if obj.shift is not None else ((lay.cell_px - obj.size) // 2,) * 2
        return top + shift[0], left + shift[1]

    def centre_token(self, obj: SceneObject) -> tuple[int, int]:
        """(row, col) of the token at the centre of the object (v1: of its cell)."""
        if obj.shift is None:
            lay = self.layout
            half = lay.cell_tokens // 2
            return (
                self.offset[0] + lay.cell_tokens * obj.cell[0] + half,
                self.offset[1] + lay.cell_tokens * obj.cell[1] + half,
            )
        top, left = self.box(obj)
        return (top + obj.size // 2) // PATCH_SIZE, (left + obj.size // 2) // PATCH_SIZE


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


@dataclass
class TokenLabels:
    """Per-token training targets (flattened GRID x GRID arrays, row-major) derived from a scene."""

    object_class: np.ndarray  # 0 background, 1 + shape_index * 6 + color_index
    digit: np.ndarray  # 0 none, 1 + digit
    anchor: np.ndarray  # 1 on the centre token of every object


# ----------------------------------------------------------------------------------------------- rendering


def _object_mask(obj: SceneObject, layout: Layout = V1) -> np.ndarray:
    """Boolean mask of the object inside its cell (cell_px x cell_px)."""
    side = layout.cell_px
    canvas = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(canvas)
    if obj.shift is None:
        lo_y = lo_x = (side - obj.size) / 2
    else:
        lo_y, lo_x = obj.shift
    hi_y, hi_x = lo_y + obj.size - 1, lo_x + obj.size - 1
    if obj.shape == "square":
        draw.rectangle((lo_x, lo_y, hi_x, hi_y), fill=255)
    elif obj.shape == "circle":
        draw.ellipse((lo_x, lo_y, hi_x, hi_y), fill=255)
    else:
        draw.polygon([((lo_x + hi_x) / 2, lo_y), (hi_x, hi_y), (lo_x, hi_y)], fill=255)
    return np.asarray(canvas) > 127


def _background(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """Flat (v1) or textured (v2: a gradient, pixel noise or stripes around the base tone) background."""
    base = np.full((IMAGE_SIZE, IMAGE_SIZE, 3), scene.background, dtype=np.float32)
    if scene.layout.textured:
        kind = int(rng.integers(4))
        ramp = np.linspace(-1.0, 1.0, IMAGE_SIZE, dtype=np.float32)
        if kind == 1:  # gradient, tinted
            direction = ramp[:, None] if rng.random() < 0.5 else ramp[None, :]
            base += (direction * rng.uniform(8, 22))[..., None] * rng.uniform(0.6, 1.0, size=3)
        elif kind == 2:  # fine noise
            base += rng.normal(0.0, rng.uniform(4, 10), size=base.shape)
        elif kind == 3:  # stripes
            period = int(rng.integers(6, 20))
            stripes = (np.arange(IMAGE_SIZE) // period) % 2 * rng.uniform(8, 18)
            base -= (stripes[:, None] if rng.random() < 0.5 else stripes[None, :])[..., None]
        base += rng.uniform(-8, 8, size=3)  # tint
    return np.clip(base, 0, 255).astype(np.uint8)


def _draw_digit(pixels, scene: Scene, obj: SceneObject, digit_label: np.ndarray) -> None:
    """Print the object's digit: v1 on its centre token, v2 as a large glyph over the object's centre."""
    scale = scene.layout.glyph_scale
    glyph = glyph_mask(obj.digit, scale)
    ink = 255 if obj.color in DARK_COLORS else 0
    if obj.shift is None:
        centre_row, centre_col = scene.centre_token(obj)
        y0, x0 = centre_row * PATCH_SIZE, centre_col * PATCH_SIZE + 2
        pixels[y0 : y0 + 14, x0 : x0 + 10][glyph] = ink
        digit_label[centre_row, centre_col] = 1 + int(obj.digit)
        return
    top, left = scene.box(obj)
    height, width = glyph.shape
    centre_y = top + (obj.size * 3) // 5 if obj.shape == "triangle" else top + obj.size // 2
    y0, x0 = centre_y - height // 2, left + (obj.size - width) // 2
    pixels[y0 : y0 + height, x0 : x0 + width][glyph] = ink
    ys, xs = np.nonzero(glyph)
    digit_label[(y0 + ys) // PATCH_SIZE, (x0 + xs) // PATCH_SIZE] = 1 + int(obj.digit)


def render_scene(scene: Scene, rng: np.random.Generator) -> tuple[Image.Image, TokenLabels, dict[int, list[int]]]:
    """Draw a scene. Returns the image, its token labels and, per object index, the tokens it covers."""
    layout = scene.layout
    side, cell_tokens = layout.cell_px, layout.cell_tokens
    pixels = _background(scene, rng)
    object_class = np.zeros((GRID, GRID), dtype=np.int64)
    digit_label = np.zeros((GRID, GRID), dtype=np.int64)
    anchor = np.zeros((GRID, GRID), dtype=np.int64)
    covered: dict[int, list[int]] = {}
    for index, obj in enumerate(scene.objects):
        top = (scene.offset[0] + cell_tokens * obj.cell[0]) * PATCH_SIZE
        left = (scene.offset[1] + cell_tokens * obj.cell[1]) * PATCH_SIZE
        mask = _object_mask(obj, layout)
        colour = np.clip(np.array(COLOR_RGB[obj.color]) + rng.integers(-12, 13, size=3), 0, 255)
        region = pixels[top : top + side, left : left + side]
        if layout.textured:
            fill = colour[None, :] + rng.normal(0.0, 6.0, size=(int(mask.sum()), 3))
            region[mask] = np.clip(fill, 0, 255).astype(np.uint8)
        else:
            region[mask] = colour.astype(np.uint8)
        centre_row, centre_col = scene.centre_token(obj)
        if obj.digit is not None:
            _draw_digit(pixels, scene, obj, digit_label)
        per_token = mask.reshape(cell_tokens, PATCH_SIZE, cell_tokens, PATCH_SIZE).sum(axis=(1, 3))
        token_rows, token_cols = np.nonzero(per_token >= COVER_PIXELS)
        class_id = 1 + SHAPES.index(obj.shape) * len(COLORS) + COLORS.index(obj.color)
        tokens = {(centre_row, centre_col)}
        for r, c in zip(token_rows, token_cols, strict=True):
            tokens.add((top // PATCH_SIZE + int(r), left // PATCH_SIZE + int(c)))
        for r, c in tokens:
            object_class[r, c] = class_id
        anchor[centre_row, centre_col] = 1
        covered[index] = sorted(r * GRID + c for r, c in tokens)
    image = Image.fromarray(pixels, mode="RGB")
    return image, TokenLabels(object_class.reshape(-1), digit_label.reshape(-1), anchor.reshape(-1)), covered


# ------------------------------------------------------------------------------------------ scene building


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


def _build(
    family: str, answer: str, rng: np.random.Generator, layout: Layout = V1
) -> tuple[list[SceneObject], str, list[int]]:
    """Objects, question and relevant object indices for a question of ``family`` with ``answer``."""
    objects: list[SceneObject] = []
    if family == "color":
        if answer in COLORS:
            shape = _pick(rng, SHAPES)
            target = _add(rng, layout, objects, shape, answer)
            _add_distractors(rng, layout, objects, int(rng.integers(2, 8)), lambda s, c: s != shape)
            question = f"what color is the {shape} ?"
        else:
            color = _pick(rng, COLORS)
            target = _add(rng, layout, objects, answer, color)
            _add_distractors(rng, layout, objects, int(rng.integers(2, 8)), lambda s, c: c != color)
            question = f"what shape is the {color} object ?"
        relevant = [target]
    elif family == "exist":
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
        question = f"is there a {color} {shape} ?"
    elif family == "count":
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
        if n == 0:
            relevant = list(range(len(objects)))
    elif family == "position":
        shape, color = _pick(rng, SHAPES), _pick(rng, COLORS)
        target = _add(rng, layout, objects, shape, color, cells=_quadrant_cells(answer, layout))
        _add_distractors(rng, layout, objects, int(rng.integers(2, 8)), lambda s, c: (s, c) != (shape, color))
        question = f"where is the {color} {shape} ?"
        relevant = [target]
    elif family == "read":
        shape, color = _pick(rng, SHAPES), _pick(rng, COLORS)
        target = _add(rng, layout, objects, shape, color, digit=answer)
        other_digits = [d for d in DIGITS if d != answer]
        for _ in range(1 + int(rng.integers(2))):  # same shape or same colour, with a different digit
            if rng.random() < 0.5:
                _add(
                    rng,
                    layout,
                    objects,
                    shape,
                    _pick(rng, [c for c in COLORS if c != color]),
                    _pick(rng, other_digits),
                )
            else:
                _add(
                    rng,
                    layout,
                    objects,
                    _pick(rng, [s for s in SHAPES if s != shape]),
                    color,
                    _pick(rng, other_digits),
                )
        _add_distractors(rng, layout, objects, int(rng.integers(1, 5)), lambda s, c: (s, c) != (shape, color))
        question = f"what number is on the {color} {shape} ?"
        relevant = [target]
    else:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    return objects, question, relevant


def _new_scene(objects: list[SceneObject], rng: np.random.Generator, layout: Layout = V1) -> Scene:
    slack = GRID - layout.cells * layout.cell_tokens + 1
    offset = (int(rng.integers(slack)), int(rng.integers(slack)))
    return Scene(objects=objects, offset=offset, background=int(rng.integers(225, 256)), layout=layout)


def derive_question(scene: Scene, family: str, rng: np.random.Generator) -> tuple[str, str, list[int]] | None:
    """Ask a ``family`` question about an existing scene (used for extra training turns).

    Returns (question, answer, relevant object indices), or None if the scene does not allow one.
    """
    objects = scene.objects
    pairs = [(o.shape, o.color) for o in objects]
    if family == "color":
        options = []
        for i, o in enumerate(objects):
            if sum(s == o.shape for s, _ in pairs) == 1:
                options.append((f"what color is the {o.shape} ?", o.color, [i]))
            if sum(c == o.color for _, c in pairs) == 1:
                options.append((f"what shape is the {o.color} object ?", o.shape, [i]))
        return options[int(rng.integers(len(options)))] if options else None
    if family == "exist":
        if rng.random() < 0.5:
            i = int(rng.integers(len(objects)))
            o = objects[i]
            same = [j for j, p in enumerate(pairs) if p == (o.shape, o.color)]
            return f"is there a {o.color} {o.shape} ?", "yes", same
        absent = [(s, c) for s in SHAPES for c in COLORS if (s, c) not in pairs]
        hard = [(s, c) for s, c in absent if any(p[0] == s for p in pairs) and any(p[1] == c for p in pairs)]
        shape, color = (hard or absent)[int(rng.integers(len(hard or absent)))]
        near = [j for j, p in enumerate(pairs) if p[0] == shape or p[1] == color]
        return f"is there a {color} {shape} ?", "no", near
    if family == "count":
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
        return question, str(len(hits)), hits or list(range(len(objects)))
    unique = [i for i, o in enumerate(objects) if pairs.count((o.shape, o.color)) == 1]
    if family == "position":
        options = [i for i in unique if quadrant_of(objects[i], scene.layout) is not None]
        if not options:
            return None
        i = options[int(rng.integers(len(options)))]
        o = objects[i]
        return f"where is the {o.color} {o.shape} ?", quadrant_of(o, scene.layout), [i]
    if family == "read":
        options = [i for i in unique if objects[i].digit is not None]
        if not options:
            return None
        i = options[int(rng.integers(len(options)))]
        o = objects[i]
        return f"what number is on the {o.color} {o.shape} ?", o.digit, [i]
    raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")


def _tokens_of(covered: dict[int, list[int]], object_indices: list[int]) -> list[int]:
    return sorted({t for i in object_indices for t in covered[i]})


@dataclass
class TrainingExample:
    """One training image with several (question, answer) turns and its per-token labels.

    ``pointers[i]`` is, for turn ``i``, the grid indices of the centre tokens of the objects its question
    describes and whether the sequence start (a "nothing / how many" sink) belongs to the target too.
    """

    image: Image.Image
    turns: list[tuple[str, str]]
    labels: TokenLabels | None
    pointers: list[tuple[list[int], bool]] = field(default_factory=list)
    scene: Scene | None = None


def pointer_target(scene: Scene, question: str) -> tuple[list[int], bool]:
    """Centre tokens of the objects matching every colour/shape word of ``question``, and whether the
    sequence start is part of the target (existence and counting questions, where matches may be absent)."""
    words = question.split()
    colors = {w for w in words if w in COLORS}
    shapes = {w for w in words if w in SHAPES} | {s for s, plural in SHAPE_PLURALS.items() if plural in words}
    anchors = [
        scene.centre_token(o)
        for o in scene.objects
        if (not colors or o.color in colors) and (not shapes or o.shape in shapes)
    ]
    with_start = words[0] in ("is", "how")
    return [row * GRID + col for row, col in anchors], with_start


def make_training_example(rng: np.random.Generator, max_turns: int = 8, layout: Layout | str = V1) -> TrainingExample:
    """A random scene built for one balanced primary question, plus derived questions (other families
    first, then further ones in rounds), without repeating a question; turns are shuffled."""
    family = _pick(rng, FAMILIES)
    answer = _pick(rng, ANSWERS[family])
    layout = get_layout(layout)
    objects, question, _ = _build(family, answer, rng, layout)
    scene = _new_scene(objects, rng, layout)
    image, labels, _ = render_scene(scene, rng)
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
    pointers = [pointer_target(scene, question) for question, _ in pairs]
    return TrainingExample(image=image, turns=pairs, labels=labels, pointers=pointers, scene=scene)


def get_layout(layout: Layout | str) -> Layout:
    """A :class:`Layout` from itself or its name (``"v1"``, ``"v2"``)."""
    if isinstance(layout, Layout):
        return layout
    if layout not in LAYOUTS:
        raise ValueError(f"unknown scene layout {layout!r}; expected one of {sorted(LAYOUTS)}")
    return LAYOUTS[layout]


def make_sample(family: str, answer: str, rng: np.random.Generator, layout: Layout | str = V1) -> Sample:
    """One single-image sample of ``family`` whose answer is ``answer``."""
    layout = get_layout(layout)
    objects, question, relevant = _build(family, answer, rng, layout)
    scene = _new_scene(objects, rng, layout)
    image, _, covered = render_scene(scene, rng)
    return Sample(image, question, answer, family, _tokens_of(covered, relevant))


def _rng(split: str, seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng([SPLIT_CODES[split], seed, *keys])


def make_split(split: str, n_per_family: int, seed: int | None = None, layout: Layout | str = V1) -> list[Sample]:
    """``n_per_family`` samples of every family, answers cycling evenly over the family's answer set.

    ``"val"`` and ``"test"`` are fixed by their name (``seed`` is ignored); ``"train"`` draws from the
    stream selected by ``seed`` (default 0). Splits use disjoint random streams.
    """
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be 'train', 'val' or 'test', not {split!r}")
    stream_seed = FIXED_SPLIT_SEEDS[split] if split in FIXED_SPLIT_SEEDS else (seed or 0)
    samples = []
    for family_index, family in enumerate(FAMILIES):
        answers = ANSWERS[family]
        for i in range(n_per_family):
            rng = _rng(split, stream_seed, family_index, i)
            samples.append(make_sample(family, answers[i % len(answers)], rng, layout))
    return samples


def make_incontext(n_queries: int, shots: int = 2, seed: int = 0, layout: Layout | str = V1) -> list[Sample]:
    """Multi-image prompts: ``shots`` answered demonstrations of the same family, then one query image.

    Families cycle over :data:`FAMILIES`; ``Sample.image`` is the list of images (query last) and
    ``relevant_tokens`` refers to the query image.
    """
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


IMAGE_TOKEN = "<image>"
ANSWER_MARK = "answer:"
END_OF_ANSWER = "</s>"


def turn_text(question: str, answer: str | None = None) -> str:
    """One question turn; with an answer it is closed by the end-of-sequence token."""
    text = f"{question} {ANSWER_MARK}"
    return text if answer is None else f"{text} {answer} {END_OF_ANSWER}"


def prompt_for(sample: Sample) -> str:
    """The exact prompt string for the processor: one ``<image>`` per image, demonstrations answered."""
    parts = [f"{IMAGE_TOKEN} {turn_text(q, a)}" for q, a in sample.context]
    parts.append(f"{IMAGE_TOKEN} {turn_text(sample.question)}")
    return " ".join(parts)

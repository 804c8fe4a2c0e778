"""Scenes of the synthetic visual-question tasks: geometry, objects and rendering.

Images are 168x168 RGB. With the CLIP patch size of 14 they form a 12x12 grid of 144 visual tokens.
Two scene layouts (:class:`Layout`):

- :data:`V1` (the shipped model v1): objects (square, circle, triangle in six colours, 14-40 px wide) sit
  centred in a 4x4 layout of cells of 3x3 tokens, on a flat background; some carry a small printed digit
  (a 10x14 px glyph) on the centre token of their cell, so reading needs that one token.
- :data:`V2` (model v2): a 3x3 layout of cells of 4x4 tokens; objects are 28-52 px (4-16 tokens) placed
  anywhere inside their cell, with a textured fill, on a textured background (gradient, noise or stripes);
  digits are 20x28 px glyphs spanning several tokens. Visual information is spread over many tokens, as in
  photographs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

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


SHIPPED_MODEL_DIR = Path(__file__).resolve().parent / "model"


def layout_of_folder(folder: str | Path, default: str | None = "v1") -> str | None:
    """The scene layout a saved embedded model was trained on: its config's ``embedded_layout``, else
    ``default`` ("v1": checkpoints that predate the field, and folders that are not embedded models)."""
    config = Path(folder) / "config.json"
    if not config.is_file():
        return default
    return json.loads(config.read_text()).get("embedded_layout", default)


def get_layout(layout: Layout | str | None = None) -> Layout:
    """A :class:`Layout` from itself or its name (``"v1"``, ``"v2"``); ``None`` is the shipped model's layout,
    so the task set always matches the model that ships with the package."""
    if isinstance(layout, Layout):
        return layout
    if layout is None:
        layout = layout_of_folder(SHIPPED_MODEL_DIR)
    if layout not in LAYOUTS:
        raise ValueError(f"unknown scene layout {layout!r}; expected one of {sorted(LAYOUTS)}")
    return LAYOUTS[layout]

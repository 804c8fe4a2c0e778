"""Pictures of what a sieve kept: dropped patches darkened over the input image.

The token layout comes from the Trace (``trace.images[(sample, image)]``: ``n_tokens``, ``grid_hw``,
``grid_rc``, ``groups``), so the same code serves every family:

- LLaVA-1.5: one square grid over the processor's view of the image (``view``: ``"center_crop"`` for the CLIP
  resize-and-crop, ``"pad"`` for pad-to-square, ``"stretch"`` for a plain resize);
- Qwen2-VL / Qwen2.5-VL: a ``(rows, cols)`` grid of merged patches over the (aspect-preserving) resized image;
- LLaVA-NeXT: the base view (group 0, the whole image resized to a square) and the anyres tiles (groups 1..k)
  laid out row-major over the best-fit resolution, which is read back from the tile count and the aspect ratio.
  NeXT images are drawn as two panels: base view | high-resolution tiles. Newline tokens (``grid_rc == -1``)
  carry no patch and are not drawn.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

VIEWS = ("auto", "stretch", "center_crop", "pad")


def _as_array(values) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().numpy()
    return np.asarray(values)


def _grid_boxes(rc: np.ndarray, grid_hw: tuple[int, int], size: tuple[int, int], view: str) -> np.ndarray:
    """Pixel boxes ``[n, 4]`` (x0, y0, x1, y1) of grid tokens over an image of ``size`` (width, height)."""
    width, height = size
    gh, gw = grid_hw
    if view == "center_crop":  # the grid covers the central square
        side = min(width, height)
        ox, oy, sw, sh = (width - side) / 2, (height - side) / 2, side, side
    elif view == "pad":  # the image sits centred in a padded square
        side = max(width, height)
        ox, oy, sw, sh = (width - side) / 2, (height - side) / 2, side, side
    else:
        ox, oy, sw, sh = 0.0, 0.0, float(width), float(height)
    r, c = rc[:, 0].astype(float), rc[:, 1].astype(float)
    return np.stack([ox + c * sw / gw, oy + r * sh / gh, ox + (c + 1) * sw / gw, oy + (r + 1) * sh / gh], axis=1)


def tile_layout(n_tiles: int, aspect: float) -> tuple[int, int]:
    """``(rows, cols)`` of an anyres tiling with ``n_tiles`` tiles whose shape best matches ``aspect`` (w / h)."""
    best, best_err = (1, n_tiles), math.inf
    for rows in range(1, n_tiles + 1):
        if n_tiles % rows:
            continue
        cols = n_tiles // rows
        err = abs(math.log((cols / rows) / aspect))
        if err < best_err - 1e-9:
            best, best_err = (rows, cols), err
    return best


def _anyres_boxes(
    rc: np.ndarray, tiles: np.ndarray, grid_hw: tuple[int, int], size: tuple[int, int], n_tiles: int
) -> np.ndarray:
    """Pixel boxes of anyres tile tokens: the tiles cover the best-fit canvas, the image is fitted and centred."""
    width, height = size
    side_h, side_w = grid_hw
    rows, cols = tile_layout(n_tiles, width / height)
    canvas_w, canvas_h = cols * side_w, rows * side_h  # in patches
    scale = min(canvas_w / width, canvas_h / height)  # patches per pixel
    pad_x, pad_y = (canvas_w - width * scale) / 2, (canvas_h - height * scale) / 2
    x0 = (tiles % cols) * side_w + rc[:, 1]
    y0 = (tiles // cols) * side_h + rc[:, 0]
    return np.stack(
        [(x0 - pad_x) / scale, (y0 - pad_y) / scale, (x0 + 1 - pad_x) / scale, (y0 + 1 - pad_y) / scale], axis=1
    ).astype(float)


def _paint(image: Image.Image, boxes: np.ndarray, kept: np.ndarray, dim: float) -> Image.Image:
    """Darken ``image`` everywhere except the boxes of kept tokens."""
    width, height = image.size
    mask = np.zeros((height, width), dtype=np.float32)
    for x0, y0, x1, y1 in boxes[kept]:
        left, top = max(0, int(math.floor(x0 + 0.5))), max(0, int(math.floor(y0 + 0.5)))
        right, bottom = min(width, int(math.floor(x1 + 0.5))), min(height, int(math.floor(y1 + 0.5)))
        if right > left and bottom > top:
            mask[top:bottom, left:right] = 1.0
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    shade = dim + (1.0 - dim) * mask[..., None]
    return Image.fromarray((pixels * shade).clip(0, 255).astype(np.uint8))


def overlay(
    image: Image.Image,
    kept: Sequence[int] | torch.Tensor | None,
    info: dict,
    view: str = "auto",
    dim: float = 0.25,
    min_side: int = 224,
) -> Image.Image:
    """The image with the patches of dropped tokens darkened (``dim`` of their brightness).

    ``kept``: indices into the image's visual tokens (``trace.kept(sample, image)``; ``None`` = all kept).
    ``info``: ``trace.images[(sample, image)]``. Small images are upscaled so that patches stay visible.
    LLaVA-NeXT images (several crops in ``info["groups"]``) give two panels side by side.
    """
    if view not in VIEWS:
        raise ValueError(f"view={view!r}: choose one of {VIEWS}")
    image = image.convert("RGB")
    if min(image.size) < min_side:
        factor = min_side / min(image.size)
        image = image.resize((round(image.width * factor), round(image.height * factor)), Image.NEAREST)
    n = int(info["n_tokens"])
    rc = _as_array(info["grid_rc"]).reshape(n, 2).astype(int)
    groups = _as_array(info.get("groups", np.zeros(n, dtype=int))).reshape(n).astype(int)
    grid_hw = tuple(int(v) for v in info["grid_hw"])
    keep_mask = np.zeros(n, dtype=bool)
    if kept is None:
        keep_mask[:] = True
    else:
        keep_mask[_as_array(kept).astype(int).reshape(-1)] = True
    real = rc[:, 0] >= 0  # newline tokens have no patch
    if groups.max(initial=0) == 0:
        if view == "auto":
            view = "center_crop" if grid_hw[0] == grid_hw[1] and image.width != image.height else "stretch"
        boxes = _grid_boxes(rc, grid_hw, image.size, view)
        return _paint(image, boxes, keep_mask & real, dim)
    # LLaVA-NeXT: base view over the whole image, tiles over the fitted best resolution.
    base = (groups == 0) & real
    tiles = (groups > 0) & real
    n_tiles = int(groups.max())
    base_panel = _paint(image, _grid_boxes(rc, grid_hw, image.size, "stretch"), keep_mask & base, dim)
    tile_boxes = _anyres_boxes(rc, np.maximum(groups - 1, 0), grid_hw, image.size, n_tiles)
    tile_panel = _paint(image, tile_boxes, keep_mask & tiles, dim)
    gap = max(4, image.width // 40)
    out = Image.new("RGB", (2 * image.width + gap, image.height), (255, 255, 255))
    out.paste(base_panel, (0, 0))
    out.paste(tile_panel, (image.width + gap, 0))
    return out


@dataclass
class Panel:
    """One kept-token overlay of a grid: its title (and title colour), kept indices (``None``: all), layout."""

    title: str
    color: str
    kept: Sequence[int] | None
    info: dict


def picture_grid(
    images: Sequence[Image.Image],
    panels: Sequence[Sequence[Panel]],
    path: str | Path,
    row_labels: Sequence[str] | None = None,
    title: str = "",
    view: str = "auto",
    max_columns: int = 8,
) -> Path:
    """Per image: the original, then its panels, wrapped into rows of at most ``max_columns`` columns.

    ``panels[i]``: the overlays of image ``i``. Written as PNG with matplotlib's Agg backend.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_image = [[None, *row] for row in panels]  # None: the original image
    n_cols = min(max_columns, max(len(row) for row in per_image))
    layout = [(i, row[j : j + n_cols]) for i, row in enumerate(per_image) for j in range(0, len(row), n_cols)]
    fig, axes = plt.subplots(len(layout), n_cols, figsize=(2.0 * n_cols, 2.45 * len(layout) + 0.5), squeeze=False)
    for r, (i, row) in enumerate(layout):
        for c in range(n_cols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(row):
                ax.axis("off")
            elif row[c] is None:
                ax.imshow(images[i])
                ax.set_title(_wrap(row_labels[i], 24) if row_labels else "original", fontsize=7)
            else:
                panel = row[c]
                ax.imshow(overlay(images[i], panel.kept, panel.info, view=view))
                ax.set_title(panel.title, fontsize=7, color=panel.color)
    return finish_figure(fig, path, title, dpi=100, title_size=9)


def finish_figure(fig, path: str | Path, title: str | None = None, dpi: int = 110, title_size: int = 10) -> Path:
    """Title, lay out, save and close a matplotlib figure (every picture of the project ends here)."""
    import matplotlib.pyplot as plt

    if title:
        fig.suptitle(title, fontsize=title_size)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def save_overlay(image: Image.Image, kept, info: dict, path: str | Path, title: str, view: str = "auto") -> Path:
    """The overlay of :func:`overlay` as a PNG with a title above it (method, keep, question, answer)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    picture = overlay(image, kept, info, view=view)
    width = max(4.0, picture.width / 100)
    lines = title.count("\n") + 1
    fig = plt.figure(figsize=(width, width * picture.height / picture.width + 0.18 * lines + 0.12))
    ax = fig.add_axes((0, 0, 1, 1 - (0.18 * lines + 0.12) / fig.get_figheight()))
    ax.imshow(picture)
    ax.axis("off")
    fig.suptitle(title, fontsize=9, y=0.995, va="top")
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _wrap(text: str, width: int) -> str:
    words, lines, line = text.split(), [], ""
    for word in words:
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    lines.append(line)
    return "\n".join(lines[:3])

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


def picture_grid(
    images: Sequence[Image.Image],
    columns: dict[str, Sequence[tuple[Sequence[int] | None, dict]]],
    path: str | Path,
    row_labels: Sequence[str] | None = None,
    title: str = "",
    view: str = "auto",
) -> Path:
    """One row per image, one column per method: the original, then each method's kept-token overlay.

    ``columns``: column title -> per image ``(kept indices or None for all, trace image info)``. Written as PNG
    with matplotlib's Agg backend (no display needed).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_rows, n_cols = len(images), 1 + len(columns)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(1.9 * n_cols, 2.1 * n_rows + 0.4), squeeze=False)
    for r, image in enumerate(images):
        ax = axes[r][0]
        ax.imshow(image)
        if row_labels:
            ax.set_title(_wrap(row_labels[r], 26), fontsize=6)
        for c, (name, per_image) in enumerate(columns.items(), start=1):
            kept, info = per_image[r]
            ax = axes[r][c]
            ax.imshow(overlay(image, kept, info, view=view))
            n_kept = int(info["n_tokens"]) if kept is None else len(kept)
            ax.set_title(f"{name}\n{n_kept}/{info['n_tokens']}", fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
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

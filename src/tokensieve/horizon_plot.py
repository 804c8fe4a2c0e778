"""Pictures of the information horizon (:mod:`tokensieve.horizon`): per-layer maps on the 2-D token grid."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from .viz import finish_figure


def layer_information(info: torch.Tensor) -> torch.Tensor:
    """Mean absolute information per layer, [n_layers]."""
    return info.abs().float().mean(1)


def describe_horizon(horizon: int, layers: Sequence[int], threshold: float) -> str:
    """``"layer K"``, or ``"no horizon within N layers"`` when even the last layer is above ``threshold``."""
    layers = list(layers)
    if horizon > layers[-1]:
        return f"no horizon within {len(layers)} layers (mean |information| >= {threshold:g} at layer {layers[-1]})"
    return f"layer {horizon}"


def token_grid(values: torch.Tensor, info: dict) -> np.ndarray:
    """Values [n_tokens] of one image placed on its 2-D token grid (``trace.images`` layout); NaN where no token
    of the first view falls (LLaVA-NeXT tiles and newline tokens are left out)."""
    n = int(info["n_tokens"])
    rc = np.asarray(torch.as_tensor(info["grid_rc"]).reshape(n, 2).cpu()).astype(int)
    groups = np.asarray(torch.as_tensor(info.get("groups", torch.zeros(n))).reshape(n).cpu()).astype(int)
    rows, cols = (int(v) for v in info["grid_hw"])
    grid = np.full((rows, cols), np.nan, dtype=np.float32)
    use = (rc[:, 0] >= 0) & (groups == 0)
    grid[rc[use, 0], rc[use, 1]] = values.numpy()[use]
    return grid


def plot_information(
    info: torch.Tensor,
    path: str | Path,
    layers: Sequence[int] | None = None,
    horizon: int | None = None,
    title: str | None = None,
    layout: dict | None = None,
    threshold: float = 1e-3,
    max_columns: int = 8,
    image=None,
) -> Path:
    """Save a PNG: the information of every visual token on the image's 2-D token grid, one map per decoder layer
    (at most ``max_columns`` per row, one colour scale clipped at the 99th percentile of |information|), and below
    them the image (if given) and the mean |information| per layer with the horizon.

    ``layout``: ``trace.images[(sample, image)]`` of the image (without it each map is one row of tokens)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    layers = list(range(info.shape[0])) if layers is None else list(layers)
    cols = max(3, min(max_columns, len(layers)))
    rows = -(-len(layers) // cols)
    fig = plt.figure(figsize=(2.1 * cols + 0.8, 2.3 * rows + 3.4))
    grid = fig.add_gridspec(rows + 1, cols + 1, width_ratios=[1] * cols + [0.08],
                            height_ratios=[1] * rows + [1.45])  # fmt: skip
    lim = float(torch.quantile(info.abs().flatten().float(), 0.99)) or float(info.abs().max()) or 1.0
    for i, layer in enumerate(layers):
        ax = fig.add_subplot(grid[i // cols, i % cols])
        values = token_grid(info[i], layout) if layout is not None else info[i].numpy()[None]
        im = ax.imshow(values, cmap="coolwarm", vmin=-lim, vmax=lim, interpolation="nearest")
        ax.set_title(f"layer {layer}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(im, cax=fig.add_subplot(grid[:rows, cols]), label="p(answer) - p(answer | token removed)")
    start = 0
    if image is not None:
        ax = fig.add_subplot(grid[rows, 0])
        ax.imshow(image)
        ax.set_title("image", fontsize=9)
        ax.axis("off")
        start = 1
    ax1 = fig.add_subplot(grid[rows, start:cols])
    ax1.plot(layers, layer_information(info).numpy(), marker="o")
    ax1.axhline(threshold, color="0.5", ls=":", lw=0.8, label=f"threshold {threshold:g}")
    ax1.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax1.set_xlabel("decoder layer (token removed from here on)", fontsize=8)
    ax1.set_ylabel("mean |information|", fontsize=8)
    ax1.set_ylim(bottom=0)
    if horizon is not None and horizon <= layers[-1]:
        ax1.axvline(horizon, color="k", linestyle="--", label=f"horizon: layer {horizon}")
    elif horizon is not None:
        ax1.set_title(f"no horizon within {len(layers)} layers", fontsize=9)
    ax1.legend(fontsize=7)
    return finish_figure(fig, path, title)

"""Spatial average pooling of the token grid down to the budget (the "downsample" baseline)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..budget import split_budget
from ..context import ImageContext, Selection
from .base import Method, register


def pooling_cells(grid_rc: torch.Tensor, grid_hw: tuple[int, int], k: int) -> torch.Tensor:
    """Assign every token of an ``h x w`` grid to one of exactly ``k`` rectangular cells.

    The grid is cut into ``g`` horizontal bands (``g`` chosen so cells are close to square) and band ``i`` into
    ``k // g`` or ``k // g + 1`` column segments, so the cell count is exactly ``k`` for any ``k <= h * w``.
    Returns LongTensor [n] of cell ids (raster order of cells).
    """
    h, w = grid_hw
    bands = max(1, min(h, k, round(math.sqrt(k * h / max(w, 1)))))
    bands = max(bands, math.ceil(k / w))
    rows, cols = grid_rc[:, 0].clamp(0, h - 1), grid_rc[:, 1].clamp(0, w - 1)
    band_of_row = torch.div(torch.arange(h, device=rows.device) * bands, h, rounding_mode="floor")
    band = band_of_row[rows]
    per_band = torch.full((bands,), k // bands, dtype=torch.long, device=rows.device)
    per_band[: k % bands] += 1
    first_cell = torch.cumsum(per_band, 0) - per_band
    segments = per_band[band]
    col_segment = torch.div(cols * segments, w, rounding_mode="floor")
    return first_cell[band] + col_segment


def member_cells(grid_rc: torch.Tensor, k: int) -> torch.Tensor:
    """Exactly ``k`` non-empty cells (ids ``0..k-1``) over the present tokens of one crop, ``k <= len(grid_rc)``.

    The tokens' rows and columns are re-indexed densely first, so a crop whose grid was cut by unpadding
    (LLaVA-NeXT tiles) is pooled over the rectangle it occupies, not over the full tile grid where some cells
    would be empty. If the present tokens are not a full rectangle and a cell still comes out empty, the tokens
    are cut in raster order into ``k`` runs instead.
    """
    _, rows = torch.unique(grid_rc[:, 0], return_inverse=True)
    _, cols = torch.unique(grid_rc[:, 1], return_inverse=True)
    dense = torch.stack([rows, cols], dim=1)
    hw = (int(rows.max()) + 1, int(cols.max()) + 1)
    cells = pooling_cells(dense, hw, k)
    if torch.unique(cells).numel() == k:
        return torch.unique(cells, return_inverse=True)[1]
    raster = torch.argsort(rows * hw[1] + cols, stable=True)
    out = torch.empty_like(cells)
    out[raster] = torch.div(torch.arange(len(cells), device=cells.device) * k, len(cells), rounding_mode="floor")
    return out


@register
@dataclass
class Pool(Method):
    """Average-pool the projected visual tokens of each image into exactly ``k`` spatial cells.

    The baseline that several peers found strong ("downsample"). Each cell's mean feature is written into the
    slot of the cell's most central token, so kept positions follow the grid; positions are re-indexed
    (``reindex``). Per crop on LLaVA-NeXT (the budget is split over crops in proportion to their tokens), and
    ``image_newline`` tokens are kept on top of the budget; an unpadded tile is pooled over the rectangle its
    tokens occupy (:func:`member_cells`), so every crop gets exactly its share. Stage ``projector``; signals:
    projected features.
    """

    name = "pool"
    stage = "projector"
    needs = frozenset({"features"})
    fidelity = "our baseline, no official code: average pooling into exactly k grid cells"
    paper = "Spatial average pooling baseline (downsample), e.g. as studied in arXiv 2412.01818"
    arxiv = ""

    def select(self, ctx: ImageContext, k: int) -> Selection:
        device = ctx.features.device
        prunable = torch.nonzero(~ctx.always_keep).flatten()
        groups = ctx.groups[prunable]
        group_ids, group_sizes = torch.unique(groups, return_counts=True)
        budgets = split_budget(k, group_sizes.tolist(), weights=group_sizes.tolist())
        keep, replace_at, replace_with = [torch.nonzero(ctx.always_keep).flatten()], [], []
        for gid, budget in zip(group_ids.tolist(), budgets, strict=True):
            members = prunable[groups == gid]
            if budget <= 0:
                continue
            cells = member_cells(ctx.grid_rc[members], min(budget, members.numel()))
            n_cells = int(cells.max()) + 1
            feats = ctx.features[members].float()
            sums = torch.zeros(n_cells, feats.shape[1], device=device).index_add_(0, cells, feats)
            counts = torch.zeros(n_cells, device=device).index_add_(0, cells, torch.ones_like(cells, dtype=torch.float))
            centre = torch.zeros(n_cells, 2, device=device).index_add_(0, cells, ctx.grid_rc[members].float())
            centre = centre / counts[:, None]
            dist = (ctx.grid_rc[members].float() - centre[cells]).pow(2).sum(1)
            # The most central member of each cell: sort by (cell, distance) and take the first of each cell.
            order = torch.argsort(cells * (dist.max() + 1) + dist, stable=True)
            first = torch.ones_like(order, dtype=torch.bool)
            first[1:] = cells[order][1:] != cells[order][:-1]
            slots = order[first]
            keep.append(members[slots])
            replace_at.append(members[slots])
            replace_with.append((sums / counts[:, None])[cells[slots]].to(ctx.features.dtype))
        keep_idx = torch.cat(keep)
        return Selection(keep=keep_idx, replace_at=torch.cat(replace_at), replace_with=torch.cat(replace_with))

"""Layout: compaction of the kept rows, row lookups, and attention masks per attention backend.

Every tensor made here is created on the device of the tensors it is computed from (the layer's hidden states),
so a ``device_map`` that splits the decoder works.
"""

from __future__ import annotations

import torch

from .state import Request, Segment


def rows_of(request: Request, b: int, positions: torch.Tensor) -> torch.Tensor:
    """Rows of the current layout that hold the given original columns (-1 where pruned), in order."""
    device = request.cols.device
    positions = positions.to(device)
    lookup = torch.full((request.length,), -1, dtype=torch.long, device=device)
    lookup[request.cols[b]] = torch.arange(request.cols.shape[1], device=device)
    rows = lookup[positions]
    valid = request.layout_valid[b, rows.clamp(min=0)] & (rows >= 0)
    return torch.where(valid, rows, torch.full_like(rows, -1))


def text_rows(request: Request, b: int, image_token_id: int) -> torch.Tensor:
    ids = request.input_ids[b].to(request.cols.device)[request.cols[b]]
    return torch.nonzero(request.layout_valid[b] & (ids != image_token_id)).flatten()


def compact(request: Request, layer: int, keep_rows: torch.Tensor, policy: str, hidden: torch.Tensor) -> torch.Tensor:
    """Drop the rows not in ``keep_rows`` from the current layout and open a segment at ``layer``."""
    if bool(torch.equal(keep_rows, request.layout_valid)):
        # Nothing was dropped: the layers keep the model's own mask and positions (bit-exact, no overhead).
        return hidden
    counts = keep_rows.sum(1)
    new_len = int(counts.max())
    order = torch.sort(keep_rows.int(), dim=1, stable=True).indices[:, -new_len:]  # kept rows, left-padded
    cols = request.cols.gather(1, order)
    valid = keep_rows.gather(1, order)
    if request.positions.dim() == 2:
        old_pos = request.positions.gather(1, order)
    else:
        old_pos = request.positions.gather(2, order[None].expand(request.positions.shape[0], -1, -1))
    previous = request.segments[-1].decode_offset.to(counts.device) if request.segments else torch.zeros_like(counts)
    if policy == "reindex":
        rank = (valid.long().cumsum(1) - 1).clamp(min=0)
        positions = rank if old_pos.dim() == 2 else rank[None].expand(old_pos.shape[0], -1, -1)
        next_new = rank.masked_fill(~valid, -1).amax(1) + 1
        offset = request.next_orig.to(next_new.device) - next_new
    else:
        positions, offset = old_pos, previous
    hidden = hidden.gather(1, order[..., None].expand(-1, -1, hidden.shape[-1]))
    request.cols, request.layout_valid, request.positions = cols, valid, positions
    request.segments.append(Segment(start=layer, cols=cols, valid=valid, positions=positions, decode_offset=offset))
    return hidden


def prefill_mask(segment: Segment, original, dtype: torch.dtype, impl: str):
    cols, valid = segment.cols, segment.valid
    allowed = (cols[:, None, :] <= cols[:, :, None]) & valid[:, None, :]  # [B, q, k]
    return format_mask(allowed, valid, original, dtype, impl)


def decode_mask(segment: Segment, new_valid: torch.Tensor, q_len: int, original, dtype, impl: str):
    """Mask of ``q_len`` new queries over a pruned layer's cache: the kept prompt, then the generated keys."""
    device = segment.valid.device
    new_valid = new_valid.to(device)
    keys_valid = torch.cat([segment.valid, new_valid], dim=1)  # [B, Lc + n_new]
    lc, n_new = segment.valid.shape[1], new_valid.shape[1]
    key_order = torch.arange(lc + n_new, device=device)
    query_order = lc + n_new - q_len + torch.arange(q_len, device=device)
    allowed = (key_order[None, :] <= query_order[:, None])[None] & keys_valid[:, None, :]
    return format_mask(allowed, keys_valid, original, dtype, impl)


def format_mask(allowed: torch.Tensor, key_valid: torch.Tensor, original, dtype: torch.dtype, impl: str):
    """``allowed`` [B, q, k] in the form the attention backend ``impl`` expects."""
    if "flash" in impl:
        return None if bool(key_valid.all()) else key_valid.long()
    # A padding query would see no key at all; let it see everything so softmax stays finite.
    empty = ~allowed.any(-1, keepdim=True)
    allowed = (allowed | empty)[:, None]  # [B, 1, q, k]
    if isinstance(original, dict):
        original = next(iter(original.values()), None)
    if (isinstance(original, torch.Tensor) and original.is_floating_point()) or impl == "eager":
        min_value = torch.finfo(dtype).min
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, min_value)
    return allowed


def scatter_rows(
    values: torch.Tensor, cols: torch.Tensor, valid: torch.Tensor, length: int, dim: int = 1
) -> torch.Tensor:
    """Put ``values`` (rows in a pruned layout along ``dim``) back at their original columns of a length-``length``
    axis; pruned columns get zeros. ``cols``, ``valid`` [B, Lc]; ``values`` has the batch on dim 0. Padding rows
    of the layout hold columns that were dropped (never a kept one), so they are zeroed before the scatter."""
    shape = list(values.shape)
    shape[dim] = length
    view = [cols.shape[0]] + [1] * (values.dim() - 1)
    view[dim] = cols.shape[1]
    index = cols.to(values.device).view(view).expand_as(values)
    keep = valid.to(values.device).view(view)
    return values.new_zeros(shape).scatter_(dim, index, values * keep)

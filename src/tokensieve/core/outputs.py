"""``output_hidden_states`` / ``output_attentions`` under pruning: realigned to the prompt's columns.

Pruned layers see fewer rows; their hidden states and attention maps are scattered back so that index ``i`` is
prompt column ``i`` again (pruned columns hold zeros), as ``last_hidden_state`` is.
"""

from __future__ import annotations

import warnings

import torch

from .layout import scatter_rows
from .state import Request


def _layout_of(request: Request, index: int, rows: int):
    """The segment whose layout an entry with ``rows`` rows recorded at layer ``index`` is in (None: unpruned)."""
    segment = request.segment_for(index)
    if segment is not None and segment.cols.shape[1] == rows:
        return segment
    if rows != request.length:
        warnings.warn(
            f"tokensieve: an output_hidden_states/output_attentions entry with {rows} rows matches no pruned "
            f"layout; it is returned as is (not aligned with input_ids)",
            stacklevel=5,
        )
    return None


def realign_prefill(request: Request, output) -> None:
    """``output_hidden_states`` / ``output_attentions``: back to the prompt's columns (pruned ones zero).
    Hidden-state entry ``i > 0`` is the output of layer ``i - 1``, entry 0 the input of layer 0."""
    hidden_states = getattr(output, "hidden_states", None)
    if hidden_states is not None:
        out = []
        for i, h in enumerate(hidden_states):
            segment = _layout_of(request, max(0, i - 1), h.shape[1])
            out.append(h if segment is None else scatter_rows(h, segment.cols, segment.valid, request.length))
        output.hidden_states = tuple(out)
    attentions = getattr(output, "attentions", None)
    if attentions is not None:
        out = []
        for i, a in enumerate(attentions):
            segment = _layout_of(request, i, a.shape[-1])
            if segment is not None:
                a = scatter_rows(a, segment.cols, segment.valid, request.length, 2)
                a = scatter_rows(a, segment.cols, segment.valid, request.length, 3)
            out.append(a)
        output.attentions = tuple(out)


def realign_decode(request: Request, output) -> None:
    """Decoding attentions [B, H, q, keys of the layer's cache] -> keys = prompt columns + generated tokens."""
    attentions = getattr(output, "attentions", None)
    if attentions is None:
        return
    out = []
    n_keys = request.length + request.decoded
    for i, a in enumerate(attentions):
        segment = request.segment_for(i)
        if segment is not None and a.shape[-1] == segment.cols.shape[1] + request.decoded:
            new = request.length + torch.arange(request.decoded, device=segment.cols.device)
            cols = torch.cat([segment.cols, new.expand(request.batch, -1)], dim=1)
            valid = torch.cat([segment.valid, torch.ones_like(new, dtype=torch.bool).expand(request.batch, -1)], 1)
            a = scatter_rows(a, cols, valid, n_keys, 3)
        out.append(a)
    output.attentions = tuple(out)

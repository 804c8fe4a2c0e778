"""``output_hidden_states`` / ``output_attentions`` under pruning: realigned to the prompt's columns.

Pruned layers see fewer rows; their hidden states and attention maps are scattered back so that index ``i`` is
prompt column ``i`` again (pruned columns hold zeros), as ``last_hidden_state`` is.
"""

from __future__ import annotations

import torch

from .layout import scatter_rows
from .state import Request


def realign_prefill(request: Request, output) -> None:
    """``output_hidden_states`` / ``output_attentions``: back to the prompt's columns (pruned ones zero)."""
    hidden_states = getattr(output, "hidden_states", None)
    if hidden_states is not None:
        out = []
        for i, h in enumerate(hidden_states):
            segment = request.segment_for(max(0, i - 1))  # entry i is the output of layer i - 1
            if segment is not None and h.shape[1] == segment.cols.shape[1] != request.length:
                h = scatter_rows(h, segment.cols, request.length)
            out.append(h)
        output.hidden_states = tuple(out)
    attentions = getattr(output, "attentions", None)
    if attentions is not None:
        out = []
        for i, a in enumerate(attentions):
            segment = request.segment_for(i)
            if segment is not None and a.shape[-1] == segment.cols.shape[1] != request.length:
                a = scatter_rows(scatter_rows(a, segment.cols, request.length, 2),
                                        segment.cols, request.length, 3)  # fmt: skip
            out.append(a)
        output.attentions = tuple(out)


def realign_decode(request: Request, output) -> None:
    attentions = getattr(output, "attentions", None)
    if attentions is None:
        return
    out = []
    for i, a in enumerate(attentions):
        segment = request.segment_for(i)
        n_keys = request.length + request.decoded
        if segment is not None and a.shape[-1] != n_keys:
            new = request.length + torch.arange(request.decoded, device=segment.cols.device)
            cols = torch.cat([segment.cols, new.expand(request.batch, -1)], dim=1)
            a = scatter_rows(a, cols, n_keys, 3)
        out.append(a)
    output.attentions = tuple(out)

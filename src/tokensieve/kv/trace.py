"""What every query attended: per layer, per step (step 0 = the prefill's last query), cache positions."""

from __future__ import annotations

import torch


class KVTraceError(KeyError):
    """A layer or step that the trace did not record."""


class KVTrace:
    """Records, for the last query of every forward pass, the cache positions it attended.

    A new request (a forward pass without a past) clears the trace, so after ``generate()`` it holds that
    call's prefill (step 0) and every decode step (1, 2, ...). Ragged sets (samples of a batch with different
    counts) are padded with -1.
    """

    def __init__(self) -> None:
        self._steps: dict[int, list[torch.Tensor | tuple[str, torch.Tensor]]] = {}
        self.stats: dict[str, float] = {}

    def reset(self) -> None:
        self._steps.clear()

    def record(self, layer: int, sets: list[torch.Tensor]) -> None:
        """``sets``: per sample a LongTensor [G, k] of cache positions (-1 = empty)."""
        self._steps.setdefault(layer, []).append(_stack(sets))

    def record_dense(self, layer: int, valid: torch.Tensor) -> None:
        self._steps.setdefault(layer, []).append(("dense", valid.detach().clone()))

    @property
    def layers(self) -> list[int]:
        return sorted(self._steps)

    def n_steps(self, layer: int) -> int:
        return len(self._steps.get(layer, []))

    def kv_selected(self, layer: int, step: int = 0) -> torch.Tensor:
        """LongTensor [B, H or 1, k]: cache positions attended by the last query of ``step`` at ``layer``."""
        if layer not in self._steps:
            raise KVTraceError(f"layer {layer} was not traced; traced layers: {self.layers}")
        steps = self._steps[layer]
        if not -len(steps) <= step < len(steps):
            raise KVTraceError(f"step {step} was not traced at layer {layer}; steps 0..{len(steps) - 1} exist")
        rec = steps[step]
        if isinstance(rec, tuple):
            valid = rec[1]
            return _stack([torch.nonzero(row).view(1, -1) for row in valid])
        return rec


def _stack(sets: list[torch.Tensor]) -> torch.Tensor:
    g = max(s.shape[0] for s in sets)
    k = max(s.shape[1] for s in sets)
    out = torch.full((len(sets), g, k), -1, dtype=torch.long, device=sets[0].device)
    for b, s in enumerate(sets):
        out[b, : s.shape[0], : s.shape[1]] = s
    return out

"""The ``own_qk`` signal: q/k of the pruning layer itself, computed from its input at its pre-hook.

PyramidDrop and TransPrune score at stage layer ``l`` with layer ``l``'s own ``input_layernorm``, ``q_proj``
and ``k_proj`` applied to its input (the official ``pdrop_rank_drop`` / ``transprune_rank_drop``). A method
declares ``"own_qk"`` in ``needs`` and reads ``ctx.capture(ctx.layer)``. Until the framework offers the
signal (it is not in :data:`tokensieve.methods.base.SIGNALS`), these methods fall back to the q/k of layer
``l - 1`` and say so in their ``fidelity`` note.
"""

from __future__ import annotations

from .base import SIGNALS

OWN_QK_SUPPORTED = "own_qk" in SIGNALS
FALLBACK_NOTE = (
    "NOT faithful yet: scores with the q/k of layer l-1 because this framework has no 'own_qk' signal "
    "(the official code uses layer l's own q/k on its input)"
)


def attention_needs(*others: str) -> frozenset[str]:
    """``needs`` of a method that scores with the stage layer's own attention (or its fallback)."""
    return frozenset({*others, "own_qk" if OWN_QK_SUPPORTED else "attention"})


def score_layer(layer: int) -> int:
    """The layer whose q/k a stage at ``layer`` scores with: itself, or ``layer - 1`` as the fallback."""
    return layer if OWN_QK_SUPPORTED else layer - 1

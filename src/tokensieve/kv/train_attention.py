"""Training-only attention supervision for the embedded KV model (``scripts/kv_train.py --attn-weight``).

A 2-layer LM trained from scratch on needle retrieval sits for a long time on the plateau before the lookup
circuit forms (docs/kv/embedded_model.md: about 250 minutes of CPU never got key matching at 128 tokens). The
circuit is known (an induction pair), so its attention patterns are supervised directly:

- ``prev`` (layer 0, head 0): each needle key/value slot and each labelled row attends to the token before it,
  which moves "my previous token is key K" into the value slot and K into the ``A`` row;
- ``chain`` (layer 1, head 0, models of 3 layers or more): each needle value slot whose key had an earlier
  needle attends to that needle's value slot, which moves the previous value in (multivalue's ordered walk: the
  row of answer j then finds the slot whose previous value is j); ``chain_targets`` names the variants;
- ``lookup`` (last layer, head 0): each labelled row whose target sits in a needle's value slot attends to that
  slot (for multivalue, the j-th needle gives the j-th answer; for vartrack, every hop is one lookup).

The loss is ``-log`` of the attention mass on the target positions, averaged over rows; it is added to the answer
cross-entropy with a weight. Only training uses it: the saved model is a plain ``LlamaForCausalLM`` whose config
names ``sdpa``. Its retrieval heads are sharper than an LLM's, which makes selection easier than on real models;
docs/kv/embedded_model.md says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

from .tasks import NEEDLE, Q

NAME = "tokensieve_kv_supervised"


def _needles(tokens: list[int]) -> list[tuple[int, int]]:
    """(key token, value slot position) of each needle before the first question, in order."""
    stop = tokens.index(Q) if Q in tokens else len(tokens)
    return [(tokens[p + 1], p + 2) for p in range(min(stop, len(tokens) - 2)) if tokens[p] == NEEDLE]


def value_slots(tokens: list[int]) -> dict[int, list[int]]:
    """Needle value token -> the positions of the value slots holding it (needles before the first question)."""
    slots: dict[int, list[int]] = {}
    for _, pos in _needles(tokens):
        slots.setdefault(tokens[pos], []).append(pos)
    return slots


CHAINS = ("previous", "previous-sink", "all-sink")


def chain_targets(tokens: list[int], mode: str = "previous") -> list[tuple[int, list[int]]]:
    """[(value slot, [target positions])] of the chain head. ``previous``: a value slot whose key had an earlier
    needle points at that needle's value slot (the p1-p7 recipe). ``all-sink``: at every earlier value slot of
    its key, since a head cannot tell the most recent of several far-away matches from the others (p7 split
    50/50); ``-sink``: a key's first value slot points at BOS (position 0), so it
    carries a "first" flag instead of a copy of itself, which competed with the second needle's lookup."""
    if mode not in CHAINS:
        raise ValueError(f"unknown chain mode {mode!r}; modes: {', '.join(CHAINS)}")
    seen: dict[int, list[int]] = {}
    chain = []
    for key, pos in _needles(tokens):
        earlier = seen.setdefault(key, [])
        if earlier:
            chain.append((pos, list(earlier) if mode == "all-sink" else [earlier[-1]]))
        elif mode != "previous":
            chain.append((pos, [0]))
        earlier.append(pos)
    return chain


Pointers = list[tuple[int, list[int]]]


def sequence_targets(tokens: list[int], labels: list[int], chain: str = "previous"
                     ) -> tuple[list[int], Pointers, Pointers]:
    """(prev rows, chain pointers, lookup pointers) of one training sequence (PAD rows carry label -100); a
    pointer is (row, target positions)."""
    slots = value_slots(tokens)
    needle_rows = [p - d for ps in slots.values() for p in ps for d in (0, 1)]  # value slots and key slots
    labelled = [i for i, y in enumerate(labels) if y != -100]
    prev = sorted(set(needle_rows + labelled) - {0})
    lookup = [(i, slots[labels[i]]) for i in labelled if labels[i] in slots and max(slots[labels[i]]) <= i]
    return prev, chain_targets(tokens, chain), lookup


@dataclass
class Rows:
    """Supervised rows of one layer: batch index [R], query row [R], target mask [R, T]."""

    batch: torch.Tensor
    row: torch.Tensor
    target: torch.Tensor


def _rows(pairs: list[tuple[int, int, list[int]]], width: int) -> Rows | None:
    if not pairs:
        return None
    target = torch.zeros(len(pairs), width, dtype=torch.bool)
    for r, (_, _, pos) in enumerate(pairs):
        target[r, pos] = True
    return Rows(torch.tensor([b for b, _, _ in pairs]), torch.tensor([i for _, i, _ in pairs]), target)


def pointer_loss(query: torch.Tensor, key: torch.Tensor, rows: Rows, head: int, scaling: float) -> torch.Tensor:
    """Mean ``-log`` attention mass on the targets: query [B, H, T, D], key [B, H_kv, T, D]."""
    kv_head = head // (query.shape[1] // key.shape[1])
    q = query[rows.batch, head, rows.row]  # [R, D]
    k = key[rows.batch, kv_head]  # [R, T, D]
    scores = torch.einsum("rd,rtd->rt", q, k) * scaling
    future = torch.arange(key.shape[2])[None, :] > rows.row[:, None]
    logp = scores.masked_fill(future, float("-inf")).log_softmax(-1)
    return -logp.masked_fill(~rows.target, float("-inf")).logsumexp(-1).mean()


@dataclass
class AttentionSupervisor:
    """Registers the supervised attention function; ``set_batch`` before each training forward, then ``loss``."""

    n_layers: int
    head: int = 0
    chain: str = "previous"  # chain_targets' mode
    rows: dict[int, Rows | None] = field(default_factory=dict)
    losses: list[torch.Tensor] = field(default_factory=list)

    def install(self, model) -> None:
        AttentionInterface.register(NAME, self._attention)
        ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
        model.config._attn_implementation = NAME

    @staticmethod
    def uninstall(model) -> None:
        model.config._attn_implementation = "sdpa"

    def set_batch(self, ids: torch.Tensor, labels: torch.Tensor) -> None:
        prev, chain, lookup = [], [], []
        for b, (t, y) in enumerate(zip(ids.tolist(), labels.tolist(), strict=True)):
            p, ch, lk = sequence_targets(t, y, self.chain)
            prev += [(b, i, [i - 1]) for i in p]
            chain += [(b, i, pos) for i, pos in ch]
            lookup += [(b, i, pos) for i, pos in lk]
        self.rows = {0: _rows(prev, ids.shape[1]), self.n_layers - 1: _rows(lookup, ids.shape[1])}
        if self.n_layers >= 3:  # a middle layer hosts the chain (2 layers have none to spare)
            self.rows[1] = _rows(chain, ids.shape[1])
        self.losses = []

    def loss(self) -> torch.Tensor:
        out = torch.stack(self.losses).mean() if self.losses else torch.zeros(())
        self.rows, self.losses = {}, []
        return out

    def _attention(self, module, query, key, value, attention_mask, **kwargs):
        rows = self.rows.get(module.layer_idx)
        if rows is not None and torch.is_grad_enabled():
            scaling = kwargs.get("scaling") or query.shape[-1] ** -0.5
            self.losses.append(pointer_loss(query, key, rows, self.head, scaling))
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

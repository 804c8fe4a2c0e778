"""Typed contexts handed to methods: a method's ``select`` is a pure function of one of these.

The framework fills only what the method declares in ``needs``; everything else stays ``None``.
Shapes use ``n`` for the image's candidate tokens (those still present when the stage runs), ``D`` for the
language model width, ``d_in`` for the projector input width, ``t`` for the prompt's text tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .ops.attention import attention_rows


@dataclass
class Selection:
    """A selection that also rewrites some kept tokens (token merging, recycling).

    ``keep``: LongTensor [k] indices into the candidates. ``replace_at``: LongTensor [r] indices into the
    candidates (each must be in ``keep``) whose language-model input is replaced by ``replace_with`` [r, D].
    """

    keep: torch.Tensor
    replace_at: torch.Tensor | None = None
    replace_with: torch.Tensor | None = None


@dataclass
class VisionSignals:
    """Signals from inside the vision tower of one image (or one crop group), captured by hooks.

    ``queries[layer]`` / ``keys[layer]``: [H, 1 + P, d] per captured layer (index 0 is CLS when ``has_cls``),
    ``hidden[layer]``: [1 + P, d_v] hidden states *output* by that layer. ``patch_index``: LongTensor [n] maps each
    candidate token to its patch row in those tensors (after the CLS offset), per crop for LLaVA-NeXT
    (``crop_of_token`` [n] tells which crop's tensors to use).
    """

    queries: dict[int, list[torch.Tensor]] = field(default_factory=dict)  # layer -> per crop [H, T, d]
    keys: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    values: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    hidden: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    has_cls: bool = True
    n_layers: int = 0

    def attention(self, layer: int, crop: int = 0) -> torch.Tensor:
        """Softmax attention [H, T, T] of one vision layer of one crop, recomputed from its q/k (no eager needed)."""
        q, k = self.queries[layer][crop], self.keys[layer][crop]
        return attention_rows(q[None], k[None])[0]


@dataclass
class ImageContext:
    """Pre-LLM context of one image (stages ``vision`` and ``projector``)."""

    sample: int
    image: int
    n_tokens: int  # visual tokens of this image before any pruning
    token_index: torch.Tensor  # [n] indices of the candidates in the image's original token order
    features: torch.Tensor  # [n, D] projected features, exactly what the language model receives
    grid_rc: torch.Tensor  # [n, 2] (row, col) of each token in its crop's grid; (-1, -1) for newline tokens
    grid_hw: tuple[int, int]  # grid size of one crop
    groups: torch.Tensor  # [n] crop id (0 for single-crop families); budgets may be split per group
    always_keep: torch.Tensor  # [n] bool: tokens the family never drops (LLaVA-NeXT image_newline)
    pre_features: torch.Tensor | None = None  # [n, d_in] projector input per token
    project: Callable[[torch.Tensor], torch.Tensor] | None = None  # [m, d_in] -> [m, D], the projector M
    projector_module: torch.nn.Module | None = None  # the projector itself (for low-rank copies and closed forms)
    text_ids: torch.Tensor | None = None  # [t] token ids of the prompt's text (no image placeholders, no padding)
    text_embeds: torch.Tensor | None = None  # [t, D] input embeddings of those tokens
    embed_tokens: Callable[[torch.Tensor], torch.Tensor] | None = None  # ids -> LM input embeddings
    vision: VisionSignals | None = None
    vision_patch_index: torch.Tensor | None = None  # [n] patch row of each candidate in its crop's vision tensors
    seed: int | None = None
    family: str = ""

    @property
    def n(self) -> int:
        return int(self.token_index.numel())

    def generator(self, seed: int) -> torch.Generator:
        """A generator seeded by ``seed`` and this image's place in the batch: same seed, same tokens."""
        return torch.Generator(device="cpu").manual_seed(int(seed) * 1_000_003 + self.sample * 1009 + self.image)


@dataclass
class LLMContext:
    """In-LLM context of one image at decoder layer ``layer`` (the stage prunes from this layer on).

    ``hidden`` holds the image's candidates at the input of ``layer``. Attention rows are recomputed from the
    queries and keys of layer ``layer - 1`` after RoPE (captured by hooks), never from ``output_attentions``.
    """

    sample: int
    image: int
    layer: int
    n_layers: int
    n_tokens: int
    token_index: torch.Tensor  # [n] indices into the image's original token order
    hidden: torch.Tensor  # [n, D]
    text_hidden: torch.Tensor  # [t, D] hidden states of the sample's text tokens at the same layer
    text_after_image: torch.Tensor  # [t] bool: text token lies after this image (the instruction)
    queries: torch.Tensor | None = None  # [H, L_s, d] layer-1 queries after RoPE of the whole sample
    keys: torch.Tensor | None = None  # [H_kv, L_s, d]
    key_valid: torch.Tensor | None = None  # [L_s] bool
    positions_in_sample: torch.Tensor | None = None  # [n] rows of this image inside the sample's tensors
    text_positions_in_sample: torch.Tensor | None = None  # [t] rows of the text tokens
    last_position_in_sample: int = -1  # row of the last prompt token
    stage_index: int = 0  # which of the method's layers this is
    previous_hidden: torch.Tensor | None = None  # [n, D] image candidates at the input of layer - 1
    seed: int | None = None
    extra: dict = field(default_factory=dict)

    @property
    def n(self) -> int:
        return int(self.token_index.numel())

    def generator(self, seed: int) -> torch.Generator:
        return torch.Generator(device="cpu").manual_seed(
            int(seed) * 1_000_003 + self.sample * 1009 + self.image * 7 + self.layer
        )

    def attention_from(self, query_rows: torch.Tensor) -> torch.Tensor:
        """Attention [H, q, n] from the given sample rows (queries of layer - 1) to this image's candidates."""
        if self.queries is None or self.keys is None:
            raise RuntimeError("this method did not declare 'attention' in needs, so no queries were captured")
        q = self.queries[:, query_rows][None]
        qpos = query_rows[None]
        probs = attention_rows(q, self.keys[None], key_mask=self.key_valid[None], query_positions=qpos)[0]
        return probs[:, :, self.positions_in_sample]

    def last_token_attention(self) -> torch.Tensor:
        """Head-averaged attention [n] of the last prompt token to this image (FastV, PDrop)."""
        rows = torch.tensor([self.last_position_in_sample], device=self.hidden.device)
        return self.attention_from(rows).mean(0)[0]

    def instruction_attention(self) -> torch.Tensor:
        """Head- and row-averaged attention [n] of the text tokens after the image (the instruction)."""
        rows = self.text_positions_in_sample[self.text_after_image]
        if rows.numel() == 0:
            rows = torch.tensor([self.last_position_in_sample], device=self.hidden.device)
        return self.attention_from(rows).mean(0).mean(0)

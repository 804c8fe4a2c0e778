"""Typed contexts handed to methods: a method's ``select`` is a pure function of one of these.

The framework fills only what the method declares in ``needs``; everything else stays ``None``.
Shapes use ``n`` for the image's candidate tokens (those still present when the stage runs), ``D`` for the
language model width, ``d_in`` for the projector input width, ``t`` for the prompt's text tokens.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .ops.attention import attention_rows


def seeded_generator(seed: int, content_key: int, layer: int = 0) -> torch.Generator:
    """A CPU generator from the method's ``seed``, the image's content key and (for LLM contexts) the layer.

    The three are hashed together (blake2b), so any seed in [0, 2**63) works, and the draw depends on the image's
    content, never on its place in the batch, the batch size or the padding."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ValueError(f"seed={seed!r}: pass an int in [0, 2**63 - 1]")
    data = b"".join(int(v).to_bytes(8, "little", signed=True) for v in (seed, content_key, layer))
    mixed = int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") >> 1
    return torch.Generator(device="cpu").manual_seed(mixed)


def _key_of(x: torch.Tensor) -> int:
    from .core.images import content_key

    return content_key(x)


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

    ``queries[layer]`` / ``keys[layer]``: [H, T, d] per captured layer and crop (after the tower's rotary
    embedding, if any), ``hidden[layer]``: [T, d_v] hidden states *output* by that layer.

    - CLIP (LLaVA, LLaVA-NeXT): ``has_cls``, T = 1 + P, row 0 is CLS; ``merge_size = 1``.
    - Qwen2-VL / Qwen2.5-VL: no CLS, one "crop" per frame (an image is one frame), T = P patches in natural
      (un-windowed) order, grouped by merge unit: ``merge_size = 2`` and LLM token ``t`` of the frame is the 2x2
      group of patch rows ``t * 4 .. t * 4 + 3``.

    ``ImageContext.vision_patch_index`` [n] holds each candidate's *unit* in its crop: its rows are
    ``patch_rows(unit)`` (the CLS offset is already in the unit on CLIP, where a unit is one patch).
    ``crop_of_token`` is ``ImageContext.groups``: which crop's tensors a candidate uses.
    """

    queries: dict[int, list[torch.Tensor]] = field(default_factory=dict)  # layer -> per crop [H, T, d]
    keys: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    values: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    hidden: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    has_cls: bool = True
    feature_layer: int | None = None  # index of the layer the projector reads (the sieve sets and captures it)
    n_layers: int = 0
    merge_size: int = 1  # patches per LLM token along each axis (Qwen2-VL family: 2)

    def attention(self, layer: int, crop: int = 0) -> torch.Tensor:
        """Softmax attention [H, T, T] of one vision layer of one crop, recomputed from its q/k (no eager needed).

        Always *full* attention over the crop's tokens: on Qwen2.5-VL's window blocks (all but
        ``fullatt_block_indexes``) the real forward attends within windows only, so there this is a recomputation
        over all patches (as HiPrune's official flash-attention path does), not the block's own attention."""
        q, k = self.queries[layer][crop], self.keys[layer][crop]
        return attention_rows(q[None], k[None])[0]

    def patch_rows(self, units: torch.Tensor) -> torch.Tensor:
        """Rows [n, merge_size**2] of the vision tensors that make up each unit (LLM token) in ``units`` [n]."""
        size = self.merge_size * self.merge_size
        return units[:, None] * size + torch.arange(size, device=units.device)


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
    family: str = ""
    text_segment: torch.Tensor | None = None  # [t] index of the last image before each text token (-1: none)
    content_key: int | None = None  # hash of the image's content (the sieve sets it; None: hash of ``features``)

    @property
    def n(self) -> int:
        return int(self.token_index.numel())

    def generator(self, seed: int) -> torch.Generator:
        """A generator from ``seed`` and the image's content: same image and seed, same draw, wherever the image
        sits in the batch."""
        key = self.content_key if self.content_key is not None else _key_of(self.features)
        return seeded_generator(seed, key)


@dataclass
class LayerCapture:
    """Signals of one decoder layer for one sample, in that layer's own layout.

    ``cols`` [L_j] are the original prompt columns of the layer's rows (the layout may already be pruned),
    ``valid`` [L_j] marks real tokens. ``queries`` [H, L_j, d] / ``keys`` [H_kv, L_j, d] are after RoPE;
    ``hidden`` [L_j, D] is the layer's input; ``attn_in``/``attn_out``/``mlp_in``/``mlp_out`` [L_j, D] are the
    normed inputs and outputs of its attention and MLP sub-blocks (TransPrune's token transition).
    """

    cols: torch.Tensor
    valid: torch.Tensor
    queries: torch.Tensor | None = None
    keys: torch.Tensor | None = None
    hidden: torch.Tensor | None = None
    attn_in: torch.Tensor | None = None
    attn_out: torch.Tensor | None = None
    mlp_in: torch.Tensor | None = None
    mlp_out: torch.Tensor | None = None

    def rows(self, cols: torch.Tensor) -> torch.Tensor:
        """Rows of this layout holding the given original columns (-1 where absent)."""
        size = int(max(int(self.cols.max()), int(cols.max()))) + 1
        lookup = torch.full((size,), -1, dtype=torch.long, device=self.cols.device)
        lookup[self.cols[self.valid]] = torch.nonzero(self.valid).flatten()
        return lookup[cols.to(self.cols.device)]


@dataclass
class LLMContext:
    """In-LLM context of one image at decoder layer ``layer`` (the stage prunes from this layer on).

    Tokens are addressed by their original prompt column: ``image_cols`` [n] (the image's candidates, in order),
    ``text_cols`` [t] (the sample's text tokens), ``last_col`` (the last prompt token). ``hidden`` [n, D] holds
    the candidates at the input of ``layer``. Attention rows are recomputed from captured queries and keys after
    RoPE (``layers[j]``, by default ``j = layer - 1``), never from ``output_attentions``.
    """

    sample: int
    image: int
    layer: int
    n_layers: int
    n_tokens: int
    token_index: torch.Tensor  # [n] indices into the image's original token order
    hidden: torch.Tensor  # [n, D]
    text_hidden: torch.Tensor  # [t, D] hidden states of the sample's text tokens at the same layer
    image_cols: torch.Tensor  # [n]
    text_cols: torch.Tensor  # [t]
    text_after_image: torch.Tensor  # [t] bool: text token lies after this image (the instruction)
    last_col: int
    layers: dict[int, LayerCapture] = field(default_factory=dict)
    stage_index: int = 0  # which of the method's layers this is
    norm: Callable[[torch.Tensor], torch.Tensor] | None = None  # the decoder's final norm
    extra: dict = field(default_factory=dict)
    content_key: int | None = None  # hash of the image's content (the sieve sets it; None: hash of ``hidden``)

    @property
    def n(self) -> int:
        return int(self.token_index.numel())

    def generator(self, seed: int) -> torch.Generator:
        """A generator from ``seed``, the image's content and this layer (never the image's batch position)."""
        key = self.content_key if self.content_key is not None else _key_of(self.hidden)
        return seeded_generator(seed, key, self.layer)

    def capture(self, layer: int | None = None) -> LayerCapture:
        """Signals of decoder layer ``layer`` (default ``layer - 1``); ``capture(self.layer)`` is this layer's own
        q/k computed from its input, for methods that declare ``"own_qk"``."""
        layer = self.layer - 1 if layer is None else layer
        if layer not in self.layers:
            raise RuntimeError(
                f"layer {layer} was not captured; declare it in the method's capture_layers() and its signal in needs"
            )
        return self.layers[layer]

    def attention_from(self, query_cols: torch.Tensor, layer: int | None = None) -> torch.Tensor:
        """Attention [H, q, n] from the given prompt columns to this image's candidates at ``layer``."""
        cap = self.capture(layer)
        if cap.queries is None or cap.keys is None:
            raise RuntimeError("no queries were captured: declare 'attention' in the method's needs")
        q_rows = cap.rows(query_cols)
        q = cap.queries[:, q_rows][None]
        probs = attention_rows(q, cap.keys[None], key_mask=cap.valid[None], query_positions=q_rows[None])[0]
        return probs[:, :, cap.rows(self.image_cols)]

    def last_token_attention(self, layer: int | None = None) -> torch.Tensor:
        """Head-averaged attention [n] of the last prompt token to this image (FastV, PDrop)."""
        cols = torch.tensor([self.last_col], device=self.hidden.device)
        return self.attention_from(cols, layer).mean(0)[0]

    def instruction_attention(self, layer: int | None = None) -> torch.Tensor:
        """Head- and row-averaged attention [n] of the text tokens after the image (the instruction)."""
        cols = self.text_cols[self.text_after_image]
        if cols.numel() == 0:
            cols = torch.tensor([self.last_col], device=self.hidden.device)
        return self.attention_from(cols, layer).mean(0).mean(0)

    def image_rows(self, layer: int | None = None) -> torch.Tensor:
        """Rows of this image's candidates in a captured layer's tensors."""
        return self.capture(layer).rows(self.image_cols)

"""CATP stage 2: in-LLM pruning of multimodal in-context prompts (demonstrations by attention gain, then the query)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..budget import resolve_keep
from ..context import LayerCapture, LLMContext
from ..ops import topk_indices
from ._layers import normalize_layer, scale_layer
from .base import LLMMethod, MethodError, register

PAPER_K = 6  # K=6 for the 7B/8B models of the paper (K=10 for the 13B one)


def layer_output(cap: LayerCapture) -> torch.Tensor:
    """Output [L_j, D] of a captured decoder layer: input + attention block + MLP block (pre-norm residual)."""
    if cap.hidden is None or cap.attn_out is None or cap.mlp_out is None:
        raise RuntimeError("catp_llm needs 'layer_hidden' and 'sublayer_io' of its capture layers")
    return cap.hidden + cap.attn_out + cap.mlp_out


def image_columns(cap: LayerCapture, text_cols: torch.Tensor) -> torch.Tensor:
    """Sorted prompt columns [m] of the visual tokens (of every image) present in a captured layout."""
    cols = torch.sort(cap.cols[cap.valid]).values
    is_text = torch.isin(cols, text_cols.to(cols.device))
    return cols[~is_text]


def last_image_block(cap: LayerCapture, text_cols: torch.Tensor, after: int) -> torch.Tensor:
    """Columns of the last run of visual tokens (no text token between them) that lie after column ``after``."""
    cols = torch.sort(cap.cols[cap.valid]).values
    is_text = torch.isin(cols, text_cols.to(cols.device))
    text_pos = torch.nonzero(is_text).flatten()
    last_text_before = -1
    image_pos = torch.nonzero(~is_text).flatten()
    if image_pos.numel() == 0:
        return cols[:0]
    last_image = int(image_pos[-1])
    before = text_pos[text_pos < last_image]
    if before.numel():
        last_text_before = int(before[-1])
    block = cols[last_text_before + 1 : last_image + 1]
    return block[block > after]


def original_span(ctx: LLMContext) -> tuple[int, int]:
    """First and last prompt column of this image's placeholders (they are contiguous in every family)."""
    first = int(ctx.image_cols[0]) - int(ctx.token_index[0])
    last = int(ctx.image_cols[-1]) + (ctx.n_tokens - 1 - int(ctx.token_index[-1]))
    return first, last


@register
@dataclass
class CATPLLM(LLMMethod):
    """CATP stage 2 (AAAI 2026, arXiv 2508.07871; paper only, no official code): in-LLM pruning of multimodal
    in-context prompts, demonstrations first (2a), then the query image (2b).

    An image is a *demonstration* when another image follows it in the sample; the last image is the *query*.
    Stages ``llm`` at two layers, ``[K + 1, K + 2]``, with ``K`` the paper's layer (``K=6`` of 32, scaled:
    ``max(1, round(6/32 * n_layers))``; pass ``k_layer``). The paper prunes at K and K+1 with signals of those
    layers; the sieve hands a stage at layer ``l`` only the signals of layers ``< l``, so each step runs one layer
    later than in the paper, with the paper's signals:

    * 2a, at layer ``K + 1`` (demonstrations; the query is left whole): with ``A_j`` the head-averaged attention
      row of the last prompt token recomputed from the q/k after RoPE of layer ``j``,
      ``score(c) = max(0, A_K[q_last, c] - A_{K-1}[q_last, c]) + lam2 * cos(h_K(c), mean_q h_K(q))``,
      ``q`` over the query image's present tokens, ``h_K`` the output of layer K (the input of layer ``K + 1``
      for ``c``; rebuilt as input + attention block + MLP block of layer K for the query tokens). ``lam2=0.6``.
    * 2b, at layer ``K + 2`` (query image): ``score(q) = cos(h_{K+1}(q), mean_c h_{K+1}(c))`` over the
      demonstration tokens kept by 2a (``h_{K+1}`` from layer K+1's captured input and sub-block outputs). A
      prompt with a single image has no demonstrations: its image is scored by cosine to the mean hidden state
      of the text after it (a fallback of ours, not in the paper).

    Signals: q/k of layers ``K`` and ``K - 1`` (2a) and the input hidden states and sub-block outputs of layers
    ``K`` (2a) and ``K + 1`` (2b), hidden states [n, D] at the pruning layer.

    Budget: ``keep`` is each image's final count (``int(keep * S_i)`` or the int). With CATP stage 1
    (:class:`~tokensieve.methods.catp.CATP` with ``paper_schedule=True`` and the same ``keep``), stage 1 removes
    ``R/2`` and this stage the rest. **Difference from the paper:** the paper pools the demonstration tokens of
    all images and ranks them *globally* to the overall ratio, so a demonstration's share adapts to its score;
    budgets in this framework are per image, so each demonstration is ranked on its own and keeps exactly its
    ``keep`` (no adaptive share). Query image: per image in both. Positions: ``original`` (the paper claims
    FlashAttention compatibility, no re-indexing is described).

    Image spans: a demonstration finds the query's tokens as the last run of visual tokens not interrupted by
    text (CATP prompts put each demonstration's question and answer after its image). When several images sit
    back to back without text between them at the end of the prompt, that run holds all of them after this image.
    """

    keep: float | int = 0.5
    layer: int | None = None  # the first pruning layer (K + 1); default from k_layer
    k_layer: int | None = None
    lam2: float = 0.6

    name = "catp_llm"
    needs = frozenset({"hidden", "attention", "layer_hidden", "sublayer_io"})
    paper = "CATP: Contextually Adaptive Token Pruning for Efficient Multimodal In-Context Learning (stage 2)"
    arxiv = "2508.07871"
    fidelity = "paper only, no code: steps run one layer later than the paper; per-image instead of global ranking"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.lam2 < 0:
            raise MethodError(f"catp_llm: lam2={self.lam2} must be >= 0")

    def paper_k(self, n_layers: int) -> int:
        """The paper's layer K for this depth."""
        if self.layer is not None:
            return normalize_layer(self.layer, n_layers, name="catp_llm: layer") - 1
        if self.k_layer is not None:
            return normalize_layer(self.k_layer, n_layers, name="catp_llm: k_layer")
        return scale_layer(PAPER_K, n_layers)

    def llm_layers(self, n_layers: int) -> list[int]:
        k = self.paper_k(n_layers)
        if not 1 <= k <= n_layers - 3:
            if n_layers < 4:
                raise MethodError(
                    f"catp_llm: prunes at layers K+1 and K+2 from attention of layers K-1 and K, so it needs at "
                    f"least 4 decoder layers; this model has {n_layers}"
                )
            raise MethodError(
                f"catp_llm: K={k} needs layers K-1..K+2 inside the model's {n_layers} decoder layers "
                f"(pass K with 1 <= K <= {n_layers - 3})"
            )
        return [k + 1, k + 2]

    def capture_layers(self, layer: int, n_layers: int) -> list[int]:
        first = self.llm_layers(n_layers)[0]
        return [layer - 1, layer - 2] if layer == first else [layer - 1]

    def budget(self, n_tokens: int, *, stage_index: int = 0, n_layers: int = 0) -> int:
        return resolve_keep(self.keep, n_tokens, strict=False)

    def select(self, ctx: LLMContext, k: int) -> torch.Tensor:
        first, last = original_span(ctx)
        kk = ctx.layer - 1 if ctx.stage_index == 0 else ctx.layer - 2  # the paper's K
        later = image_columns(ctx.capture(ctx.layer - 1), ctx.text_cols)
        is_query = not bool((later > last).any())
        everything = torch.arange(ctx.n, device=ctx.token_index.device)
        if ctx.stage_index == 0:
            if is_query:
                return everything  # 2a prunes demonstrations only
            return topk_indices(self.demonstration_scores(ctx, kk, last), k)
        if not is_query:
            return everything  # already at its budget after 2a
        return topk_indices(self.query_scores(ctx, first), k)

    def demonstration_scores(self, ctx: LLMContext, kk: int, last: int) -> torch.Tensor:
        """2a: attention gain of the last prompt token plus ``lam2`` x cosine to the query image, [n]."""
        gain = (ctx.last_token_attention(kk) - ctx.last_token_attention(kk - 1)).clamp(min=0).float()
        cap = ctx.capture(kk)
        query_cols = last_image_block(cap, ctx.text_cols, last)
        if query_cols.numel() == 0:
            return gain
        anchor = layer_output(cap)[cap.rows(query_cols)].float().mean(0)
        cos = F.cosine_similarity(ctx.hidden.float(), anchor[None], dim=-1, eps=1e-8)
        return gain + self.lam2 * cos

    def query_scores(self, ctx: LLMContext, first: int) -> torch.Tensor:
        """2b: cosine of each query token to the mean of the kept demonstration tokens, [n]."""
        cap = ctx.capture(ctx.layer - 1)
        image_cols = image_columns(cap, ctx.text_cols)
        context_cols = image_cols[image_cols < first]
        if context_cols.numel():
            anchor = layer_output(cap)[cap.rows(context_cols)].float().mean(0)
        else:
            text = ctx.text_hidden[ctx.text_after_image]
            text = ctx.text_hidden if text.shape[0] == 0 else text
            anchor = text.float().mean(0)
        return F.cosine_similarity(ctx.hidden.float(), anchor[None], dim=-1, eps=1e-8)

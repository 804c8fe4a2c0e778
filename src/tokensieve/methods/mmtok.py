"""MMTok: multimodal coverage maximisation over text and vision tokens, plus the prompt-text helpers that the
other text-aware projector methods (IDPruner's ``text`` importance, CATP) share."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from ..budget import split_budget
from ..context import ImageContext
from ..ops import max_coverage
from .base import Method, MethodError, register

# The official keyword filter (``mmtok/core/text_processor.py``, NON_VISUAL_WORDS): words with little visual content.
STOPWORDS = frozenset(
    {
        "a", "an", "the", "is", "are", "was", "were", "be", "been", "being", "have", "has", "had", "do", "does",
        "did", "it", "they", "he", "she", "we", "you", "i", "what", "where", "when", "why", "how", "who", "which",
        "and", "or", "but", "so", "if", "then", "question", "answer", "to", "for", "with", "by", "from", "at",
        "into", "onto", "upon",
    }
)  # fmt: skip
# Chat-template role words: the official code embeds the question alone, our context holds the whole prompt.
TEMPLATE_WORDS = frozenset({"user", "assistant", "system", "human", "gpt"})
# Evaluation instructions the official code strips before extracting keywords.
INSTRUCTION_SUFFIXES = (
    "Answer the question using a single word or phrase.",
    "Answer with the option's letter from the given choices directly.",
)
_WORD = re.compile(r"\b\w+\b")
TEXT_SPANS = ("all", "after", "paired")


def text_span_mask(ctx: ImageContext, span: str) -> torch.Tensor:
    """Which of ``ctx.text_ids`` belong to the text this image is paired with, BoolTensor [t].

    ``span``: ``"all"`` (the whole prompt text), ``"after"`` (text after this image: the question of a
    single-image prompt), ``"paired"`` (text between this image and the next one: a demonstration's Q/A in a
    multi-image in-context prompt; the whole prompt for a single-image prompt). The last two need
    ``ctx.text_segment`` ([t], index of the last image of the sample before each text token, -1 before the first
    one), which the core does not provide yet; without it, or when the span is empty, the whole prompt text is used.
    """
    if span not in TEXT_SPANS:
        raise MethodError(f"text span {span!r}: choose one of {TEXT_SPANS}")
    assert ctx.text_ids is not None
    everything = torch.ones(ctx.text_ids.shape[0], dtype=torch.bool, device=ctx.text_ids.device)
    segment = getattr(ctx, "text_segment", None)
    if span == "all" or segment is None:
        return everything
    if span == "paired" and int(segment.max()) < 1:
        return everything  # a single-image prompt: its text is the whole prompt
    mask = segment >= ctx.image if span == "after" else segment == ctx.image
    return mask if bool(mask.any()) else everything


def prompt_text_embeddings(ctx: ImageContext, span: str = "all") -> torch.Tensor:
    """Input embeddings [m, D] of the prompt's text tokens in ``span`` (no filtering)."""
    if ctx.text_embeds is None or ctx.text_ids is None:
        raise RuntimeError("text embeddings were not captured: the method must declare 'text' in needs")
    return ctx.text_embeds[text_span_mask(ctx, span)]


def keyword_embeddings(
    ctx: ImageContext, tokenizer: Any | None, span: str = "after", remove_stopwords: bool = True
) -> torch.Tensor:
    """Embeddings [m, D] of the question's keywords, as MMTok feeds them to the coverage (m may be 0).

    With a tokenizer (faithful): decode the span without special tokens, strip the two evaluation instructions,
    split into words, drop :data:`STOPWORDS` (if ``remove_stopwords``) and :data:`TEMPLATE_WORDS`, fall back to all
    words when nothing is left, re-tokenise the words without BOS or special tokens and embed them with the LM's
    input embedding table. Without one, the span's raw token embeddings are used as they are (BOS, template and
    stopword tokens included): a documented approximation, as token ids alone cannot be read as words.
    """
    if tokenizer is None:
        return prompt_text_embeddings(ctx, span)
    assert ctx.text_ids is not None and ctx.embed_tokens is not None
    ids = ctx.text_ids[text_span_mask(ctx, span)]
    text = tokenizer.decode(ids.tolist(), skip_special_tokens=True)
    for suffix in INSTRUCTION_SUFFIXES:
        text = text.replace(suffix, "")
    words = [w for w in _WORD.findall(text) if w.lower() not in TEMPLATE_WORDS]
    kept = [w for w in words if w.lower() not in STOPWORDS] if remove_stopwords else words
    kept = kept or words
    if not kept:
        return ctx.text_embeds[:0] if ctx.text_embeds is not None else torch.empty(0)
    word_ids = tokenizer(kept, is_split_into_words=True, add_special_tokens=False)["input_ids"]
    word_ids = torch.as_tensor(word_ids, dtype=torch.long, device=ctx.text_ids.device).flatten()
    with torch.no_grad():
        return ctx.embed_tokens(word_ids)


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    # The official code divides by max(norm, 1e-8).
    return F.normalize(x.float(), dim=-1, eps=1e-8)


def coverage_matrix(
    text: torch.Tensor, features: torch.Tensor, pre_features: torch.Tensor, alpha: float, tau_t: float, tau_v: float
) -> torch.Tensor:
    """MMTok's coverage matrix ``C = [P; alpha Q]``, shape [m + n, n].

    ``P = softmax(z_hat v_hat^T / tau_t, over vision) / m`` (text [m, D] against projected tokens [n, D], both
    L2-normalised, as in the official ``mm_coverage_selection``), ``Q = softmax(v'_hat v'_hat^T / tau_v) / n`` on the
    normalised projector inputs [n, d_in]. With no text (m = 0) ``C = alpha Q``.
    """
    v = _unit_rows(pre_features)
    q = torch.softmax(v @ v.T / tau_v, dim=1) / v.shape[0]
    if text.shape[0] == 0:
        return alpha * q
    z, x = _unit_rows(text.to(features.device)), _unit_rows(features)
    p = torch.softmax(z @ x.T / tau_t, dim=1) / z.shape[0]
    return torch.cat([p, alpha * q], dim=0)


@register
@dataclass
class MMTok(Method):
    """MMTok: Multimodal Coverage Maximization for Efficient Inference of VLMs (Dong et al., arXiv 2508.18264).

    Stage ``projector``. Signals: projected tokens ``v`` [n, D], projector inputs ``v'`` [n, d_in] (CLIP layer -2
    patches without CLS on LLaVA; on Qwen2.5-VL the 2x2 group of pre-merger patches, concatenated, [n, 4 d_v]),
    and text-token embeddings ``z`` [m, D] from the LM input embedding table. With
    ``P = softmax(z_hat v_hat^T / tau_t, dim=vision) / m`` and ``Q = softmax(v'_hat v'_hat^T / tau_v) / n`` (hats:
    L2-normalised rows; the official code normalises both text and vision), ``C = [P; alpha Q]`` [(m + n), n] is
    covered greedily (``ops.max_coverage``: gain ``sum_rows relu(C[:, j] - best)``), k picks. Kept tokens are
    sorted and re-indexed (``reindex``, as the official LLaVA code); Qwen keeps original M-RoPE positions.

    Text (official ``text_processor.py`` / ``mmtok_core.py``): the question's words minus a small stopword list,
    re-tokenised without BOS and embedded. Pass the processor's tokenizer (``tokenizer=proc.tokenizer``) for that;
    without it the prompt's raw text-token embeddings are used (BOS, template and stopword tokens included).
    Which text: the text after the image when the core provides ``ctx.text_segment``, else the whole prompt
    (documented fallback; role words ``USER``/``ASSISTANT`` are dropped by the keyword filter).

    Defaults: ``alpha=0.5``, ``tau_t=0.02`` (``MMTokCore`` default; ``mm_coverage_selection``'s own default is
    0.01), ``tau_v=0.2``. Budget ``keep`` per image, ``int(ratio * n)`` for ratios.

    LLaVA-NeXT (official LLaVA code, VisionZip-style): selection runs per crop (base image and each tile) with an
    equal share of the budget, and the ``image_newline`` tokens are not fed at all; so ``per_crop=True`` and
    ``keep_newlines=False`` here. ``keep_newlines=True`` keeps them on top of the budget instead.

    Differences from the official code: the greedy is the incremental exact greedy of ``ops.max_coverage`` (same picks;
    ties to the lower index); per-crop budgets are ``k // n_crops`` with the remainder to the first crops (the
    official code gives every crop the same fixed count); the official Qwen path embeds ``"Question: " + q`` without
    stopword removal (``remove_stopwords=False`` reproduces that, minus the ``Question:`` prefix); HF tiles are
    unpadded, so tile sizes differ from the official 576.
    """

    alpha: float = 0.5
    tau_t: float = 0.02
    tau_v: float = 0.2
    per_crop: bool = True
    keep_newlines: bool = False
    remove_stopwords: bool = True
    tokenizer: Any = field(default=None, repr=False, compare=False)

    name = "mmtok"
    stage = "projector"
    needs = frozenset({"features", "pre_features", "text"})
    paper = "MMTok: Multimodal Coverage Maximization for Efficient Inference of VLMs"
    arxiv = "2508.18264"
    fidelity = "faithful with a tokenizer; without one, raw prompt-token embeddings stand in for the keywords"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.tau_t <= 0 or self.tau_v <= 0:
            raise MethodError(f"mmtok: temperatures must be positive, got tau_t={self.tau_t}, tau_v={self.tau_v}")
        if self.alpha < 0:
            raise MethodError(f"mmtok: alpha must be >= 0, got {self.alpha}")

    def cover(self, text: torch.Tensor, features: torch.Tensor, pre_features: torch.Tensor, k: int) -> torch.Tensor:
        """Greedy max-coverage picks (indices into ``features``) in selection order."""
        return max_coverage(coverage_matrix(text, features, pre_features, self.alpha, self.tau_t, self.tau_v), k)

    def select(self, ctx: ImageContext, k: int) -> torch.Tensor:
        text = keyword_embeddings(ctx, self.tokenizer, "after", self.remove_stopwords)
        pre = ctx.pre_features if ctx.pre_features is not None else ctx.features
        newline = ctx.always_keep
        cand = torch.nonzero(~newline).flatten()
        lines = torch.nonzero(newline).flatten()
        budget = min(k, cand.numel())
        groups = ctx.groups[cand]
        ids = torch.unique(groups).tolist() if self.per_crop else [None]
        members = [cand if g is None else cand[groups == g] for g in ids]
        shares = split_budget(budget, [int(m.numel()) for m in members])
        picks = [m[self.cover(text, ctx.features[m], pre[m], s)] for m, s in zip(members, shares, strict=True) if s]
        chosen = torch.cat(picks) if picks else cand[:0]
        if self.keep_newlines:
            return torch.cat([lines, chosen])
        # Only when the budget exceeds the non-newline tokens: fill it with newlines rather than fall short.
        return torch.cat([chosen, lines[: max(0, k - chosen.numel())]])

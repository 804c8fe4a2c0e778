"""Prompt-text helpers shared by the text-aware projector methods (MMTok's keywords, IDPruner's ``text``
importance, CATP's alignment term)."""

from __future__ import annotations

import re
from typing import Any

import torch

from ..context import ImageContext
from .base import MethodError

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


def keyword_words(text: str, remove_stopwords: bool = True, prefix: str = "") -> list[str]:
    """The words MMTok embeds for a question ``text``.

    ``remove_stopwords=True`` (official LLaVA path, ``extract_keywords_simple``): strip the two evaluation
    instructions, take ``\\b\\w+\\b`` words, drop :data:`STOPWORDS`; when nothing is left, the stripped text
    itself; then split on whitespace. ``False`` (official Qwen path): ``prefix + text`` split on whitespace,
    punctuation kept. Either way chat-template role words (:data:`TEMPLATE_WORDS`) are dropped, since the
    official code embeds the question alone and our context holds the prompt around it.
    """
    if remove_stopwords:
        for suffix in INSTRUCTION_SUFFIXES:
            text = text.replace(suffix, "")
        words = [w for w in _WORD.findall(text) if w.lower() not in TEMPLATE_WORDS]
        kept = [w for w in words if w.lower() not in STOPWORDS]
        text = " ".join(kept) if kept else text
    else:
        text = prefix + text
    return [w for w in text.split() if w.lower() not in TEMPLATE_WORDS]


def keyword_embeddings(
    ctx: ImageContext, tokenizer: Any | None, span: str = "after", remove_stopwords: bool = True, prefix: str = ""
) -> torch.Tensor:
    """Embeddings [m, D] of the question's keywords, as MMTok feeds them to the coverage (m may be 0).

    With a tokenizer (faithful): decode the span without special tokens, take :func:`keyword_words`, re-tokenise
    the words (``is_split_into_words``) without BOS or special tokens and embed them with the LM's input embedding
    table. Without one, the span's raw token embeddings are used as they are (BOS, template and stopword tokens
    included): a documented approximation, as token ids alone cannot be read as words.
    """
    if tokenizer is None:
        return prompt_text_embeddings(ctx, span)
    assert ctx.text_ids is not None and ctx.embed_tokens is not None
    ids = ctx.text_ids[text_span_mask(ctx, span)]
    kept = keyword_words(tokenizer.decode(ids.tolist(), skip_special_tokens=True), remove_stopwords, prefix)
    if not kept:
        return ctx.text_embeds[:0] if ctx.text_embeds is not None else torch.empty(0)
    word_ids = tokenizer(kept, is_split_into_words=True, add_special_tokens=False)["input_ids"]
    word_ids = torch.as_tensor(word_ids, dtype=torch.long, device=ctx.text_ids.device).flatten()
    with torch.no_grad():
        return ctx.embed_tokens(word_ids)

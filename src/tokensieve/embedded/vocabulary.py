"""The words of the embedded model's vocabulary and its prompt format (one turn: ``question answer: answer </s>``)."""

from __future__ import annotations

from .scenes import COLORS, DIGITS, SHAPE_PLURALS, SHAPES

QUESTION_WORDS: tuple[str, ...] = (
    "what", "color", "shape", "is", "the", "object", "there", "a", "how", "many", "objects", "where",
    "number", "on", "?", "answer:",
)  # fmt: skip
ANSWER_WORDS: tuple[str, ...] = COLORS + SHAPES + DIGITS + ("yes", "no", "top", "bottom", "left", "right")
VOCABULARY_WORDS: tuple[str, ...] = tuple(dict.fromkeys(QUESTION_WORDS + tuple(SHAPE_PLURALS.values()) + ANSWER_WORDS))
# Caption words (v2's CLIP and alignment stages), after the v1 words so v1's ids are unchanged.
CAPTION_WORDS: tuple[str, ...] = (".", "with")
V2_VOCABULARY_WORDS: tuple[str, ...] = VOCABULARY_WORDS + CAPTION_WORDS

IMAGE_TOKEN = "<image>"
ANSWER_MARK = "answer:"
END_OF_ANSWER = "</s>"


def turn_text(question: str, answer: str | None = None) -> str:
    """One question turn; with an answer it is closed by the end-of-sequence token."""
    text = f"{question} {ANSWER_MARK}"
    return text if answer is None else f"{text} {answer} {END_OF_ANSWER}"

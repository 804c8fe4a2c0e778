"""Prompt text for a harness request: the processor's chat template, or the plain format the bench uses.

With a chat template (LLaVA-1.5/NeXT and Qwen checkpoints ship one) the messages are rendered by
``processor.apply_chat_template``. Without one, the prompt is what ``tokensieve bench`` builds for the same
question (:func:`tokensieve.bench.loaders.build_prompt`): for ``<image>`` models the embedded model's trained
format ``<image> QUESTION answer:`` (one ``<image>`` per image), for Qwen-style tokenizers the image
placeholder wrapped in vision markers, then the question.
"""

from __future__ import annotations

from tokensieve.embedded.synthetic import IMAGE_TOKEN, turn_text


def text_of(messages: list[dict]) -> str:
    """The text items of the user turns, joined by spaces."""
    parts = []
    for message in messages:
        content = message.get("content", [])
        if isinstance(content, str):
            parts.append(content)
            continue
        parts.extend(item["text"] for item in content if item.get("type") == "text")
    return " ".join(p.strip() for p in parts if p.strip())


def n_images(messages: list[dict]) -> int:
    return sum(
        1
        for message in messages
        if not isinstance(message.get("content"), str)
        for item in message.get("content", [])
        if item.get("type") == "image"
    )


def hf_messages(messages: list[dict]) -> list[dict]:
    """Messages with image items reduced to ``{"type": "image"}`` (the images travel separately)."""
    out = []
    for message in messages:
        content = message.get("content", [])
        if not isinstance(content, str):
            content = [{"type": "image"} if item.get("type") == "image" else dict(item) for item in content]
        out.append({"role": message.get("role", "user"), "content": content})
    return out


def build_prompt(processor, messages: list[dict]) -> str:
    if getattr(processor, "chat_template", None):
        return processor.apply_chat_template(hf_messages(messages), add_generation_prompt=True, tokenize=False)
    return plain_prompt(processor, text_of(messages), n_images(messages))


def plain_prompt(processor, text: str, images: int) -> str:
    """The bench's format for processors without a chat template (``n`` image placeholders, then the turn)."""
    image_token = getattr(processor, "image_token", None) or IMAGE_TOKEN
    if image_token == IMAGE_TOKEN:
        return " ".join([IMAGE_TOKEN] * images + [turn_text(text)])
    vocab = processor.tokenizer.get_vocab()
    if "<|vision_start|>" in vocab and "<|vision_end|>" in vocab:
        image_token = f"<|vision_start|> {image_token} <|vision_end|>"
    return " ".join([image_token] * images + [turn_text(text)])

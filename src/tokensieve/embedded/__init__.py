"""The embedded default: synthetic VQA tasks and a small trained LLaVA shipped with the package.

Quick start::

    import tokensieve
    from tokensieve import embedded

    model, processor = embedded.load()
    image, question = embedded.sample()  # a shipped picture and "what color is the circle ?"
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=[image], text=[prompt], return_tensors="pt")
    with tokensieve.sieve(model, "divprune", keep=0.25):
        output = model.generate(**inputs, max_new_tokens=3)
    print(processor.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))

- :mod:`tokensieve.embedded.synthetic`: seeded tasks (``make_split``, ``make_incontext``, ``prompt_for``).
- :mod:`tokensieve.embedded.build`: offline tokenizer/processor (chat template, unknown-word warning), config,
  ``load_embedded``.
- :mod:`tokensieve.embedded.evaluate`: greedy answering and per-family accuracy.
- :mod:`tokensieve.embedded.train`: the v2 recipe (CLIP pretraining, then LLaVA's two stages), resumable;
  :mod:`tokensieve.embedded.train_v1` (losses in :mod:`.losses_v1`) the recipe of the earlier v1 weights.
  docs/embedded.md has both.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from .build import EMBEDDED_DIR, load_embedded

SAMPLE_IMAGE: Path = EMBEDDED_DIR / "sample.png"
SAMPLE_QUESTION = "what color is the circle ?"
SAMPLE_ANSWER = "red"


def load(device: str = "cpu", dtype=None, path: str | Path = EMBEDDED_DIR):
    """``(model, processor)`` of the shipped embedded model (or of a checkpoint folder ``path``)."""
    import torch

    return load_embedded(device=device, dtype=dtype or torch.float32, path=path)


def sample() -> tuple[Image.Image, str]:
    """The shipped sample picture (RGB, 168x168) and a question about it (answer: :data:`SAMPLE_ANSWER`)."""
    return Image.open(SAMPLE_IMAGE).convert("RGB"), SAMPLE_QUESTION


__all__ = ["EMBEDDED_DIR", "SAMPLE_ANSWER", "SAMPLE_IMAGE", "SAMPLE_QUESTION", "load", "load_embedded", "sample"]

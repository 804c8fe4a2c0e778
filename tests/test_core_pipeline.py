"""``pipeline("image-text-to-text")`` inside one sieve: one Trace per prefill, for single, batched and generator
input; each image's kept tokens are those of a direct call on the same image."""

from __future__ import annotations

import pytest
import torch
from conftest import build, prompt

import tokensieve
from tokensieve.testing import random_image


def _direct_kept(model, proc, family: str, image, text: str) -> torch.Tensor:
    inputs = proc(images=[image], text=[text], return_tensors="pt")
    with tokensieve.sieve(model, "random", keep=4, seed=3) as s, torch.no_grad():
        model(**inputs)
    return s.trace.kept(0, 0)


@pytest.mark.parametrize("family_name", ["llava", "qwen2_5_vl"])
def test_pipeline_keeps_one_trace_per_prefill(family_name):
    from transformers import pipeline

    model, proc = build(family_name)
    proc.tokenizer.padding_side = "left"
    pipe = pipeline("image-text-to-text", model=model, processor=proc)
    images = [random_image(40 + i, (56, 56)) for i in range(3)]
    texts = [prompt(family_name, "what is the color ?") for _ in images]
    expected = [_direct_kept(model, proc, family_name, im, t) for im, t in zip(images, texts, strict=True)]
    with tokensieve.sieve(model, "random", keep=4, seed=3) as s:
        pipe(images=images[0], text=texts[0], max_new_tokens=2)
        assert len(s.traces) == 1 and s.trace is s.traces[-1]
        assert torch.equal(s.trace.kept(0, 0), expected[0])

        pipe(images=images, text=texts, max_new_tokens=2, batch_size=2)
        batched = list(s.traces)[1:]
        assert sum(t.num_images() for t in batched) == 3

        outputs = list(pipe(({"images": im, "text": t} for im, t in zip(images, texts, strict=True)), max_new_tokens=2))
        streamed = list(s.traces)[1 + len(batched) :]
    assert len(outputs) == 3 and len(streamed) == 3  # one prefill per generator item
    for trace, kept in zip(streamed, expected, strict=True):
        assert trace.num_images() == 1 and torch.equal(trace.kept(0, 0), kept)
    kept_batched = sorted(tuple(t.kept(b, 0).tolist()) for t in batched for b, _ in t.images)
    assert kept_batched == sorted(tuple(k.tolist()) for k in expected)


def test_pipeline_chat_messages_on_the_embedded_model():
    """Chat-message input goes through the embedded model's chat template and answers as the direct prompt does."""
    from transformers import pipeline

    from tokensieve import embedded

    model, processor = embedded.load()
    image, question = embedded.sample()
    pipe = pipeline("image-text-to-text", model=model, processor=processor)
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]
    with tokensieve.sieve(model, "divprune", keep=0.25) as s:
        out = pipe(text=messages, max_new_tokens=3, return_full_text=False)
    assert len(s.traces) == 1 and s.trace.kept(0, 0).numel() == s.methods[0].budget(s.trace.images[(0, 0)]["n_tokens"])
    answer = out[0]["generated_text"].strip()
    assert answer, out  # the template gives the trained prompt, so the model answers (an empty answer: wrong prompt)
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=[image], text=[prompt], return_tensors="pt")
    with tokensieve.sieve(model, "divprune", keep=0.25), torch.no_grad():
        ids = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert answer == processor.decode(ids[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()

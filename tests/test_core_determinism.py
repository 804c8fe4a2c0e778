"""Decisions depend on the image's content, never on its place in the batch (content-keyed generators)."""

from __future__ import annotations

import torch
from conftest import build, prompt

import tokensieve
from tokensieve.context import seeded_generator
from tokensieve.core.images import content_key
from tokensieve.testing import random_image


def _kept(model, proc, images, family="llava", method="random", **kw):
    proc.tokenizer.padding_side = "left"
    texts = [prompt(family, "what is the color ?") for _ in images]
    inputs = proc(images=images, text=texts, return_tensors="pt", padding=True)
    with tokensieve.sieve(model, method, keep=4, **kw) as s, torch.no_grad():
        model(**inputs)
    return [s.trace.kept(b, 0) for b in range(len(images))]


def test_random_draws_differ_between_images_and_follow_the_image():
    model, proc = build("llava")
    images = [random_image(100 + i) for i in range(4)]
    alone = [_kept(model, proc, [im])[0] for im in images]
    assert len({tuple(k.tolist()) for k in alone}) > 1  # batch 1: not the same positions for every image
    batched = _kept(model, proc, images[::-1])
    assert all(torch.equal(a, b) for a, b in zip(alone, batched[::-1], strict=True))
    twice = _kept(model, proc, [images[0], images[1], images[0]])
    assert torch.equal(twice[0], twice[2])


def test_zoo_bank_is_keyed_by_content():
    model, proc = build("llava")
    images = [random_image(200 + i) for i in range(3)]
    alone = [_kept(model, proc, [im], method="zoo", m=8)[0] for im in images]
    batched = _kept(model, proc, images, method="zoo", m=8)
    assert all(torch.equal(a, b) for a, b in zip(alone, batched, strict=True))


def test_content_key_ignores_dtype_and_device_layout_but_not_values():
    x = torch.randn(3, 8)
    assert content_key(x) == content_key(x.clone()) == content_key(x.to(torch.bfloat16))
    assert content_key(x) != content_key(x + 1)
    assert content_key(x) != content_key(x.reshape(8, 3))
    a = torch.randperm(50, generator=seeded_generator(1, content_key(x)))
    b = torch.randperm(50, generator=seeded_generator(1, content_key(x)))
    c = torch.randperm(50, generator=seeded_generator(1, content_key(x), layer=2))
    assert torch.equal(a, b) and not torch.equal(a, c)

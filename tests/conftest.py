"""Shared fixtures: tiny random models of the three supported families, built from configs (no downloads)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tokensieve.testing import qwen_image_prompt, random_image, tiny_llava, tiny_llava_next, tiny_qwen2_5_vl

torch.set_num_threads(1)  # tiny models: one thread is as fast and never oversubscribes

FAMILIES = ("llava", "llava_next", "qwen2_5_vl")
_BUILDERS = {"llava": tiny_llava, "llava_next": tiny_llava_next, "qwen2_5_vl": tiny_qwen2_5_vl}
_CACHE: dict = {}


def build(family: str, attn: str = "sdpa"):
    """A (model, processor) pair, cached per family and attention implementation."""
    key = (family, attn)
    if key not in _CACHE:
        _CACHE[key] = _BUILDERS[family](attn=attn)
    return _CACHE[key]


def prompt(family: str, text: str, n_images: int = 1) -> str:
    if family == "qwen2_5_vl":
        return " ".join([qwen_image_prompt("")] * (n_images - 1) + [qwen_image_prompt(text)])
    return "USER: " + " ".join(["<image>"] * n_images) + f" {text} ASSISTANT:"


def make_inputs(family: str, padding_side: str = "left", images_per_prompt: int = 1, batch: int = 2):
    """A padded batch: prompts of different lengths, images of different sizes where the family allows."""
    model, proc = build(family)
    proc.tokenizer.padding_side = padding_side
    texts = ["what is the color ?", "describe this image and what is the color of the square ?", "how many ?"]
    sizes = [(56, 56), (56, 84), (84, 56)] if family != "llava" else [(56, 56)] * 3
    prompts = [prompt(family, texts[i % 3], images_per_prompt) for i in range(batch)]
    images = [random_image(10 * i + j, sizes[(i + j) % 3]) for i in range(batch) for j in range(images_per_prompt)]
    return proc(images=images, text=prompts, return_tensors="pt", padding=True)


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A saved tiny 3-layer LLaVA (model and processor) for tests that load a model by path (CLI, torchrun)."""
    folder = tmp_path_factory.mktemp("model")
    model, proc = tiny_llava(layers=3)
    model.save_pretrained(folder)
    proc.save_pretrained(folder)
    return folder

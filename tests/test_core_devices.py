"""Device placement and dtypes: a ``device_map`` that offloads decoder layers (accelerate's offload hooks; the
only split a CPU-only machine can run), and bf16 under a sieve."""

from __future__ import annotations

import pytest
import torch
from conftest import _BUILDERS, build, make_inputs

import tokensieve
from tokensieve.core.state import Segment
from tokensieve.methods.random import Random


def _offloaded_llava(tmp_path):
    pytest.importorskip("accelerate")
    from transformers import LlavaForConditionalGeneration

    model, _ = build("llava")
    model.save_pretrained(tmp_path / "model")
    device_map = {
        "model.vision_tower": "cpu",
        "model.multi_modal_projector": "cpu",
        "model.language_model.embed_tokens": "cpu",
        "model.language_model.layers.0": "cpu",
        "model.language_model.layers.1": "cpu",
        "model.language_model.layers.2": "disk",
        "model.language_model.layers.3": "disk",
        "model.language_model.norm": "cpu",
        "model.language_model.rotary_emb": "cpu",
        "lm_head": "cpu",
    }
    offloaded = LlavaForConditionalGeneration.from_pretrained(
        tmp_path / "model", device_map=device_map, offload_folder=str(tmp_path / "offload")
    ).eval()
    assert offloaded.model.language_model.layers[2].self_attn.q_proj.weight.device.type == "meta"
    return model, offloaded


@pytest.mark.parametrize(
    "make",
    [lambda: [Random(keep=6)], lambda: "fastv", lambda: [Random(keep=8), Random(keep=3, layer=3, seed=1)]],
    ids=["projector", "llm-on-offloaded-layer", "both"],
)
def test_device_map_with_offloaded_layers_matches_the_plain_model(tmp_path, make):
    model, offloaded = _offloaded_llava(tmp_path)
    inputs = make_inputs("llava")
    outs = []
    for m in (model, offloaded):
        method = make()
        kwargs = {"keep": 3, "layer": 2} if method == "fastv" else {}
        with tokensieve.sieve(m, method, **kwargs) as s, torch.no_grad():
            sequences = m.generate(**inputs, max_new_tokens=3, do_sample=False)
        outs.append((sequences, [s.trace.kept(b, 0) for b in range(2)]))
    assert torch.equal(outs[0][0], outs[1][0])
    assert all(torch.equal(a, b) for a, b in zip(outs[0][1], outs[1][1], strict=True))


def test_segment_moves_to_the_layer_device_once():
    seg = Segment(0, torch.arange(4)[None], torch.ones(1, 4, dtype=torch.bool), torch.arange(4)[None], torch.zeros(1))
    meta = seg.on(torch.device("meta"))
    assert meta.cols.device.type == "meta" and meta.valid.device.type == "meta"
    assert seg.on(torch.device("meta")) is meta and seg.on(torch.device("cpu")) is seg


def test_bf16_under_a_sieve(family):
    model = _BUILDERS[family]()[0].to(torch.bfloat16)  # a fresh copy: the cached fp32 models stay untouched
    inputs = make_inputs(family)
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    valid = inputs["attention_mask"].bool()
    with torch.no_grad():
        reference = model(**inputs).logits
    with tokensieve.sieve(model, Random(keep=1.0)), torch.no_grad():
        assert torch.equal(model(**inputs).logits[valid], reference[valid])
    with tokensieve.sieve(model, [Random(keep=0.5), Random(keep=2, layer=2)]) as s, torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3
    assert s.trace.kept(0, 0).numel() == 2

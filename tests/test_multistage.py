"""Multi-stage and in-LLM methods composed in one sieve: Information Horizon, ToDRE stage 2, CATP stage 2, and the
token-information probe (arXiv 2512.07580)."""

from __future__ import annotations

import pytest
import torch
from conftest import build, make_inputs

import tokensieve
from tokensieve.budget import stages_layer_average
from tokensieve.cli import build_parser
from tokensieve.horizon import Drop, information_horizon, plot_information, token_information
from tokensieve.methods.base import MethodError, make_method
from tokensieve.methods.catp_llm import CATPLLM
from tokensieve.methods.divprune import DivPrune
from tokensieve.methods.infohorizon import InfoHorizon, infohorizon_pipeline
from tokensieve.methods.random import Random
from tokensieve.methods.todre_llm import ToDRELLM


def _prefill_cache(model, inputs, methods):
    with tokensieve.sieve(model, methods) as s:
        with torch.no_grad():
            cache = model(**inputs, use_cache=True).cache
    return s, [layer.keys.shape[-2] for layer in cache.layers]


def _expected_lengths(model, inputs, trace, n_images: int = 1) -> list[int]:
    """Per layer: the longest sample's text tokens plus the visual tokens the trace says it kept there."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
    text = (mask & (ids != model.config.image_token_id)).sum(1)
    out = []
    for layer in range(trace.n_layers):
        per_sample = [
            int(text[b]) + sum(trace.counts_per_layer(b, i)[layer] for i in range(n_images))
            for b in range(ids.shape[0])
        ]
        out.append(max(per_sample))
    return out


def _generate(model, inputs, methods):
    with tokensieve.sieve(model, methods):
        return model.generate(**inputs, max_new_tokens=3, do_sample=False)


# ----- composition ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "make",
    [
        lambda: [DivPrune(keep=0.75), Random(layer=2, keep=0.5)],
        lambda: infohorizon_pipeline(keep_shallow=0.75, keep_deep=0.25),
        lambda: InfoHorizon(keep=0.25, keep_shallow=0.75),
    ],
    ids=["divprune+random", "pipeline", "one-object"],
)
def test_composition_trace_cache_generate(family, make):
    model, _ = build(family)
    inputs = make_inputs(family)
    s, lengths = _prefill_cache(model, inputs, make())
    assert [(r.layer) for r in s.trace.stages] == [0, 2]
    for b in range(2):
        n = s.trace.images[(b, 0)]["n_tokens"]
        shallow = int(0.75 * n)
        deep = max(1, int((0.5 if s.trace.stages[1].name == "random" else 0.25) * n))
        assert s.trace.counts_per_layer(b, 0) == [shallow, shallow, deep, deep]
        # the deep stage keeps a subset of what the shallow stage kept
        assert set(s.trace.kept(b, 0).tolist()) <= set(s.trace.kept(b, 0, stage=0).tolist())
    assert lengths == _expected_lengths(model, inputs, s.trace)
    out = _generate(model, inputs, make())
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3


def test_infohorizon_one_object_equals_list():
    model, _ = build("llava")
    inputs = make_inputs("llava")
    with tokensieve.sieve(model, InfoHorizon(keep=4, keep_shallow=12)) as one, torch.no_grad():
        a = model(**inputs).logits
    with tokensieve.sieve(model, InfoHorizon(keep=4, keep_shallow=12).stages()) as listed, torch.no_grad():
        b = model(**inputs).logits
    assert [r.name for r in listed.trace.stages] == ["divprune", "infohorizon"]
    for stage in (0, 1):
        assert torch.equal(one.trace.kept(0, 0, stage=stage), listed.trace.kept(0, 0, stage=stage))
    assert torch.allclose(a, b, atol=1e-5)
    with tokensieve.sieve(model, "infohorizon", keep=4) as s, torch.no_grad():  # registry name: deep stage only
        model(**inputs)
    assert s.trace.counts_per_layer(0, 0) == [16, 16, 4, 4]


def test_infohorizon_paper_budgets():
    assert InfoHorizon().llm_layers(32) == [20]
    assert InfoHorizon(keep_shallow=284).llm_layers(32) == [0, 20]
    for average, (shallow, deep) in {192: (284, 38), 64: (96, 10)}.items():
        stages = infohorizon_pipeline(average=average, n_layers=32)
        assert stages[0].name == "divprune" and stages[0].keep == shallow
        assert stages[1].keep == deep and stages[1].llm_layers(32) == [20]
        assert stages_layer_average([shallow, deep], [0, 20], 576, 32) <= average
    # off the paper table: shallow = 1.5 x average, deep solved
    stages = infohorizon_pipeline(average=128, n_layers=32)
    assert stages[0].keep == 192 and stages_layer_average([192, stages[1].keep], [0, 20], 576, 32) <= 128
    with pytest.raises(MethodError):
        infohorizon_pipeline(average=64)  # needs n_layers
    with pytest.raises(MethodError):
        InfoHorizon(keep_shallow=10, shallow="visionzip")


# ----- ToDRE stage 2 ----------------------------------------------------------------------------------------------
def test_todre_llm_drop_all(family):
    model, _ = build(family)
    inputs = make_inputs(family)
    methods = [ToDRELLM(drop_all=True)]
    s, lengths = _prefill_cache(model, inputs, methods)
    assert make_method("todre_llm").llm_layers(4) == [2]
    ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
    text = int((mask & (ids != model.config.image_token_id)).sum(1).max())
    assert lengths[2] == lengths[3] == text  # text only from layer 2 on
    assert lengths[0] > text
    assert s.trace.counts_per_layer(0, 0)[2:] == [0, 0]
    out = _generate(model, inputs, methods)
    assert out.shape[1] == ids.shape[1] + 3


def test_todre_llm_keeps_most_relevant():
    model, _ = build("llava")
    inputs = make_inputs("llava")
    with tokensieve.sieve(model, ToDRELLM(keep=5, layer=2)) as s, torch.no_grad():
        model(**inputs)
    assert s.trace.kept(0, 0).numel() == 5
    # the same tokens as ranking the instruction attention of layer 1 by hand
    captured = {}

    class Probe(ToDRELLM):
        def select(self, ctx, k):
            captured["rel"] = self.relevance(ctx)
            return super().select(ctx, k)

    with tokensieve.sieve(model, Probe(keep=5, layer=2)), torch.no_grad():
        model(**inputs)
    expected = torch.sort(torch.topk(captured["rel"], 5).indices).values
    assert torch.equal(s.trace.kept(1, 0), expected.cpu())


# ----- CATP stage 2 -----------------------------------------------------------------------------------------------
def test_catp_llm_two_images(family):
    model, _ = build(family)
    inputs = make_inputs(family, images_per_prompt=2)
    method = CATPLLM(keep=0.5)
    assert method.llm_layers(4) == [2, 3] and method.llm_layers(32) == [7, 8]
    s, lengths = _prefill_cache(model, inputs, [method])
    for b in range(2):
        demo, query = s.trace.counts_per_layer(b, 0), s.trace.counts_per_layer(b, 1)
        n_demo, n_query = s.trace.images[(b, 0)]["n_tokens"], s.trace.images[(b, 1)]["n_tokens"]
        assert demo == [n_demo, n_demo, int(0.5 * n_demo), int(0.5 * n_demo)]  # 2a at K+1 = 2
        assert query == [n_query, n_query, n_query, int(0.5 * n_query)]  # 2b at K+2 = 3
    assert lengths == _expected_lengths(model, inputs, s.trace, n_images=2)
    out = _generate(model, inputs, [method])
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3


# ----- token information ------------------------------------------------------------------------------------------
def test_token_information_matches_hand_computation():
    model, _ = build("llava")
    inputs = make_inputs("llava")
    info = token_information(model, inputs, layers=[0, 2, 3], sample=1)
    assert info.shape == (3, 16)
    with torch.no_grad():
        logits = model(**inputs).logits
    probs = torch.softmax(logits[1, -1], -1)
    answer = int(probs.argmax())
    for row, layer, token in ((1, 2, 5), (2, 3, 11)):
        with tokensieve.sieve(model, Drop(layer=layer, drop={(1, 0): [token]})) as s:
            with torch.no_grad():
                p = torch.softmax(model(**inputs).logits[1, -1], -1)[answer]
        assert s.trace.counts_per_layer(1, 0) == [16] * layer + [15] * (4 - layer)
        assert s.trace.counts_per_layer(0, 0) == [16] * 4  # other samples untouched
        assert abs(float(info[row, token]) - float(probs[answer] - p)) < 1e-5
    chunked = token_information(model, inputs, layers=[2], sample=1, batch_size=5)
    assert torch.allclose(chunked, info[1:2], atol=1e-6)
    assert float(info.abs().sum()) > 0  # removing a visual token does change the answer probability


def test_information_horizon_criterion(tmp_path):
    info = torch.tensor([[0.5, -0.2], [0.01, 0.0], [0.0005, 0.0], [0.02, 0.0], [0.0, 0.0], [0.0001, 0.0]])
    assert information_horizon(info, threshold=1e-3) == 4  # layer 3 rises again, so the horizon is after it
    assert information_horizon(info, threshold=0.1) == 1
    assert information_horizon(torch.ones(3, 2), threshold=0.5) == 3  # never quiet: beyond the model
    assert information_horizon(info[:2], threshold=1e-3, layers=[10, 20]) == 21
    path = plot_information(info, tmp_path / "h.png", horizon=4)
    assert path.exists() and path.stat().st_size > 0


def test_horizon_cli(tmp_path, monkeypatch, capsys):
    from tokensieve import horizon
    from tokensieve.testing import random_image

    args = build_parser().parse_args(["horizon", "img.png", "what is the color ?", "--out", "p.png"])
    assert args.func is horizon._cmd_horizon and args.model is None and args.out == "p.png"
    model, proc = build("llava")
    monkeypatch.setattr(horizon, "load_model", lambda path: (model, proc, lambda q: f"USER: <image> {q} ASSISTANT:"))
    image = tmp_path / "img.png"
    random_image(3).save(image)
    out = tmp_path / "plot.png"
    assert tokensieve.cli.main(["horizon", str(image), "what is the color ?", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "information horizon" in printed and "layer   3" in printed
    assert out.exists()

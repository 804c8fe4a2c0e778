"""The sieve on real HF architectures: exactness, positions, decoding, cache, batching, errors, clean exit."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import pytest
import torch
from conftest import FAMILIES, build, make_inputs

import tokensieve
from tokensieve import BudgetError, MethodError, NoImageTokensWarning, UnsupportedModelError
from tokensieve.methods.base import Method, register
from tokensieve.methods.random import Random


def _logits(model, inputs, **kw):
    with torch.no_grad():
        return model(**inputs, **kw).logits


def _hook_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _image_positions(model, input_ids: torch.Tensor) -> torch.Tensor:
    return torch.nonzero(input_ids == model.config.image_token_id).flatten()


# ----- exactness --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_keep_all_is_exact(family, padding_side, attn):
    model, _ = build(family, attn)
    inputs = make_inputs(family, padding_side)
    valid = inputs["attention_mask"].bool()
    reference = _logits(model, inputs)
    for method in (Random(keep=1.0), Random(keep=1.0, layer=2), [Random(keep=1.0), Random(keep=1.0, layer=1)]):
        with tokensieve.sieve(model, method):
            pruned = _logits(model, inputs)
        assert torch.equal(pruned[valid], reference[valid]), (family, method)


def test_hooks_removed_after_exit_and_exception(family):
    model, _ = build(family)
    inputs = make_inputs(family)
    reference = _logits(model, inputs)
    before = _hook_count(model)
    with tokensieve.sieve(model, "divprune", keep=0.5):
        assert _hook_count(model) > before
        _logits(model, inputs)
    assert _hook_count(model) == before
    with pytest.raises(ZeroDivisionError):
        with tokensieve.sieve(model, "fastv", keep=0.5, layer=1):
            _logits(model, inputs)
            raise ZeroDivisionError
    assert _hook_count(model) == before
    assert "get_image_features" not in model.model.__dict__
    assert torch.equal(_logits(model, inputs), reference)


def test_error_inside_forward_leaves_model_clean(family):
    model, _ = build(family)
    inputs = make_inputs(family)
    reference = _logits(model, inputs)
    before = _hook_count(model)
    with pytest.raises(BudgetError, match="exceeds"):
        # the count is checked up front where the family fixes it (LLaVA-1.5), else at the first prefill
        with tokensieve.sieve(model, "random", keep=100_000):
            _logits(model, inputs)
    assert _hook_count(model) == before
    assert torch.equal(_logits(model, inputs), reference)


# ----- prefill semantics against an independent reference ---------------------------------------------------------
def _text_model_inputs(model, single_inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """The embeddings and position ids (3-D on Qwen) that the unpruned model hands its text decoder."""
    captured = {}
    handle = model.model.language_model.register_forward_pre_hook(lambda m, a, k: captured.update(k), with_kwargs=True)
    with torch.no_grad():
        model(**single_inputs)
    handle.remove()
    embeds = captured["inputs_embeds"]
    positions = captured.get("position_ids")
    if positions is None:
        positions = torch.arange(embeds.shape[1])[None]
    if positions.dim() == 3 and positions.shape[0] == 4:
        positions = positions[1:]  # Qwen prepends text positions for packed masks
    return embeds, positions


def _reference_last_logits(model, single_inputs, kept_cols: torch.Tensor, policy: str) -> torch.Tensor:
    """Run the text model alone on the kept embeddings with the policy's positions (no sieve involved)."""
    text = model.model.language_model
    embeds, positions = _text_model_inputs(model, single_inputs)
    embeds = embeds[:, kept_cols]
    if policy == "reindex":
        rank = torch.arange(kept_cols.numel())[None]
        positions = rank if positions.dim() == 2 else rank[None].expand(3, -1, -1)
    else:
        positions = positions[..., kept_cols]
    with torch.no_grad():
        hidden = text(inputs_embeds=embeds, position_ids=positions).last_hidden_state
        return model.lm_head(hidden[:, -1])


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("policy", ["reindex", "original"])
def test_projector_pruning_matches_reference(family, policy, padding_side):
    model, proc = build(family)
    inputs = make_inputs(family, padding_side)
    with tokensieve.sieve(model, "divprune", keep=0.5, positions=policy) as s:
        pruned = _logits(model, inputs)
    for b in range(2):
        row = {k: v[b : b + 1] for k, v in inputs.items() if k not in ("pixel_values", "image_grid_thw", "image_sizes")}
        valid = row["attention_mask"][0].bool()
        row = {k: v[:, valid] for k, v in row.items()}
        if family == "qwen2_5_vl":
            per_image = (inputs["image_grid_thw"].prod(-1)).tolist()
            start = sum(per_image[:b])
            row["pixel_values"] = inputs["pixel_values"][start : start + per_image[b]]
            row["image_grid_thw"] = inputs["image_grid_thw"][b : b + 1]
        else:
            row["pixel_values"] = inputs["pixel_values"][b : b + 1]
            if "image_sizes" in inputs:
                row["image_sizes"] = inputs["image_sizes"][b : b + 1]
        image_cols = _image_positions(model, row["input_ids"][0])
        kept = image_cols[s.trace.kept(b, 0)]
        text_cols = torch.nonzero(row["input_ids"][0] != model.config.image_token_id).flatten()
        kept_cols = torch.sort(torch.cat([kept, text_cols])).values
        reference = _reference_last_logits(model, row, kept_cols, policy)
        last = int(torch.nonzero(inputs["attention_mask"][b]).max())
        assert torch.allclose(pruned[b, last], reference[0], atol=1e-4), (family, policy, padding_side, b)


# ----- decoding after a pruned prefill -------------------------------------------------------------------------------
def _uncached_logits(model, inputs, sequences: torch.Tensor, steps: int) -> list[torch.Tensor]:
    """Next-token logits for each generated step, re-running the whole prompt (a fresh pruned prefill each time)."""
    length = inputs["input_ids"].shape[1]
    out = []
    for t in range(steps):
        step = dict(inputs)
        step["input_ids"] = sequences[:, : length + t]
        extra = torch.ones(sequences.shape[0], t, dtype=inputs["attention_mask"].dtype)
        step["attention_mask"] = torch.cat([inputs["attention_mask"], extra], 1)
        if "mm_token_type_ids" in inputs:
            step["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(extra)], 1)
        with torch.no_grad():
            out.append(model(**step, use_cache=False).logits[:, -1])
    return out


@pytest.mark.parametrize("policy", ["reindex", "original"])
@pytest.mark.parametrize("where", ["projector", "llm", "both"])
def test_generate_matches_uncached_decoding(family, policy, where):
    """Decoding with the pruned KV cache gives the logits of re-running the pruned prompt from scratch."""
    model, _ = build(family)
    inputs = make_inputs(family, "left")
    stages = {
        "projector": [Random(keep=0.4, positions=policy)],
        "llm": [Random(keep=0.3, layer=2, positions=policy)],
        "both": [Random(keep=0.6, positions=policy), Random(keep=0.3, layer=2, seed=3, positions=policy)],
    }[where]
    steps = 5
    with tokensieve.sieve(model, stages), torch.no_grad():
        out = model.generate(
            **inputs,
            max_new_tokens=steps,
            min_new_tokens=steps,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
        uncached = _uncached_logits(model, inputs, out.sequences, steps)
    for t in range(steps):
        assert torch.allclose(out.logits[t], uncached[t], atol=1e-4), (family, policy, where, t)


def test_reindex_and_original_differ_in_decoding():
    model, _ = build("llava")
    inputs = make_inputs("llava")
    outs = {}
    for policy in ("reindex", "original"):
        with tokensieve.sieve(model, "random", keep=0.25, positions=policy):
            outs[policy] = _logits(model, inputs)[:, -1]
    assert not torch.allclose(outs["reindex"], outs["original"])


def test_kv_cache_holds_only_kept_tokens(family):
    model, _ = build(family)
    inputs = make_inputs(family, "left")
    length = inputs["input_ids"].shape[1]
    n_image = (inputs["input_ids"] == model.config.image_token_id).sum(1)
    with tokensieve.sieve(model, [Random(keep=0.5), Random(keep=2, layer=2)]) as s:
        with torch.no_grad():
            cache = model(**inputs, use_cache=True).cache
    kept_pre = torch.tensor([s.trace.kept(b, 0, stage=0).numel() for b in range(2)])
    kept_llm = torch.tensor([s.trace.kept(b, 0, stage=1).numel() for b in range(2)])
    assert kept_llm.tolist() == [2, 2]
    pad = length - inputs["attention_mask"].sum(1)
    expected_pre = int((length - pad - n_image + kept_pre).max())
    expected_llm = int((length - pad - n_image + kept_llm).max())
    lengths = [layer.keys.shape[-2] for layer in cache.layers]
    assert lengths[0] == lengths[1] == expected_pre
    assert lengths[2] == lengths[3] == expected_llm


# ----- batching and several images --------------------------------------------------------------------------------
def test_each_image_gets_its_own_budget(family):
    model, _ = build(family)
    inputs = make_inputs(family, "left", images_per_prompt=2)
    with tokensieve.sieve(model, "divprune", keep=0.5) as s:
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[0] == 2
    assert s.trace.num_images() == 4
    for b in range(2):
        for i in range(2):
            n = s.trace.images[(b, i)]["n_tokens"]
            kept = s.trace.kept(b, i)
            assert kept.numel() == int(0.5 * n)
            assert torch.equal(kept, torch.unique(kept)) and int(kept.max()) < n


def test_budget_count_and_ratio_vocabulary():
    model, _ = build("llava")
    inputs = make_inputs("llava")
    for keep, expected in ((5, 5), (0.25, 4), (1.0, 16), (1, 1)):
        with tokensieve.sieve(model, "divprune", keep=keep) as s:
            _logits(model, inputs)
        assert s.trace.kept(1, 0).numel() == expected


# ----- attention recompute ------------------------------------------------------------------------------------------
def test_fastv_selection_matches_eager_attention(family):
    """FastV under SDPA, from recomputed q/k after RoPE, picks what eager output_attentions would pick."""
    layer, k = 2, 3
    eager, _ = build(family, "eager")
    sdpa, _ = build(family, "sdpa")
    inputs = make_inputs(family, "left")
    with torch.no_grad():
        attentions = eager(**inputs, output_attentions=True).attentions
    with tokensieve.sieve(sdpa, "fastv", keep=k, layer=layer) as s:
        _logits(sdpa, inputs)
    for b in range(2):
        image_cols = _image_positions(eager, inputs["input_ids"][b])
        row = attentions[layer - 1][b].mean(0)[-1, image_cols]
        expected = torch.sort(torch.topk(row, k).indices).values
        assert torch.equal(s.trace.kept(b, 0), expected), (family, b)


# ----- determinism --------------------------------------------------------------------------------------------------
def test_random_is_seeded():
    model, _ = build("llava")
    inputs = make_inputs("llava")
    kept = []
    for seed in (0, 0, 1):
        with tokensieve.sieve(model, "random", keep=4, seed=seed) as s:
            _logits(model, inputs)
        kept.append(s.trace.kept(0, 0))
    assert torch.equal(kept[0], kept[1])
    assert not torch.equal(kept[0], kept[2])


# ----- errors -------------------------------------------------------------------------------------------------------
def test_unknown_method_lists_known_ones():
    model, _ = build("llava")
    with pytest.raises(MethodError, match="divprune"):
        tokensieve.sieve(model, "no-such-method")


@pytest.mark.parametrize("keep", [0, -3, 1.5, 0.0, "64", True, float("nan")])
def test_bad_keep_is_rejected_before_any_forward(keep):
    model, _ = build("llava")
    with pytest.raises(BudgetError):
        tokensieve.sieve(model, "random", keep=keep)


def test_unknown_hyperparameter_and_bad_layer():
    model, _ = build("llava")
    with pytest.raises(MethodError, match="no hyperparameter"):
        tokensieve.sieve(model, "divprune", keep=4, alpha=3)
    with pytest.raises(MethodError, match="outside"):
        tokensieve.sieve(model, "fastv", keep=4, layer=99)
    with pytest.raises(MethodError, match="layer >= 1"):
        tokensieve.sieve(model, "fastv", keep=4, layer=0)
    with pytest.raises(MethodError, match="pipeline order"):
        tokensieve.sieve(model, [Random(keep=4, layer=2), Random(keep=4)])


def test_unsupported_model_names_supported_families():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=32,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    )
    with pytest.raises(UnsupportedModelError, match="llava_next"):
        tokensieve.sieve(model, "random", keep=4)


def test_prompt_without_image_tokens_passes_through_with_warning():
    model, proc = build("llava")
    proc.tokenizer.padding_side = "left"
    inputs = proc.tokenizer(["what is the color ?"], return_tensors="pt")
    reference = _logits(model, inputs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with tokensieve.sieve(model, "divprune", keep=4):
            out = _logits(model, inputs)
    assert any(issubclass(w.category, NoImageTokensWarning) for w in caught)
    assert torch.equal(out, reference)


def test_stage_the_family_cannot_serve(monkeypatch):
    @register
    @dataclass
    class _NeedsVisionQK(Method):
        name = "_test_vision_qk"
        stage = "vision"
        needs = frozenset({"vision_qk"})

        def select(self, ctx, k):
            return torch.arange(k)

    model, _ = build("qwen2_5_vl")
    from tokensieve.adapters.qwen2_vl import Qwen2VLAdapter

    monkeypatch.setattr(Qwen2VLAdapter, "supports_vision_qk", False)
    with pytest.raises(UnsupportedModelError, match="qwen2_vl"):
        tokensieve.sieve(model, _NeedsVisionQK(keep=4))


def test_qwen2_vl_is_supported_too():
    from tokensieve.testing import qwen_image_prompt, random_image, tiny_qwen2_5_vl

    model, proc = tiny_qwen2_5_vl(qwen2=True)
    proc.tokenizer.padding_side = "left"
    prompts = [qwen_image_prompt("what is the color ?"), qwen_image_prompt("how many ?")]
    inputs = proc(images=[random_image(0), random_image(1, (56, 84))], text=prompts, return_tensors="pt", padding=True)
    valid = inputs["attention_mask"].bool()
    reference = _logits(model, inputs)
    with tokensieve.sieve(model, "random", keep=1.0):
        assert torch.allclose(_logits(model, inputs)[valid], reference[valid], atol=1e-5)
    with tokensieve.sieve(model, "divprune", keep=2) as s:
        model.generate(**inputs, max_new_tokens=2)
    assert [s.trace.kept(b, 0).numel() for b in range(2)] == [2, 2]


def test_list_methods_and_method_objects():
    names = tokensieve.list_methods()
    for name in ("random", "pool", "divprune", "fastv"):
        assert name in names
    with pytest.raises(MethodError, match="object"):
        tokensieve.sieve(build("llava")[0], Random(keep=3), keep=4)


@pytest.mark.parametrize("family_name", FAMILIES)
def test_trace_counts_per_layer(family_name):
    model, _ = build(family_name)
    inputs = make_inputs(family_name)
    with tokensieve.sieve(model, [Random(keep=0.5), Random(keep=2, layer=3)]) as s:
        _logits(model, inputs)
    n = s.trace.images[(0, 0)]["n_tokens"]
    assert s.trace.counts_per_layer(0, 0) == [int(0.5 * n)] * 3 + [2]


def test_pre_projector_features_line_up_with_tokens(family):
    """project(pre_features) gives each token's own feature: the adapters map crops, unpadding, newlines
    (LLaVA-NeXT) and window order (Qwen2.5-VL) correctly, which ZOO-Prune's sensitivity relies on."""
    from tokensieve.context import ImageContext

    seen: list[ImageContext] = []

    @dataclass
    class _Spy(Method):
        name = "_test_spy"
        stage = "projector"
        needs = frozenset({"features", "pre_features", "projector"})

        def select(self, ctx, k):
            seen.append(ctx)
            return torch.arange(k)

    model, _ = build(family)
    inputs = make_inputs(family, images_per_prompt=2)
    with tokensieve.sieve(model, _Spy(keep=1)):
        _logits(model, inputs)
    assert len(seen) == 4
    for ctx in seen:
        tokens = ~ctx.always_keep
        with torch.no_grad():
            projected = ctx.project(ctx.pre_features[tokens])
        assert torch.allclose(projected, ctx.features[tokens], atol=1e-5), family
        if family == "llava_next":
            assert bool(ctx.always_keep.any()) and bool((ctx.grid_rc[ctx.always_keep] == -1).all())


def _reference_llm_stage_logits(model, single_inputs, kept_cols: torch.Tensor, layer: int, policy: str):
    """Run the decoder layer by layer by hand: all tokens before ``layer``, the kept ones from it on."""
    text = model.model.language_model
    hidden, positions = _text_model_inputs(model, single_inputs)
    with torch.no_grad():
        cos_sin = text.rotary_emb(hidden, positions)
        for i, block in enumerate(text.layers):
            if i == layer:
                hidden = hidden[:, kept_cols]
                if policy == "reindex":
                    rank = torch.arange(kept_cols.numel())[None]
                    new = rank if positions.dim() == 2 else rank[None].expand(3, -1, -1)
                else:
                    new = positions[..., kept_cols]
                cos_sin = text.rotary_emb(hidden, new)
            hidden = block(hidden, attention_mask=None, position_embeddings=cos_sin)
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        return model.lm_head(text.norm(hidden)[:, -1])


@pytest.mark.parametrize("policy", ["reindex", "original"])
def test_llm_stage_pruning_matches_layer_by_layer_reference(family, policy):
    model, _ = build(family)
    inputs = make_inputs(family, "left", batch=1)
    layer = 2
    with tokensieve.sieve(model, Random(keep=0.5, layer=layer, positions=policy, seed=5)) as s:
        pruned = _logits(model, inputs)
    image_cols = _image_positions(model, inputs["input_ids"][0])
    kept = image_cols[s.trace.kept(0, 0)]
    text_cols = torch.nonzero(inputs["input_ids"][0] != model.config.image_token_id).flatten()
    kept_cols = torch.sort(torch.cat([kept, text_cols])).values
    reference = _reference_llm_stage_logits(model, inputs, kept_cols, layer, policy)
    assert torch.allclose(pruned[0, -1], reference[0], atol=1e-4), (family, policy)

"""In-LLM methods: PDrop, SparseVLM, DART, EntropyPrune, TransPrune on the three tiny families, plus hand-made
cases whose right answer is known."""

from __future__ import annotations

import pytest
import torch

import tokensieve
from tokensieve.budget import stages_layer_average
from tokensieve.context import LayerCapture, LLMContext, Selection
from tokensieve.methods._schedule import fit_stages, scale_layers
from tokensieve.methods.dart import DART
from tokensieve.methods.entropyprune import EntropyPrune, find_entropy_collapse_layer, image_query_entropy_per_layer
from tokensieve.methods.pdrop import PDrop
from tokensieve.methods.sparsevlm import SparseVLM
from tokensieve.methods.transprune import TransPrune, transition_variation
from tokensieve.testing import qwen_image_prompt, random_image, tiny_llava, tiny_llava_next, tiny_qwen2_5_vl

torch.set_num_threads(2)

FAMILIES = ("llava", "llava_next", "qwen2_5_vl")
_BUILDERS = {"llava": tiny_llava, "llava_next": tiny_llava_next, "qwen2_5_vl": tiny_qwen2_5_vl}
_MODELS: dict = {}
_INPUTS: dict = {}


def _model(family: str):
    if family not in _MODELS:
        _MODELS[family] = _BUILDERS[family](attn="sdpa")
    return _MODELS[family]


def _inputs(family: str):
    """Batch of 2, left padding, prompts of different lengths with at least 4 instruction tokens."""
    if family not in _INPUTS:
        _, proc = _model(family)
        proc.tokenizer.padding_side = "left"
        texts = ["what is the color of the square ?", "describe this image and how many circle in the picture ?"]
        if family == "qwen2_5_vl":
            prompts, sizes = [qwen_image_prompt(t) for t in texts], [(112, 112), (84, 112)]
        else:
            prompts = [f"USER: <image> {t} ASSISTANT:" for t in texts]
            sizes = [(56, 56), (56, 84)] if family == "llava_next" else [(56, 56)] * 2
        images = [random_image(i, sizes[i]) for i in range(2)]
        _INPUTS[family] = proc(images=images, text=prompts, return_tensors="pt", padding=True)
    return _INPUTS[family]


def _pruning_methods():
    """Methods with settings that prune at every stage of a 4-layer model."""
    return {
        "pdrop": PDrop(keep=0.5),
        "sparsevlm": SparseVLM(),
        "dart": DART(keep=0.5, layer=2),
        "entropyprune": EntropyPrune(keep=0.5, layer=2),
        "transprune": TransPrune(),
    }


def _expected_counts(method, n_tokens: int, n_layers: int, n_instruction: int) -> list[int]:
    """Visual tokens per decoder layer from the method's own schedule rule."""
    counts = [n_tokens] * n_layers
    for s, layer in enumerate(method.llm_layers(n_layers)):
        k = method.budget(n_tokens, stage_index=s, n_layers=n_layers)
        if isinstance(method, DART) and not method.exact_budget:
            pivots = min(method.pivot_image_tokens, k) + min(method.pivot_text_tokens, n_instruction)
            k = min(n_tokens, min(method.pivot_image_tokens, k) + pivots * (k // pivots))
        if isinstance(method, SparseVLM):
            k = method.kept_count(counts[layer - 1], k)
        k = min(k, counts[layer - 1])
        for j in range(layer, n_layers):
            counts[j] = k
    return counts


# ----- schedules on the real models ------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", ["pdrop", "sparsevlm", "dart", "entropyprune", "transprune"])
def test_schedule_determinism_kv_cache_and_generate(family, name):
    model, _ = _model(family)
    inputs = _inputs(family)
    method = _pruning_methods()[name]
    ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
    is_image = (ids == model.config.image_token_id) & mask
    n_image = is_image.sum(1)
    n_layers = model.config.text_config.num_hidden_layers
    kept = []
    for _ in range(2):
        with tokensieve.sieve(model, method) as s:
            with torch.no_grad():
                cache = model(**inputs, use_cache=True).cache
        kept.append([s.trace.kept(b, 0) for b in range(2)])
        counts = [s.trace.counts_per_layer(b, 0) for b in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(kept[0], kept[1], strict=True)), "not deterministic"

    expected = []
    for b in range(2):
        last_image = int(torch.nonzero(is_image[b]).max())
        n_instruction = int((mask[b, last_image + 1 :]).sum())
        expected.append(_expected_counts(method, int(n_image[b]), n_layers, n_instruction))
    assert counts == expected
    if name == "pdrop" and family == "llava":
        assert counts[0] == [16, 8, 4, 2]
    if name == "sparsevlm" and family == "llava":
        # 192/576 schedule [300, 200, 110] scaled to 16 tokens = [8, 5, 3], plus one recycled cluster a stage
        assert counts[0] == [16, 9, 6, 4]
    if name == "transprune" and family == "llava":
        assert counts[0] == [16, 14, 10, 2]  # [0.875, 0.625, 0.125] of 16

    # The cache of each layer holds the text plus exactly the kept visual tokens (left-padded to the batch max).
    text = mask.sum(1) - n_image
    for layer, cached in enumerate(cache.layers):
        want = int(max(int(text[b]) + expected[b][layer] for b in range(2)))
        assert cached.keys.shape[-2] == want, (layer, cached.keys.shape, want)

    with tokensieve.sieve(model, method):
        out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert out.shape == (2, ids.shape[1] + 2)


@pytest.mark.parametrize("family", FAMILIES)
def test_keep_all_is_exact(family):
    model, _ = _model(family)
    inputs = _inputs(family)
    valid = inputs["attention_mask"].bool()
    with torch.no_grad():
        reference = model(**inputs).logits
    methods = [
        PDrop(keep=1.0, lam=1.0),
        PDrop(keep=1.0, average_budget=True),
        SparseVLM(keep=1.0),
        DART(keep=1.0, layer=2),
        EntropyPrune(keep=1.0, layer=1),
        TransPrune(keep=1.0),
    ]
    for method in methods:
        with tokensieve.sieve(model, method) as s:
            with torch.no_grad():
                pruned = model(**inputs).logits
        assert s.trace.layer_average(0, 0) == s.trace.images[(0, 0)]["n_tokens"]
        assert torch.allclose(pruned[valid], reference[valid], atol=1e-5), method.describe()


def test_find_entropy_collapse_layer_removes_its_hooks():
    model, _ = _model("llava")
    inputs = _inputs("llava")
    hooks = sum(len(m._forward_hooks) for m in model.modules())
    entropies = image_query_entropy_per_layer(model, inputs)
    layer = find_entropy_collapse_layer(model, inputs)
    assert sum(len(m._forward_hooks) for m in model.modules()) == hooks
    drops = [entropies[i - 1] - entropies[i] for i in range(1, len(entropies))]
    assert len(entropies) == 4 and 1 <= layer <= 3
    assert layer == 1 + drops.index(max(drops))


# ----- budget rules at paper scale -------------------------------------------------------------------------------
def test_paper_schedules_at_32_layers():
    assert PDrop().llm_layers(32) == [8, 16, 24]
    assert PDrop(keep=0.5).schedule(576, 32) == [288, 144, 72]
    assert SparseVLM().llm_layers(32) == [3, 7, 16]  # prunes the output of the official pruning_loc [2, 6, 15]
    assert [SparseVLM().capture_layers(layer, 32) for layer in (3, 7, 16)] == [[0, 2], [0, 6], [0, 15]]
    assert SparseVLM(keep=0.3334).stage_counts(576, 32) == [300, 200, 110]
    assert SparseVLM(keep=128).stage_counts(576, 32) == [303, 110, 36]
    assert SparseVLM(keep=0.1112).stage_counts(576, 32) == [66, 30, 17]
    assert TransPrune().llm_layers(32) == [7, 9, 12]
    assert TransPrune().capture_layers(12, 32) == list(range(6, 12))
    assert TransPrune().stage_counts(576, 32) == [504, 360, 72]
    # s = (L * avg - K * N) / (L - K), truncated like the official int() by the shared helper.
    assert [EntropyPrune(keep=a, average_budget=True).budget(576, n_layers=32) for a in (192, 128, 64)] == [
        166,
        98,
        29,
    ]
    assert PDrop(keep=128, average_budget=True).llm_layers(32) == [3, 16, 24]
    assert PDrop(keep=192, average_budget=True).llm_layers(32) == [8, 16, 24]
    assert scale_layers((0.25, 0.5, 0.75), 4) == [1, 2, 3]
    # a model too shallow for every stage runs the first ones, the last stage keeping the final target
    assert scale_layers((0.25, 0.5, 0.75), 3) == [1, 2]
    assert fit_stages([0.875, 0.625, 0.125], 2) == [0.875, 0.125]
    assert PDrop(keep=0.5).llm_layers(3) == [1, 2]
    assert SparseVLM().llm_layers(4) == [1, 2, 3]


@pytest.mark.parametrize("average", [64, 128, 192])
def test_average_budgets_are_met_from_below(average):
    for method, counts in (
        (PDrop(keep=average, average_budget=True), lambda m: m.schedule(576, 32)),
        (SparseVLM(keep=average + 7), lambda m: m.stage_counts(576, 32)),  # off the paper table: solved
        (TransPrune(keep=average + 64, average_budget=True), lambda m: m.stage_counts(576, 32)),  # >= 7/32
    ):
        c = counts(method)
        got = stages_layer_average(c, method.llm_layers(32), 576, 32)
        target = method.keep
        assert got <= target and got > target - 3, (method.name, c, got)
        assert c == sorted(c, reverse=True)


# ----- hand-made contexts ----------------------------------------------------------------------------------------
N_IMG, HEADS, HEAD_DIM, WIDTH = 8, 4, 8, 16


def _context(
    queries: torch.Tensor | None = None,
    keys: torch.Tensor | None = None,
    hidden: torch.Tensor | None = None,
    layer: int = 1,
    **capture,
) -> LLMContext:
    """One sample: a text token at column 0, the image at columns 1..N_IMG, 4 instruction tokens after it.
    Every layer up to ``layer`` gets the same capture (``layer`` itself: the own q/k of ``own_qk`` methods)."""
    length = 1 + N_IMG + 4
    cols = torch.arange(length)
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(length, WIDTH, generator=gen) if hidden is None else hidden
    image_cols = torch.arange(1, 1 + N_IMG)
    text_cols = torch.tensor([0, *range(1 + N_IMG, length)])
    cap = LayerCapture(cols=cols, valid=torch.ones(length, dtype=torch.bool), queries=queries, keys=keys,
                       hidden=hidden, **capture)  # fmt: skip
    return LLMContext(
        sample=0,
        image=0,
        layer=layer,
        n_layers=4,
        n_tokens=N_IMG,
        token_index=torch.arange(N_IMG),
        hidden=hidden[image_cols],
        text_hidden=hidden[text_cols],
        image_cols=image_cols,
        text_cols=text_cols,
        text_after_image=text_cols > image_cols.max(),
        last_col=length - 1,
        layers={j: cap for j in range(layer + 1)},
    )


def _one_token_gets_all_attention(target: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries and keys (kv heads = 2) such that every query attends (almost) only to image token ``target``."""
    length = 1 + N_IMG + 4
    q = torch.zeros(HEADS, length, HEAD_DIM)
    q[..., 0] = 1.0
    k = torch.zeros(2, length, HEAD_DIM)
    k[:, 1 + target, 0] = 50.0
    return q, k


def test_pdrop_keeps_the_token_the_last_token_attends_to():
    q, k = _one_token_gets_all_attention(target=5)
    chosen = PDrop().select(_context(q, k), 1)
    assert chosen.tolist() == [5]


def test_sparsevlm_keeps_the_attended_token_and_recycles_on_top_of_the_budget():
    q, k = _one_token_gets_all_attention(target=2)
    method = SparseVLM()
    result = method.select(_context(q, k), 4)
    assert isinstance(result, Selection)
    keep = result.keep.tolist()
    # 4 by relation, then of the 4 deleted a pool of int(0.3 * 4) + 1 = 2 makes int(2 / 10) + 1 = 1 cluster
    assert 2 in keep and len(set(keep)) == 5 == method.kept_count(N_IMG, 4)
    assert set(result.replace_at.tolist()) <= set(keep)
    assert result.replace_with.shape == (1, WIDTH)
    assert SparseVLM(recycle=False).select(_context(q, k), 4).tolist() == keep[:4]
    within = SparseVLM(recycle_within_budget=True).select(_context(q, k), 4)
    assert len(set(within.keep.tolist())) == 4 and 2 in within.keep.tolist()


def test_sparsevlm_merged_slot_is_the_mean_of_its_cluster():
    q, k = _one_token_gets_all_attention(target=0)
    ctx = _context(q, k)
    method = SparseVLM(recycle_ratio=1.0)
    result = method.select(ctx, 3)
    relation = method.relation(ctx)
    top = torch.topk(relation, 3).indices
    deleted = torch.tensor([i for i in range(N_IMG) if i not in top.tolist()])
    pool = deleted[torch.topk(relation[deleted], min(5, int(1.0 * 5) + 1)).indices]  # all 5 deleted
    assert set(result.keep[:3].tolist()) == set(top.tolist())
    assert result.replace_at.tolist() == [int(pool[0])]  # one cluster: int(5 / 10) + 1
    assert torch.allclose(result.replace_with[0], ctx.hidden[pool].mean(0), atol=1e-6)


def test_dart_does_not_select_duplicates_of_a_pivot():
    hidden = torch.randn(1 + N_IMG + 4, WIDTH, generator=torch.Generator().manual_seed(1))
    hidden[2] = hidden[1]  # image tokens 1 and 2 duplicate image token 0
    hidden[3] = 2.0 * hidden[1]
    keys = torch.randn(2, hidden.shape[0], HEAD_DIM, generator=torch.Generator().manual_seed(2)) * 0.1
    keys[:, 1] = 10.0  # image token 0 has the largest key norm: the pivot
    ctx = _context(torch.zeros(HEADS, hidden.shape[0], HEAD_DIM), keys, hidden)
    chosen = DART(pivot_image_tokens=1, pivot_text_tokens=0).select(ctx, 5).tolist()
    assert 0 in chosen and 1 not in chosen and 2 not in chosen
    assert len(chosen) == 1 + 5
    exact = DART(pivot_image_tokens=1, pivot_text_tokens=0, exact_budget=True).select(ctx, 5).tolist()
    assert len(exact) == 5 and 0 in exact and 1 not in exact and 2 not in exact


def test_dart_counts_text_pivots():
    keys = torch.randn(2, 1 + N_IMG + 4, HEAD_DIM, generator=torch.Generator().manual_seed(3))
    ctx = _context(torch.zeros(HEADS, 1 + N_IMG + 4, HEAD_DIM), keys)
    assert len(DART(pivot_image_tokens=2, pivot_text_tokens=2).select(ctx, 4)) == 2 + 4 * (4 // 4)
    assert len(DART(pivot_image_tokens=2, pivot_text_tokens=2, exact_budget=True).select(ctx, 5)) == 5


def test_entropyprune_drops_the_token_with_identical_heads_first():
    # Small queries keep the Gram eigenvalues below 1; without trace normalisation (as in the official code)
    # eigenvalues above 1 give negative terms.
    q = 0.1 * torch.randn(HEADS, 1 + N_IMG + 4, HEAD_DIM, generator=torch.Generator().manual_seed(4))
    q[:, 1 + 6] = torch.randn(HEAD_DIM)  # image token 6: every head the same vector, zero entropy
    chosen = EntropyPrune().select(_context(q, torch.zeros(2, 1 + N_IMG + 4, HEAD_DIM)), N_IMG - 1)
    assert 6 not in chosen.tolist() and len(chosen) == N_IMG - 1


def test_transition_variation_formula():
    before = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    after = torch.tensor([[2.0, 0.0], [0.0, -1.0], [5.0, 5.0]])
    valid = torch.tensor([True, True, False])
    w = transition_variation(before, after, valid)
    soft = torch.softmax(torch.tensor([0.0, 2.0]), 0)  # 1 - cos: 0 and 2
    assert torch.allclose(w, torch.tensor([2.0 * soft[0], 1.0 * soft[1], 0.0]))


def test_transprune_keeps_the_token_that_transforms_most():
    length = 1 + N_IMG + 4
    before = torch.randn(length, WIDTH, generator=torch.Generator().manual_seed(5))
    after = before.clone()
    after[1 + 3] = -3.0 * before[1 + 3]  # image token 3: reversed and amplified by both modules
    q = torch.zeros(HEADS, length, HEAD_DIM)  # uniform instruction attention: IGA does not decide
    ctx = _context(q, torch.zeros(2, length, HEAD_DIM), layer=2, attn_in=before, attn_out=after,
                   mlp_in=before, mlp_out=after)  # fmt: skip
    method = TransPrune(layers=(2,), ratios=(0.125,), accumulate_from=0)
    assert method.capture_layers(2, 4) == [0, 1]
    assert method.select(ctx, 1).tolist() == [3]


# ----- shared layer and budget rules -----------------------------------------------------------------------------
def test_layer_defaults_scale_with_depth_and_keep_the_paper_layers_at_32():
    from tokensieve.methods._layers import normalize_layer, scale_layer
    from tokensieve.methods.fastv import FastV

    assert [scale_layer(k, 32) for k in (2, 8, 16, 24)] == [2, 8, 16, 24]
    assert [scale_layer(k, 16) for k in (2, 8, 15)] == [1, 4, 8]  # max(1, round(K * 16 / 32)): 7.5 -> 8
    assert [scale_layer(2, n) for n in (4, 40, 64)] == [1, 2, 4]
    for cls in (FastV, DART, EntropyPrune):
        assert cls().llm_layers(32) == [2] and cls().llm_layers(64) == [4] and cls().llm_layers(4) == [1]
        assert cls(layer=3).llm_layers(4) == [3] and cls(layer=-1).llm_layers(4) == [3]
    assert normalize_layer(-2, 24) == 22
    with pytest.raises(ValueError, match=r"outside the model's 4 layers; pass layer in \[0, 3\]"):
        normalize_layer(4, 4)
    with pytest.raises(ValueError, match="must be an int"):
        normalize_layer(None, 4)
    assert PDrop().llm_layers(16) == [4, 8, 12] and TransPrune().llm_layers(64) == [14, 18, 24]


def test_budget_rounding_conventions():
    from tokensieve.budget import resolve_keep, round_count

    assert resolve_keep(0.1, 256) == 25 and resolve_keep(0.1, 256, rounding="round") == 26
    assert round_count(0.5, 53) == 26 and round_count(0.5, 51) == 26  # Python's half-to-even round
    with pytest.raises(ValueError, match="rounding"):
        resolve_keep(0.5, 10, rounding="ceil")
    assert TransPrune().stage_counts(100, 32) == [87, 62, 12]  # official int(n * r), not int(r * int(k n) / .125)
    assert PDrop(keep=0.3).schedule(115, 32) == [34, 17, 8]  # int(115 * 0.3 * 0.5**s)


def test_random_stage_is_per_instance_and_never_written():
    from tokensieve.methods.random import Random

    pre, deep = Random(), Random(layer=2)
    assert (pre.stage, deep.stage, Random.stage) == ("projector", "llm", "projector")
    assert (pre.position_policy, deep.position_policy) == ("reindex", "original")
    assert "stage" not in vars(deep) and "stage" not in vars(pre)
    assert deep.llm_layers(4) == [2] and Random(layer=-1).llm_layers(4) == [3] and pre.llm_layers(4) == []

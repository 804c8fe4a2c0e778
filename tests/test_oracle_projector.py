"""Oracles for pre-LLM methods, transcribed from the official code (they never import tokensieve.methods logic):

- DivPrune: ``vbdi/divprune`` ``LLaVA/llava/model/llava_arch.py`` (``DivPrune``, ``pairwise_cosine_similarity``);
- MMTok: ``Ironieser/MMTok`` ``mmtok/core/semantic_selector.py`` (the greedy loop with ``score_mask``),
  ``mmtok/llava/patch_llava.py`` (``calculate_padding_patch_indices``), ``mmtok/qwen/`` (mean of 4 patches);
- HiPrune: ``Danielement321/HiPrune`` ``LLaVA/llava/model/llava_arch.py::encode_images`` and
  ``Qwen2_5_VL/qwen2_5_vl_HiPrune.py`` (flat buffers, ``round`` budgets).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _oracle import inputs_for, reference
from conftest import build

import tokensieve
from tokensieve.context import VisionSignals, seeded_generator
from tokensieve.methods.base import make_method
from tokensieve.testing import image_context

FAMILIES = ("llava", "llava_next", "qwen2_5_vl")
SIZES = {"llava": (56, 56), "llava_next": (56, 84), "qwen2_5_vl": (112, 140)}


# ----- DivPrune ---------------------------------------------------------------------------------------------------
def divprune_oracle(visual: torch.Tensor, ratio: float) -> list[int]:
    threshold_terms = int(round(ratio * visual.shape[0]))
    unit = visual / visual.norm(dim=1, keepdim=True)
    cosine_matrix = 1.0 - unit @ unit.t()
    s = torch.empty(threshold_terms, dtype=torch.long)
    for i in range(threshold_terms):
        m2 = cosine_matrix if i == 0 else torch.index_select(cosine_matrix, 0, s[:i])
        scores = torch.topk(m2, 2, dim=0, largest=False).values[1, :] if i == 0 else torch.min(m2, dim=0).values
        s[i] = torch.argmax(scores)
    return sorted(s.tolist())


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("keep", [0.35, 0.6, 0.25])  # fraction parts >= .5 (5.6 -> 6, 9.6 -> 10) and an exact one
def test_divprune_matches_the_official_code(family, keep):
    inputs = inputs_for(family, size=SIZES[family])
    ref = reference(family, inputs)
    features = ref.hidden[0][ref.image].float()  # what the LLM receives (NeXT: newlines included, one set)
    model, _ = build(family, "eager")
    with tokensieve.sieve(model, "divprune", keep=keep) as s, torch.no_grad():
        model(**inputs)
    assert s.trace.kept(0, 0).tolist() == divprune_oracle(features, keep)


def test_divprune_count_budget_matches_the_official_code():
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(50, 12, generator=gen)
    got = make_method("divprune", keep=13).select(image_context(features), 13)
    assert sorted(got.tolist()) == divprune_oracle(features, 13 / 50)
    assert make_method("divprune", keep=0.51).budget(50) == 26 == int(round(0.51 * 50))  # 25.5 -> 26


# ----- MMTok ------------------------------------------------------------------------------------------------------
def mmtok_oracle(text, vision, vision_clip, k, tv_temp, vv_temp=0.2, alpha=0.5, exclude=()) -> list[int]:
    """``mm_coverage_selection``'s loop (the JIT kernel computes the same greedy)."""
    x, xc, z = (F.normalize(t.float(), dim=-1, eps=1e-8) for t in (vision, vision_clip, text))
    m, n = z.shape[0], x.shape[0]
    p = F.softmax((z @ x.T) / tv_temp, dim=1) / m
    q = F.softmax((xc @ xc.T) / vv_temp, dim=1) / n
    combined = torch.cat([p, q * alpha], dim=0)
    best = torch.zeros(m + n)
    score_mask = torch.zeros(n)
    score_mask[list(exclude)] = float("-inf")
    picked = []
    for _ in range(min(k, n)):
        delta = (combined - best.unsqueeze(1)).clamp_min(0).sum(0) + score_mask
        j = int(torch.argmax(delta))
        picked.append(j)
        best = torch.maximum(best, combined[:, j])
        score_mask[j] = float("-inf")
    return sorted(picked)


def _mmtok_context(n: int, family: str, d_pre: int, seed: int = 0, **fields):
    gen = torch.Generator().manual_seed(seed)
    text = torch.randn(5, 16, generator=gen)
    side = int(n**0.5)
    idx = torch.arange(n)
    ctx = image_context(
        torch.randn(n, 16, generator=gen), pre_features=torch.randn(n, d_pre, generator=gen),
        text_ids=torch.arange(5), text_embeds=text, family=family, grid_hw=(side, side),
        grid_rc=torch.stack([idx // side, idx % side], 1), **fields,
    )  # fmt: skip
    return ctx, text


@pytest.mark.parametrize(("family", "tau_t"), [("llava", 0.02), ("qwen2_5_vl", 0.01)])
@pytest.mark.parametrize("keep", [7, 0.3])
def test_mmtok_matches_the_official_code(family, tau_t, keep):
    ctx, text = _mmtok_context(36, family, d_pre=24)
    method = make_method("mmtok", keep=keep)
    k = method.budget(36)
    assert k == (keep if isinstance(keep, int) else int(keep * 36))
    clip = ctx.pre_features.reshape(36, 4, -1).mean(1) if family == "qwen2_5_vl" else ctx.pre_features
    assert sorted(method.select(ctx, k).tolist()) == mmtok_oracle(text, ctx.features, clip, k, tau_t)


def padding_oracle(original_size, target_size=336, patch_size=14):
    """``calculate_padding_patch_indices`` (``include_overlap=False``)."""
    w, h = original_size
    if w == h:
        return []
    n = target_size // patch_size
    out = []
    if w > h:
        scaled = int(round(h * (target_size / w)))
        if scaled == target_size:
            return []
        top = (target_size - scaled) // 2
        bottom = target_size - scaled - top
        for row in [*range(top // patch_size), *range(n - bottom // patch_size, n)]:
            out += [row * n + col for col in range(n)]
    else:
        scaled = int(round(w * (target_size / h)))
        if scaled == target_size:
            return []
        left = (target_size - scaled) // 2
        right = target_size - scaled - left
        for col in [*range(left // patch_size), *range(n - right // patch_size, n)]:
            out += [row * n + col for row in range(n)]
    return out


@pytest.mark.parametrize("size", [(640, 480), (300, 500), (400, 400), (1000, 200)])
def test_mmtok_padding_patches_match_the_official_code(size):
    from tokensieve.methods.mmtok import padding_patch_indices

    assert padding_patch_indices(size, 24) == padding_oracle(size)


def test_mmtok_exclude_padding_matches_the_official_score_mask():
    ctx, text = _mmtok_context(576, "llava", d_pre=8, seed=1)
    ctx.image_size = (640, 360)
    excluded = padding_oracle((640, 360))
    assert len(excluded) > 0
    got = make_method("mmtok", keep=64, exclude_padding=True).select(ctx, 64)
    assert sorted(got.tolist()) == mmtok_oracle(text, ctx.features, ctx.pre_features, 64, 0.02, exclude=excluded)
    with pytest.raises(ValueError, match="image_size"):
        del ctx.image_size
        make_method("mmtok", keep=64, exclude_padding=True).select(ctx, 64)


# ----- HiPrune ----------------------------------------------------------------------------------------------------
def hiprune_oracle(shallow_attn, deep_attn, visual_token_num: int, alpha: float, width: int) -> list[int]:
    """``encode_images``: global attention (head mean, mean over all queries, CLS column dropped) of the
    object and deep layers; ``round(v * alpha / 5)`` anchors; +-1 / +-width buffers clamped; registers."""
    n = shallow_attn.shape[-1] - 1
    shallow = shallow_attn.mean(0).mean(0)[1:]
    deep = deep_attn.mean(0).mean(0)[1:].clone()
    anchors = torch.topk(shallow, k=round(visual_token_num * alpha / 5)).indices
    idx = torch.cat([anchors, anchors - 1, anchors + 1, anchors - width, anchors + width]).clamp(0, n - 1)
    idx = torch.unique(idx, sorted=False)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[idx] = True
    deep -= mask.int()
    registers = torch.topk(deep, k=visual_token_num - idx.numel()).indices
    return sorted(torch.cat([idx, registers]).tolist())


def _vision_context(side: int, anchors: list[int], seed: int):
    """A LLaVA-like context (CLS + side x side patches) whose object layer (1-based 1) draws attention to
    ``anchors`` (patch offsets on the grid borders) and whose deep layer (2 of 3, i.e. -2) is random."""
    gen = torch.Generator().manual_seed(seed)
    tokens, heads, d = side * side + 1, 2, 8
    q = [torch.randn(heads, tokens, d, generator=gen) for _ in range(2)]
    k = [torch.randn(heads, tokens, d, generator=gen) for _ in range(2)]
    for rank, a in enumerate(anchors):
        k[0][:, 1 + a] += (3.0 - 0.3 * rank) * q[0].mean(1)  # received attention, ranked by order
    vision = VisionSignals(has_cls=True, n_layers=3)
    vision.queries, vision.keys = {0: [q[0]], 1: [q[1]]}, {0: [k[0]], 1: [k[1]]}
    idx = torch.arange(side * side)
    ctx = image_context(
        torch.zeros(side * side, 4), grid_rc=torch.stack([idx // side, idx % side], 1), grid_hw=(side, side),
        vision=vision, vision_patch_index=idx + 1, family="llava",
    )  # fmt: skip
    attn = [torch.softmax(q[j] @ k[j].transpose(1, 2) / d**0.5, dim=-1) for j in range(2)]
    return ctx, attn


@pytest.mark.parametrize("keep", [10, 0.5])  # 2 anchors of 10; round(0.5 * 36) = 18 with round(3.6) = 4 anchors
def test_hiprune_matches_the_official_code_with_anchors_on_grid_borders(keep):
    side = 6
    ctx, attn = _vision_context(side, anchors=[5, 30, 35, 6], seed=0)  # ends of rows: +-1 wraps or clamps
    method = make_method("hiprune", keep=keep, alpha=1.0, object_layer=1)
    k = method.budget(side * side)
    assert k == (keep if isinstance(keep, int) else round(keep * side * side))
    expected = hiprune_oracle(attn[0], attn[1], k, 1.0, side)
    assert 5 in expected and 6 in expected  # anchor 5 (row 0, last col) buffers 6, the next row's first
    assert sorted(method.select(ctx, k).tolist()) == expected


# ----- ZOO-Prune (LLaVA-1.5) ----------------------------------------------------------------------------------------
def zoo_oracle(x, project, z, generator, m: int, h: float, k: int) -> list[int]:
    """``AIM-SKKU/ZOO-Prune`` ``LLaVA/llava/model/llava_arch.py``: one bank of ``m`` unit Gaussian directions
    shared by all tokens, central differences through the projector, mean over directions of the L2 norm, then
    ``select_tokens_sads`` on the projected features (float32 here, as our default; the official casts to fp16)."""
    n, d = x.shape
    u = torch.randn(m, d, generator=generator)
    u = u / (u.norm(dim=-1, keepdim=True) + 1e-12)
    u_expanded = u.unsqueeze(1).expand(-1, n, -1)
    plus = project((x.unsqueeze(0) + h * u_expanded).reshape(m * n, d)).view(m, n, -1)
    minus = project((x.unsqueeze(0) - h * u_expanded).reshape(m * n, d)).view(m, n, -1)
    importance = ((plus - minus).norm(dim=-1) / (2 * h)).mean(dim=0)
    dist = 1.0 - F.cosine_similarity(z.unsqueeze(1), z.unsqueeze(0), dim=-1)
    if importance.max() > importance.min():
        weight = (importance - importance.min()) / (importance.max() - importance.min() + 1e-8)
    else:
        weight = torch.ones_like(importance)
    selected = torch.empty(k, dtype=torch.long)
    for i in range(k):
        scores = weight if i == 0 else dist[selected[:i]].min(dim=0).values * weight
        mask = torch.ones(n, dtype=torch.bool)
        mask[selected[:i]] = False
        selected[i] = torch.argmax(scores.masked_fill(~mask, float("-inf")))
    return sorted(selected.tolist())


@pytest.mark.parametrize("keep", [9, 0.2223])
def test_zoo_matches_the_official_code_on_a_llava_projector(keep):
    torch.manual_seed(0)
    projector = torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.GELU(), torch.nn.Linear(32, 16)).eval()
    x = torch.randn(40, 12)
    with torch.no_grad():
        z = projector(x)
        ctx = image_context(z, pre_features=x, project=projector, projector_module=projector, family="llava")
        method = make_method("zoo", keep=keep, m=16)
        k = method.budget(40)
        assert k == (keep if isinstance(keep, int) else int(keep * 40))
        expected = zoo_oracle(x, projector, z, seeded_generator(0, content_key=0), 16, 0.01, k)  # the one bank
        assert sorted(method.select(ctx, k).tolist()) == expected


@pytest.mark.parametrize("family", FAMILIES)
def test_divprune_matches_the_official_code_for_several_images_in_a_padded_batch(family):
    """Two prompts of two images each, left-padded: every image's kept set is the oracle's on its own tokens."""
    from conftest import make_inputs

    model, _ = build(family, "eager")
    inputs = make_inputs(family, "left", images_per_prompt=2, batch=2)
    with torch.no_grad():
        embeds = model(**inputs, output_hidden_states=True).hidden_states[0]
    with tokensieve.sieve(model, "divprune", keep=0.35) as s, torch.no_grad():
        model(**inputs)
    for b in range(2):
        positions = torch.nonzero(inputs["input_ids"][b] == model.config.image_token_id).flatten()
        start = 0
        for i in range(2):
            n = s.trace.images[(b, i)]["n_tokens"]
            features = embeds[b, positions[start : start + n]].float()
            assert s.trace.kept(b, i).tolist() == divprune_oracle(features, 0.35), (family, b, i)
            start += n


# ----- VisionZip ----------------------------------------------------------------------------------------------------
def visionzip_oracle(attn, hidden, metric, dominant_num: int, contextual_num: int):
    """``dvlab-research/VisionZip`` ``visionzip/clip_encoder.py`` for one image: attn [H, T, T] and hidden
    [T, d] of layer -2 (row 0 = CLS), metric [T, d_k] its head-averaged keys. The one documented difference is
    applied: the CLS slot goes to one more patch (``topk(dominant_num)`` patches, no CLS row). Returns the kept
    patch offsets and the contextual tokens (pre-projector), in target order."""
    topk_indices = attn[:, 0, 1:].sum(dim=0).topk(dominant_num).indices + 1
    mask = torch.ones(hidden.shape[0], dtype=torch.bool)
    mask[0] = False  # the CLS row is not a patch
    mask[topk_indices] = False
    rest = torch.nonzero(mask).flatten()
    metric_normalized = metric[rest] / metric[rest].norm(dim=-1, keepdim=True)
    step = max(1, metric_normalized.shape[0] // contextual_num)
    target_indices = torch.arange(0, metric_normalized.shape[0], step)[:contextual_num]
    others = ~torch.isin(torch.arange(metric_normalized.shape[0]), target_indices)
    similarity = metric_normalized[others] @ metric_normalized[target_indices].T
    assign_one_hot = torch.zeros(int(others.sum()), contextual_num)
    assign_one_hot.scatter_(1, similarity.argmax(dim=1).unsqueeze(-1), 1)
    counts = assign_one_hot.sum(dim=0).clamp(min=1).unsqueeze(-1)
    aggregated = assign_one_hot.T @ hidden[rest][others] / counts
    contextual = hidden[rest][target_indices] + aggregated
    kept = sorted((topk_indices - 1).tolist() + (rest[target_indices] - 1).tolist())
    return kept, contextual


@pytest.mark.parametrize("keep", [16, 0.5])
def test_visionzip_matches_the_official_code(keep):
    side, heads, d = 6, 2, 8
    tokens = side * side + 1
    gen = torch.Generator().manual_seed(4)
    q, k = torch.randn(heads, tokens, d, generator=gen), torch.randn(heads, tokens, d, generator=gen)
    hidden = torch.randn(tokens, 12, generator=gen)
    vision = VisionSignals(has_cls=True, n_layers=3, feature_layer=1)
    vision.queries, vision.keys, vision.hidden = {1: [q]}, {1: [k]}, {1: [hidden]}
    idx = torch.arange(side * side)
    ctx = image_context(
        hidden[1:], grid_rc=torch.stack([idx // side, idx % side], 1), grid_hw=(side, side), vision=vision,
        vision_patch_index=idx + 1, family="llava", project=lambda x: 2.0 * x,
    )  # fmt: skip
    method = make_method("visionzip", keep=keep)
    count = method.budget(side * side)
    contextual_num = round(count * 5 / 32)
    attn = torch.softmax(q @ k.transpose(1, 2) / d**0.5, dim=-1)
    kept, contextual = visionzip_oracle(attn, hidden, k.mean(0), count - contextual_num, contextual_num)
    got = method.select(ctx, count)
    assert sorted(got.keep.tolist()) == kept
    order = torch.argsort(got.replace_at)
    assert torch.allclose(got.replace_with[order], 2.0 * contextual, atol=1e-5)

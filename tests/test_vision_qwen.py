"""Vision-tower capture on Qwen2-VL / Qwen2.5-VL and the vision-stage methods that have a Qwen path.

Capture: the attention recomputed from captured q/k of a full-attention block equals the model's own eager
attention weights (un-windowed by hand), the last block's captured hidden states equal the merger input, and
each LLM token maps to its 2x2 group of patches. Methods: HiPrune, FlowCut (official Qwen paths), VisionZip and
TCC (received attention in place of CLS attention) end to end on tiny models, and hand-made known answers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl
from transformers.vision_utils import get_vision_position_ids, get_vision_window_index

import tokensieve
from tokensieve.context import ImageContext, Selection, VisionSignals
from tokensieve.methods import make_method
from tokensieve.methods.base import Method
from tokensieve.testing import image_context, qwen_image_prompt, random_image, tiny_qwen2_5_vl

SIZES = [(56, 56), (112, 84)]  # 2x2 and 3x4 merged tokens: different sizes, the second spans several windows
_MODELS: dict = {}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models on a shared machine: one thread is much faster
    yield
    torch.set_num_threads(previous)


def _model(attn: str = "sdpa", qwen2: bool = False):
    key = (attn, qwen2)
    if key not in _MODELS:
        _MODELS[key] = tiny_qwen2_5_vl(attn=attn, qwen2=qwen2)
    return _MODELS[key]


def _inputs(attn: str = "sdpa", qwen2: bool = False):
    _, proc = _model(attn, qwen2)
    proc.tokenizer.padding_side = "left"
    images = [random_image(i, size) for i, size in enumerate(SIZES)]
    texts = [qwen_image_prompt("what is the color ?"), qwen_image_prompt("how many ?")]
    return proc(images=images, text=texts, return_tensors="pt", padding=True)


@dataclass
class _Probe(Method):
    """Drops one token (so that the sieve builds a context) and records the contexts (not registered)."""

    seen: list = field(default_factory=list)

    name = "probe"
    stage = "vision"
    needs = frozenset({"vision_qk", "vision_hidden", "pre_features"})

    def vision_layers(self, n_vision_layers: int) -> list[int]:
        return list(range(n_vision_layers))

    def budget(self, n_tokens: int, *, stage_index: int = 0, n_layers: int = 0) -> int:
        return n_tokens - 1

    def select(self, ctx: ImageContext, k: int) -> torch.Tensor:
        self.seen.append(ctx)
        return torch.arange(k)


def _unwindow(grid_thw: torch.Tensor, visual) -> torch.Tensor:
    """Patch permutation window order -> natural order of ONE image, from the model's window index."""
    window_index, _ = get_vision_window_index(
        grid_thw[None], spatial_merge_size=2, window_size=visual.window_size, patch_size=visual.patch_size
    )
    return (torch.argsort(window_index)[:, None] * 4 + torch.arange(4)).flatten()


def test_full_attention_block_matches_eager_weights(monkeypatch):
    model, _ = _model("eager")
    visual = model.model.visual
    full = visual.fullatt_block_indexes[0]
    recorded: list[torch.Tensor] = []
    original = modeling_qwen2_5_vl.eager_attention_forward

    def spy(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        out, weights = original(module, query, key, value, attention_mask, scaling, dropout, **kwargs)
        if module is visual.blocks[full].attn:
            recorded.append(weights.detach())  # one [1, H, P_i, P_i] per image (per full-attention segment)
        return out, weights

    monkeypatch.setattr(modeling_qwen2_5_vl, "eager_attention_forward", spy)
    inputs = _inputs("eager")
    probe = _Probe()
    with tokensieve.sieve(model, probe), torch.no_grad():
        model(**inputs)
    assert len(recorded) == 2 and len(probe.seen) == 2
    for i, ctx in enumerate(probe.seen):
        vision = ctx.vision
        assert not vision.has_cls and vision.merge_size == 2 and vision.n_layers == len(visual.blocks)
        perm = _unwindow(inputs["image_grid_thw"][i], visual)
        reference = recorded[i][0][:, perm][:, :, perm]  # the model's own weights, un-windowed by hand
        ours = vision.attention(full, 0)
        assert ours.shape == reference.shape == (4, 4 * ctx.n, 4 * ctx.n)
        assert torch.allclose(ours, reference, atol=1e-6)
        # the last block's output, captured per image and un-windowed, is the merger input of each token
        last = vision.hidden[len(visual.blocks) - 1][0]
        assert torch.equal(last.reshape(ctx.n, -1), ctx.pre_features)


def test_each_token_maps_to_its_merge_group():
    model, _ = _model()
    inputs = _inputs()
    probe = _Probe()
    with tokensieve.sieve(model, probe), torch.no_grad():
        model(**inputs)
    grids = inputs["image_grid_thw"]
    for i, ctx in enumerate(probe.seen):
        # (h, w) of every patch in the processor's (natural) order: the positions the vision RoPE uses
        hw = get_vision_position_ids(grids[i : i + 1], 2)
        rows = ctx.vision.patch_rows(ctx.vision_patch_index)  # [n, 4]
        assert rows.shape == (ctx.n, 4)
        for t in range(ctx.n):
            r, c = ctx.grid_rc[t].tolist()
            cells = {tuple(x) for x in hw[rows[t]].tolist()}
            assert cells == {(2 * r + a, 2 * c + b) for a in (0, 1) for b in (0, 1)}, (i, t)
    signals = VisionSignals(has_cls=False, merge_size=2)
    assert signals.patch_rows(torch.tensor([0, 2])).tolist() == [[0, 1, 2, 3], [8, 9, 10, 11]]
    assert VisionSignals().patch_rows(torch.tensor([5])).tolist() == [[5]]  # CLIP: one row per token


def _run(method: str, keep, qwen2: bool = False):
    model, _ = _model(qwen2=qwen2)
    inputs = _inputs(qwen2=qwen2)
    with tokensieve.sieve(model, method, keep=keep) as s, torch.no_grad():
        logits = model(**inputs).logits
    return s, logits, inputs


VISION_METHODS = ["hiprune", "flowcut", "visionzip", "tcc"]


@pytest.mark.parametrize("method", VISION_METHODS)
def test_budget_determinism_and_keep_all(method: str):
    keep = 3
    first, logits, _ = _run(method, keep)
    second, logits2, _ = _run(method, keep)
    assert torch.isfinite(logits).all() and torch.equal(logits, logits2)
    for sample, n in enumerate((4, 12)):  # the two images differ in size
        info = first.trace.images[(sample, 0)]
        assert info["n_tokens"] == n
        kept = first.trace.kept(sample=sample, image=0)
        assert kept.numel() == keep
        assert torch.equal(kept, second.trace.kept(sample=sample, image=0))
    model, _ = _model()
    _, full, inputs = _run(method, 1.0)
    with torch.no_grad():
        reference = model(**inputs).logits
    valid = inputs["attention_mask"].bool()
    assert torch.allclose(full[valid], reference[valid], atol=1e-5)


@pytest.mark.parametrize("method", VISION_METHODS)
def test_qwen2_vl_runs(method: str):
    s, logits, _ = _run(method, 2, qwen2=True)  # no window attention: the capture needs no un-windowing
    assert torch.isfinite(logits).all()
    assert [s.trace.kept(sample=b, image=0).numel() for b in range(2)] == [2, 2]


def test_visionzip_qwen_merges_whole_merge_units():
    model, _ = _model()
    inputs = _inputs()
    # contextual_ratio=0: dominant tokens only; 0.5: half the budget becomes merged units written through the merger
    with tokensieve.sieve(model, "visionzip", keep=4, contextual_ratio=0.0) as s0, torch.no_grad():
        plain = model(**inputs).logits
    with tokensieve.sieve(model, "visionzip", keep=4, contextual_ratio=0.5) as s1, torch.no_grad():
        merged = model(**inputs).logits
    assert s0.trace.kept(sample=1, image=0).numel() == s1.trace.kept(sample=1, image=0).numel() == 4
    assert torch.isfinite(merged).all()
    assert not torch.allclose(plain[1, -1], merged[1, -1])


# ----- hand-made Qwen contexts ------------------------------------------------------------------------------


def _qwen_context(keys: torch.Tensor, values: torch.Tensor | None = None, n_layers: int = 2) -> ImageContext:
    """One frame of a 2x2 merged grid (16 patches, 4 tokens), no CLS, the same q/k/v at every layer."""
    heads, patches, d = keys.shape
    q = torch.zeros(heads, patches, d)
    q[..., 0] = 1.0
    vision = VisionSignals(has_cls=False, merge_size=2, n_layers=n_layers)
    for layer in range(n_layers):
        vision.queries[layer], vision.keys[layer] = [q], [keys]
        vision.values[layer] = [values if values is not None else torch.ones(heads, patches, d)]
    idx = torch.arange(4)
    return image_context(
        torch.zeros(4, 8),
        grid_rc=torch.stack([idx // 2, idx % 2], 1),
        grid_hw=(2, 2),
        vision=vision,
        vision_patch_index=idx,
        family="qwen2_vl",
    )


def test_hiprune_qwen_averages_attention_over_the_merge_group():
    keys = torch.zeros(2, 16, 4)
    keys[:, 5, 0] = 6.0  # one patch of token 1 (rows 4..7) draws the most attention of any single patch
    keys[:, 8:12, 0] = 4.0  # but all four patches of token 2 draw more on average
    method = make_method("hiprune", alpha=5.0)  # one anchor, no room for buffers at k = 1
    assert method.select(_qwen_context(keys), 1).tolist() == [2]


def test_flowcut_qwen_uses_the_mean_query_and_value_norm():
    keys = torch.zeros(2, 16, 4)
    keys[:, 0:4, 0] = 2.0  # the mean query attends most to token 0 ...
    values = torch.full((2, 16, 4), 0.1)
    values[:, 12:16] = 5.0  # ... but token 3 carries 50x the value norm: relation * ||v||_1 picks it
    method = make_method("flowcut")
    assert method.select(_qwen_context(keys, values), 1).tolist() == [3]
    values[:, 12:16] = 0.1
    assert method.select(_qwen_context(keys, values), 1).tolist() == [0]


@pytest.mark.parametrize("method", ["visionzip", "tcc"])
def test_cls_methods_use_received_attention_of_the_merge_group_on_qwen(method: str):
    keys = torch.zeros(2, 16, 4)
    keys[:, 5, 0] = 6.0  # one patch of token 1 draws the most attention of any single patch
    keys[:, 8:12, 0] = 4.0  # but all four patches of token 2 draw more on average
    options = {"contextual_ratio": 0.0} if method == "visionzip" else {}
    picked = make_method(method, **options).select(_qwen_context(keys), 1)
    assert (picked.keep if isinstance(picked, Selection) else picked).tolist() == [2]

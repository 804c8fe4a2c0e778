"""Vision-stage methods (VisionZip, HiPrune, FlowCut, TCC): tiny models end to end, hand-made known answers."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

import tokensieve
from tokensieve.adapters import UnsupportedModelError
from tokensieve.budget import split_budget
from tokensieve.context import ImageContext, Selection, VisionSignals
from tokensieve.methods import make_method
from tokensieve.methods._vision import crops_of
from tokensieve.methods.base import Method
from tokensieve.methods.flowcut import adaptive_prune_count
from tokensieve.methods.hiprune import grid_neighbours
from tokensieve.testing import (
    image_context,
    qwen_image_prompt,
    random_image,
    tiny_llava,
    tiny_llava_next,
    tiny_qwen2_5_vl,
)

METHODS = ("visionzip", "hiprune", "flowcut", "tcc")
_MODELS: dict = {}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # the tiny models are latency-bound: on a shared, loaded machine one thread is ~40x faster than two
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _model(family: str):
    if family not in _MODELS:
        builder = {"llava": tiny_llava, "llava_next": tiny_llava_next, "qwen2_5_vl": tiny_qwen2_5_vl}[family]
        _MODELS[family] = builder(attn="sdpa")
    return _MODELS[family]


def _inputs(family: str):
    model, proc = _model(family)
    proc.tokenizer.padding_side = "left"
    sizes = [(56, 56), (56, 84)] if family != "llava" else [(56, 56), (56, 56)]
    images = [random_image(i, sizes[i]) for i in range(2)]
    if family == "qwen2_5_vl":
        texts = [qwen_image_prompt("what is the color ?"), qwen_image_prompt("how many ?")]
    else:
        texts = ["USER: <image> what is the color ? ASSISTANT:", "USER: <image> how many ? ASSISTANT:"]
    return proc(images=images, text=texts, return_tensors="pt", padding=True)


def _run(family: str, method: str, keep):
    model, _ = _model(family)
    inputs = _inputs(family)
    with tokensieve.sieve(model, method, keep=keep) as s, torch.no_grad():
        logits = model(**inputs).logits
    return s, logits


@pytest.mark.parametrize("family", ["llava", "llava_next"])
@pytest.mark.parametrize("method", METHODS)
def test_budget_determinism_and_sdpa(family: str, method: str):
    model, _ = _model(family)
    assert model.config.text_config._attn_implementation == "sdpa"
    assert model.config.vision_config._attn_implementation == "sdpa"  # the capture never needs eager
    keep = 5
    first, logits = _run(family, method, keep)
    second, logits2 = _run(family, method, keep)
    assert torch.isfinite(logits).all()
    assert torch.equal(logits, logits2)
    for sample in range(2):
        info = first.trace.images[(sample, 0)]
        n_newline = int((info["grid_rc"][:, 0] < 0).sum())  # LLaVA-NeXT newlines: kept on top of the budget
        expected = min(info["n_tokens"], keep + n_newline)
        kept = first.trace.kept(sample=sample, image=0)
        assert kept.numel() == expected
        assert torch.equal(kept, second.trace.kept(sample=sample, image=0))
        newline = torch.nonzero(info["grid_rc"][:, 0] < 0).flatten()
        assert set(newline.tolist()) <= set(kept.tolist())


@pytest.mark.parametrize("family", ["llava", "llava_next"])
@pytest.mark.parametrize("method", METHODS)
def test_keep_all_is_exact(family: str, method: str):
    model, _ = _model(family)
    inputs = _inputs(family)
    valid = inputs["attention_mask"].bool()
    with torch.no_grad():
        reference = model(**inputs).logits
    _, logits = _run(family, method, 1.0)
    # same tolerance as the core keep-all test: the sieve re-masks the padded batch (last-ulp differences)
    assert torch.allclose(logits[valid], reference[valid], atol=1e-5)


def test_a_method_that_requires_cls_is_refused_on_qwen_before_any_forward():
    # the built-in vision methods all have a Qwen path (tests/test_vision_qwen.py); a user method that declares
    # requires_cls is refused when the sieve is built, with the reason and what to use instead
    @dataclass
    class ClsOnly(Method):
        name = "cls_only"
        stage = "vision"
        requires_cls = True
        needs = frozenset({"vision_qk"})

        def select(self, ctx: ImageContext, k: int) -> torch.Tensor:
            raise AssertionError("never reached")

    model, _ = _model("qwen2_5_vl")
    with pytest.raises(UnsupportedModelError, match=r"no \[CLS\] token.*projector-stage"):
        tokensieve.sieve(model, ClsOnly(keep=4))


def test_visionzip_writes_merged_tokens():
    model, _ = _model("llava")
    inputs = _inputs("llava")
    # contextual_ratio=0 keeps the same dominant tokens with no merge: the merge must change the output.
    with tokensieve.sieve(model, "visionzip", keep=6, contextual_ratio=0.0) as s0, torch.no_grad():
        plain = model(**inputs).logits
    with tokensieve.sieve(model, "visionzip", keep=6, contextual_ratio=0.5) as s1, torch.no_grad():
        merged = model(**inputs).logits
    assert s0.trace.kept(sample=0, image=0).numel() == s1.trace.kept(sample=0, image=0).numel() == 6
    assert not torch.allclose(plain[:, -1], merged[:, -1])


# ----- hand-made contexts -------------------------------------------------------------------------------------


def _context(
    queries: list[list[torch.Tensor]],
    keys: list[list[torch.Tensor]],
    side: int,
    n_layers: int = 3,
    layers: tuple[int, ...] = (1,),
    values: list[list[torch.Tensor]] | None = None,
    hidden: list[list[torch.Tensor]] | None = None,
    project=None,
) -> ImageContext:
    """A LLaVA-like context: each crop a ``side x side`` grid, CLS row 0, one candidate per patch."""
    crops = len(queries[0])
    per = side * side
    n = crops * per
    idx = torch.arange(per)
    vision = VisionSignals(has_cls=True, n_layers=n_layers)
    for j, layer in enumerate(layers):
        vision.queries[layer], vision.keys[layer] = queries[j], keys[j]
        if values is not None:
            vision.values[layer] = values[j]
        if hidden is not None:
            vision.hidden[layer] = hidden[j]
    return image_context(
        torch.zeros(n, 8),
        grid_rc=torch.stack([idx // side, idx % side], 1).repeat(crops, 1),
        grid_hw=(side, side),
        groups=torch.arange(crops).repeat_interleave(per),
        project=project,
        vision=vision,
        vision_patch_index=(idx + 1).repeat(crops),
        family="llava",
    )


def _peaked_keys(heads: int, tokens: int, d: int, peak_row: int, scale: float = 8.0) -> tuple[torch.Tensor, ...]:
    """Queries all equal to e_0 and keys zero except ``peak_row``: every query attends most to that row."""
    q = torch.zeros(heads, tokens, d)
    q[..., 0] = 1.0
    k = torch.zeros(heads, tokens, d)
    k[:, peak_row, 0] = scale
    return q, k


def test_visionzip_hand_made():
    gen = torch.Generator().manual_seed(0)
    heads, side, d, dv = 2, 4, 4, 3
    tokens = side * side + 1
    q, _ = _peaked_keys(heads, tokens, d, 0)
    k = torch.randn(heads, tokens, d, generator=gen) * 0.1
    k[:, 6, 0] = 8.0  # CLS attends most to patch 5 (row 6)
    hid = torch.randn(tokens, dv, generator=gen)
    ctx = _context([[q]], [[k]], side, hidden=[[hid]], project=lambda x: 2.0 * x)
    method = make_method("visionzip", contextual_ratio=0.25)
    out = method.select(ctx, 4)  # D = 3 dominant, C = 1 contextual
    assert isinstance(out, Selection)
    keep = out.keep.tolist()
    assert 5 in keep and len(keep) == 4
    # one target (the first remaining patch), every other remaining patch merged into it
    dominant = [i for i in keep if i not in out.replace_at.tolist()]
    rest = [i for i in range(16) if i not in dominant]
    target = rest[0]
    assert out.replace_at.tolist() == [target]
    expected = 2.0 * (hid[target + 1] + hid[[i + 1 for i in rest[1:]]].mean(0))
    assert torch.allclose(out.replace_with[0], expected, atol=1e-6)


def test_hiprune_buffers_official_flat_and_grid_option():
    side, heads, d = 4, 2, 4
    tokens = side * side + 1
    # object layer 0 (round(0.375 * 3) = 1, 1-based): global attention peaks at patch 7 = (1, 3), row 8.
    q0, k0 = _peaked_keys(heads, tokens, d, 8)
    # deep layer 1 (-2 of 3): peaks at patch 0, so the one register is patch 0 and never the wrapped patch 8.
    q1, k1 = _peaked_keys(heads, tokens, d, 1)
    ctx = _context([[q0], [q1]], [[k0], [k1]], side, layers=(0, 1))
    method = make_method("hiprune", alpha=1.0, buffers="grid")  # round(5 * 1 / 5) = 1 anchor
    # CLIP reads layers 0 (object) and 1 (deep, -2); the plan also captures the Qwen defaults (2: last block)
    assert method.vision_layers(3) == [0, 1, 2]
    keep = sorted(method.select(ctx, 5).tolist())
    assert keep == [0, 3, 6, 7, 11]  # anchor 7, neighbours (0,3) (2,3) (1,2); (1,4) does not wrap to 8
    # the official flat rule: 7 +- 1 and 7 +- 4 on the flattened grid, so 8 (the next row's first) is a buffer
    official = sorted(make_method("hiprune", alpha=1.0).select(ctx, 5).tolist())
    assert official == [3, 6, 7, 8, 11]
    rc = torch.tensor([[0, 0], [0, 1], [1, 0], [1, 1]])
    assert grid_neighbours(rc, torch.tensor([0])).tolist() == [1, 2]


def test_flowcut_hand_made():
    side, heads, d = 3, 2, 4
    tokens = side * side + 1
    q, k = _peaked_keys(heads, tokens, d, 3)  # CLS attends to patch 2
    v = torch.full((heads, tokens, d), 0.1)
    v[:, 3] = 1.0  # patch 2 also carries the largest value norm
    ctx = _context([[q]], [[k]], side, layers=(0,), values=[[v]])
    method = make_method("flowcut")
    assert method.vision_layers(3) == [0, 1, 2]  # CLIP scores layer 0 only; the plan also covers Qwen (all)
    assert method.select(ctx, 1).tolist() == [2]
    # the entropy-adaptive schedule: a flat CLS attention prunes nothing, a peaked one prunes (N - target)/sqrt(rpl)
    assert adaptive_prune_count(torch.full((100,), 0.01), 4, 20) == 0
    peaked = torch.full((100,), 1e-12)
    peaked[0] = 1.0
    assert adaptive_prune_count(peaked, 4, 20) == round(80 / math.sqrt(4))


def test_tcc_gives_more_budget_to_the_crop_with_distinct_keys():
    gen = torch.Generator().manual_seed(1)
    side, heads, d = 3, 2, 8
    tokens = side * side + 1
    q = torch.randn(heads, tokens, d, generator=gen)
    same = torch.randn(heads, 1, d, generator=gen).expand(heads, tokens, d).clone()  # crop 0: identical keys
    ortho = torch.linalg.qr(torch.randn(heads * d, tokens, generator=gen)).Q.T  # [T, H * d] orthonormal rows
    distinct = ortho.reshape(tokens, heads, d).transpose(0, 1).contiguous()  # crop 1: mutually orthogonal keys
    ctx = _context([[q, q]], [[same, distinct]], side)
    method = make_method("tcc")
    dens = method.densities(ctx, crops_of(ctx)[0])
    assert dens[0] == pytest.approx(method.min_density) and dens[1] == pytest.approx(1.0)
    keep = method.select(ctx, 6)
    per_crop = torch.bincount(ctx.groups[keep], minlength=2).tolist()
    assert sum(per_crop) == 6 and per_crop[1] > per_crop[0], per_crop


def test_split_budget():
    assert split_budget(10, [4, 4, 4]) == [4, 3, 3]
    assert split_budget(10, [2, 8, 8]) == [2, 4, 4]
    assert split_budget(20, [2, 3]) == [2, 3]
    assert split_budget(6, [9, 9], [0.05 * 9, 9.0]) == [0, 6]
    assert split_budget(5, [3, 3], [0.0, 0.0]) == [3, 2]
    assert sum(split_budget(7, [5, 1, 5], [1.0, 10.0, 1.0])) == 7


def test_newline_tokens_are_kept_on_top():
    side, heads, d = 2, 2, 4
    tokens = side * side + 1
    q, k = _peaked_keys(heads, tokens, d, 1)
    ctx = _context([[q]], [[k]], side)
    ctx.always_keep[3] = True  # pretend the last candidate is a newline token
    for name in ("tcc", "hiprune"):
        method = make_method(name)
        if name == "hiprune":
            ctx.vision.queries[0], ctx.vision.keys[0] = [q], [k]
        keep = method.select(ctx, 1).tolist()
        assert sorted(keep) == [0, 3]

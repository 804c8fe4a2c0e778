"""Projector-stage methods IDPruner, MMTok, ToDRE (stage 1) and CATP (stage 1): budgets, determinism and exactness on
the three tiny families through ``tokensieve.sieve``, plus hand-made cases with known answers."""

from __future__ import annotations

import pytest
import torch
from conftest import build, make_inputs

import tokensieve
from tokensieve.budget import split_budget
from tokensieve.methods._text import keyword_embeddings, text_span_mask
from tokensieve.methods.base import MethodError, list_methods, make_method
from tokensieve.methods.catp import CATP, stage_one_count
from tokensieve.methods.idpruner import IDPruner
from tokensieve.methods.mmtok import MMTok
from tokensieve.methods.todre import ToDRE, greedy_max_sum
from tokensieve.testing import image_context, random_image

# (method, hyperparameters, newline tokens kept on top of the budget on LLaVA-NeXT). The default of each method
# runs on every family; the variants run on LLaVA-NeXT (crops and newline tokens) to keep the file fast.
DEFAULTS = [
    ("idpruner", {}, True),
    ("mmtok", {"tokenizer": "processor"}, False),
    ("todre", {}, True),
    ("catp", {}, True),
]
VARIANTS = [
    ("idpruner", {"importance": "zoo", "zoo_m": 8}, True),
    ("idpruner", {"importance": "text"}, True),
    ("mmtok", {}, False),
    ("todre", {"variant": "maxsum", "metric": "euclidean"}, True),
    ("catp", {"paper_schedule": True, "keep": 0.5}, True),
]
CASES = [(f, *c) for f in ("llava", "llava_next", "qwen2_5_vl") for c in DEFAULTS] + [
    ("llava_next", *c) for c in VARIANTS
]
KEEP = 3


def _logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def _kwargs(family: str, kwargs: dict) -> dict:
    if kwargs.get("tokenizer") == "processor":
        return {**kwargs, "tokenizer": build(family)[1].tokenizer}
    return kwargs


def _kept(model, inputs, method, **kwargs):
    with tokensieve.sieve(model, method, **kwargs) as s:
        logits = _logits(model, inputs)
    return s.trace, logits


@pytest.mark.parametrize("family,name,kwargs,newlines_on_top", CASES)
def test_budget_and_determinism(family, name, kwargs, newlines_on_top):
    model, _ = build(family)  # SDPA attention
    inputs = make_inputs(family)
    kwargs = {"keep": KEEP, **_kwargs(family, kwargs)}
    first, logits = _kept(model, inputs, name, **kwargs)
    second, _ = _kept(model, inputs, name, **kwargs)
    assert torch.isfinite(logits[inputs["attention_mask"].bool()]).all()
    for b in range(2):
        info = first.images[(b, 0)]
        newlines = int((info["grid_rc"][:, 0] < 0).sum())
        k = CATP(**kwargs).budget(info["n_tokens"]) if name == "catp" else KEEP
        expected = min(k, info["n_tokens"] - newlines) + (newlines if newlines_on_top else 0)
        if k >= info["n_tokens"]:
            expected = info["n_tokens"]  # nothing to prune: the sieve keeps everything
        kept = first.kept(b, 0)
        assert kept.numel() == expected, (family, name, b)
        assert torch.equal(kept, second.kept(b, 0)), (family, name, b)
        if newlines and not newlines_on_top:  # MMTok drops newlines, as its official LLaVA-NeXT code
            assert not bool((info["grid_rc"][kept, 0] < 0).any())


def test_keep_all_is_exact(family):
    """keep=1.0 (CATP: a total target of 1.0 under the paper schedule) leaves the logits as without the sieve."""
    model, _ = build(family)
    inputs = make_inputs(family)
    valid = inputs["attention_mask"].bool()
    reference = _logits(model, inputs)
    methods = [IDPruner(keep=1.0), MMTok(keep=1.0), ToDRE(keep=1.0), CATP(keep=1.0, paper_schedule=True)]
    trace, logits = _kept(model, inputs, methods)
    assert torch.allclose(logits[valid], reference[valid], atol=1e-5), family
    assert all(trace.kept(0, 0, stage=i).numel() == trace.images[(0, 0)]["n_tokens"] for i in range(4))


def test_catp_in_context_prompt_budget_per_image():
    model, _ = build("llava")
    inputs = make_inputs("llava", images_per_prompt=2)
    trace, _ = _kept(model, inputs, "catp", keep=0.5, paper_schedule=True)
    for b in range(2):
        for i in range(2):
            assert trace.kept(b, i).numel() == 12  # floor(16 * (1 - 0.5 / 2))


def test_needs_follow_the_importance():
    assert IDPruner().needs == frozenset({"features"})
    assert IDPruner(importance="zoo").needs == frozenset({"features", "pre_features", "projector"})
    assert IDPruner(importance="text").needs == frozenset({"features", "text"})
    for bad in (dict(importance="attention"), dict(parallel_k=0)):
        with pytest.raises(MethodError):
            make_method("idpruner", **bad)
    with pytest.raises(MethodError):
        make_method("todre", variant="dpp")
    with pytest.raises(MethodError):
        make_method("catp", text="before")


# ----- hand-made cases ----------------------------------------------------------------------------------------
def _ctx(features, *, text_embeds=None, text_ids=None, groups=None, always_keep=None, pre=None, embed=None):
    n = features.shape[0]
    if text_embeds is not None and text_ids is None:
        text_ids = torch.arange(text_embeds.shape[0])
    return image_context(
        features,
        grid_rc=torch.zeros(n, 2, dtype=torch.long),
        groups=groups,
        always_keep=always_keep,
        pre_features=pre,
        text_ids=text_ids,
        text_embeds=text_embeds,
        embed_tokens=embed,
    )


def test_idpruner_lam_one_is_topk_importance():
    x = torch.randn(20, 8, generator=torch.Generator().manual_seed(0))
    ctx = _ctx(x)
    picked = IDPruner(lam=1.0).select(ctx, 5)
    expected = torch.topk(x.norm(dim=1), 5).indices
    assert torch.equal(torch.sort(picked).values, torch.sort(expected).values)


def test_idpruner_does_not_keep_duplicates():
    x = torch.eye(6) * torch.tensor([10.0, 10.0, 9.0, 8.0, 7.0, 6.0])[:, None]
    x[1] = x[0]  # token 1 duplicates token 0, the most important one
    picked = IDPruner(lam=0.5).select(_ctx(x), 3).tolist()
    assert 0 in picked and 1 not in picked
    assert sorted(picked) == [0, 2, 3]


def test_idpruner_zoo_importance_ranks_by_projector_sensitivity():
    # M(x) = x^2 elementwise has J = diag(2x): a token c * b is c times as sensitive as b, whatever the directions.
    scale = torch.tensor([1.0, 5.0, 2.0, 4.0, 3.0, 0.5])
    pre = scale[:, None] * torch.randn(1, 8, generator=torch.Generator().manual_seed(1))
    ctx = _ctx(torch.randn(6, 4, generator=torch.Generator().manual_seed(2)), pre=pre)
    ctx.project = lambda x: x * x
    method = IDPruner(lam=1.0, importance="zoo", zoo_m=16)
    assert sorted(method.select(ctx, 3).tolist()) == [1, 3, 4]
    assert torch.equal(method.scores(ctx, torch.arange(6)), method.scores(ctx, torch.arange(6)))


def test_mmtok_alpha_zero_covers_the_text_token_first():
    x = torch.randn(12, 16, generator=torch.Generator().manual_seed(2))
    text = x[7:8] * 3.0  # a text embedding pointing at token 7
    ctx = _ctx(x, text_embeds=text, pre=torch.randn(12, 5, generator=torch.Generator().manual_seed(4)))
    method = MMTok(alpha=0.0)
    assert int(method.cover(text, x, ctx.pre_features, 3)[0]) == 7
    assert 7 in MMTok(alpha=0.0).select(ctx, 1).tolist()


def test_mmtok_per_crop_split_and_newlines():
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(5))
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    newline = torch.tensor([False, False, False, True, False, False, False, True])
    ctx = _ctx(x, text_embeds=torch.randn(2, 6), groups=groups, always_keep=newline, pre=x)
    picked = MMTok().select(ctx, 4)
    assert picked.numel() == 4 and not bool(newline[picked].any())
    assert int((groups[picked] == 0).sum()) == 2
    with_lines = MMTok(keep_newlines=True).select(ctx, 4)
    assert with_lines.numel() == 6 and bool(newline[with_lines].sum() == 2)
    assert split_budget(6, [4, 1, 4]) == [3, 1, 2]
    assert split_budget(9, [2, 2]) == [2, 2]


def test_mmtok_keywords_drop_stopwords_template_and_special_tokens():
    _, proc = build("llava")
    tok = proc.tokenizer
    ids = torch.tensor(
        tok("<s> USER: what is the color of the square ? ASSISTANT:", add_special_tokens=False)["input_ids"]
    )
    table = torch.nn.Embedding(len(tok), 4)
    ctx = _ctx(torch.randn(3, 4), text_ids=ids, text_embeds=table(ids).detach(), embed=table)
    words = keyword_embeddings(ctx, tok)
    expected = table(torch.tensor(tok.convert_tokens_to_ids(["color", "of", "square"]))).detach()
    assert torch.equal(words.detach(), expected)  # "of" is not in the official stopword list
    assert keyword_embeddings(ctx, None).shape[0] == ids.numel()  # no tokenizer: the raw prompt tokens


def test_text_span_uses_text_segment_when_the_core_provides_it():
    ctx = _ctx(torch.randn(3, 4), text_embeds=torch.randn(6, 4))
    assert bool(text_span_mask(ctx, "paired").all())  # no segment information: the whole prompt
    ctx.image = 1
    ctx.text_segment = torch.tensor([-1, 0, 0, 1, 1, 2])  # type: ignore[attr-defined]
    assert text_span_mask(ctx, "paired").tolist() == [False, False, False, True, True, False]
    assert text_span_mask(ctx, "after").tolist() == [False, False, False, True, True, True]


def _two_clusters() -> torch.Tensor:
    g = torch.Generator().manual_seed(6)
    a = torch.tensor([1.0, 0.0, 0.0]) + 0.05 * torch.randn(5, 3, generator=g)
    b = torch.tensor([0.0, 1.0, 0.0]) + 0.05 * torch.randn(5, 3, generator=g)
    return torch.cat([a, b])


def test_catp_facility_location_picks_one_per_cluster_first():
    x = _two_clusters()
    ctx = _ctx(x, text_embeds=torch.zeros(0, 3))
    picked = CATP(lam1=0.0).select(ctx, 2)
    assert sorted((picked >= 5).tolist()) == [False, True]
    # A strong alignment term pulls the first pick to the cluster the text points at.
    aligned = _ctx(x, text_embeds=torch.tensor([[0.0, 1.0, 0.0], [0.0, 2.0, 0.0]]))
    assert bool((CATP(lam1=50.0).select(aligned, 1) >= 5).all())


def test_catp_paper_schedule_budget():
    assert stage_one_count(0.25, 576) == 360  # R = 0.75: stage 1 removes R/2
    assert stage_one_count(64, 576) == 320
    assert CATP(keep=0.25, paper_schedule=True).budget(576) == 360
    assert CATP(keep=0.25).budget(576) == 144


def test_todre_picks_far_apart_points():
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    offsets = torch.tensor([[0.0, 0.0], [0.1, 0.0], [0.0, 0.1]])
    x = (centres[:, None] + offsets[None]).reshape(9, 2)  # three tight clusters of three
    picked = ToDRE(metric="euclidean").select(_ctx(x), 3)
    assert sorted((picked // 3).tolist()) == [0, 1, 2]
    line = torch.tensor([[0.0], [1.0], [2.0], [7.0], [10.0]])
    assert greedy_max_sum(torch.cdist(line, line), 2).tolist() == [0, 4]  # the farthest pair first
    picked = ToDRE(variant="maxsum", metric="euclidean").select(_ctx(x), 3)
    assert sorted((picked // 3).tolist()) == [0, 1, 2]


def test_methods_are_registered():
    assert {"idpruner", "mmtok", "todre", "catp"} <= set(list_methods())
    for name in ("idpruner", "mmtok", "todre", "catp"):
        assert make_method(name).stage == "projector"


@pytest.mark.parametrize(("keep", "expected"), [(8, 12), (14, 16), (4, 8), (1, 5)])
def test_pool_fills_its_budget_on_unpadded_next_tiles(keep, expected):
    """A 40x60 image on the tiny LLaVA-NeXT has 16 tokens, 4 of them newlines, in tiles cut by unpadding:
    the pooled cells cover the present tokens, so ``keep`` cells plus the newlines are kept (all 16 when
    ``keep`` reaches the 12 pooled tokens)."""
    model, proc = build("llava_next")
    inputs = proc(images=[random_image(1, (40, 60))], text=["USER: <image> what ? ASSISTANT:"], return_tensors="pt")
    with tokensieve.sieve(model, "pool", keep=keep) as s, torch.no_grad():
        model(**inputs)
    assert s.trace.images[(0, 0)]["n_tokens"] == 16
    assert s.trace.kept(0, 0).numel() == expected


def test_pool_member_cells_are_exact_on_ragged_sets():
    from tokensieve.methods.pool import member_cells

    rc = torch.tensor([[r, c] for r in range(3) for c in range(5)][:-2])  # a rectangle missing two cells
    for k in range(1, rc.shape[0] + 1):
        cells = member_cells(rc, k)
        assert sorted(torch.unique(cells).tolist()) == list(range(k))

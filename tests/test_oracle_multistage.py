"""Oracles for the multi-stage in-LLM methods, transcribed from the official code (no tokensieve.methods logic):

- SparseVLM: ``Gumpest/SparseVLMs`` ``llava/model/language_model/modelling_sparse_llama.py`` (raters, the
  ``pruning_loc`` layer's own attention, recycling), ``score.py`` (``attn_postprocess_topk``), ``utils.py``
  (``cluster_and_merge``; its ``rand * 1e-6`` density noise is left out: random features have no ties);
- PyramidDrop: ``Cooperx521/PyramidDrop`` ``llava/model/modeling_llama_pdrop.py`` (``pdrop_rank_drop``);
- TransPrune: ``liaolea/TransPrune`` ``llava/model/modeling_llama_transprune.py`` (``transprune_rank_drop``,
  ``compute_transf_weight``).

Every stage of a hand-built context (random q/k, embeddings and hidden states, the layout of a pruned sequence)
is checked against the oracle on the same tensors; the first stage also end to end on the tiny models.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from _oracle import inputs_for, reference
from conftest import build

import tokensieve
from tokensieve.context import LayerCapture, LLMContext
from tokensieve.methods import _own_qk
from tokensieve.methods.base import SIGNALS, make_method

FAMILIES = ("llava", "llava_next", "qwen2_5_vl")
SIZES = {"llava": (56, 56), "llava_next": (56, 84), "qwen2_5_vl": (112, 140)}
OWN_QK = "own_qk" in SIGNALS
NEEDS_OWN_QK = pytest.mark.skipif(not OWN_QK, reason="the framework has no 'own_qk' signal yet (core helper)")


def eager_attention(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Causal softmax attention [H, L, L] of the official eager path (``repeat_kv``, float32 softmax)."""
    k = k.repeat_interleave(q.shape[0] // k.shape[0], dim=0)
    logits = q @ k.transpose(1, 2) / math.sqrt(q.shape[-1])
    causal = torch.ones(q.shape[1], q.shape[1], dtype=torch.bool).tril()
    return torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1, dtype=torch.float32)


# ----- SparseVLM --------------------------------------------------------------------------------------------------
def cluster_and_merge(x: torch.Tensor, cluster_num: int) -> torch.Tensor:
    """``utils.cluster_and_merge`` for one sample x [N, C] (no density noise)."""
    n, c = x.shape
    dist = torch.cdist(x[None].float(), x[None].float())[0] / (c**0.5)
    near = torch.topk(dist, k=cluster_num, dim=-1, largest=False).values
    density = (-(near**2).mean(dim=-1)).exp()
    mask = (density[None, :] > density[:, None]).float()
    dist_max = dist.max()
    parent_dist = (dist * mask + dist_max * (1 - mask)).min(dim=-1).values
    centres = torch.topk(parent_dist * density, k=cluster_num).indices
    assign = dist[centres].argmin(dim=0)
    assign[centres] = torch.arange(cluster_num)
    weight = torch.zeros(cluster_num).index_add_(0, assign, torch.ones(n)) + 1e-6
    return torch.zeros(cluster_num, c).index_add_(0, assign, x.float() / weight[assign][:, None])


def sparsevlm_stage(embeds, image0, attn, v_start, v_num, out_hidden, count):
    """One official stage. ``embeds`` [L0, D] the LM input, the image at ``image0 = (start, length)`` there;
    ``attn`` [H, L, L] layer loc's attention in the current layout, the image's candidates at
    ``v_start : v_start + v_num``; ``out_hidden`` [L, D] layer loc's output. Returns (kept offsets, merged)."""
    s0, n0 = image0
    m = torch.softmax(embeds[s0 : s0 + n0] @ embeds[s0 + n0 :].T, dim=1).mean(0)
    raters = torch.nonzero(m > m.mean()).flatten() + v_start + v_num
    relation = attn.mean(0)[raters][:, v_start : v_start + v_num].mean(0)
    kept = torch.topk(relation, min(count, v_num - 1)).indices
    policy = torch.zeros(v_num, dtype=torch.bool)
    policy[kept] = True
    deleted = torch.nonzero(~policy).flatten()
    pool_num = int(deleted.shape[0] * 0.3) + 1
    pool = deleted[relation[deleted].topk(pool_num).indices]
    merged = cluster_and_merge(out_hidden[v_start + pool], int(pool_num / 10) + 1)
    return sorted(kept.tolist()), merged


def _stage_context(n_tokens: int, cand: torch.Tensor, layer: int, seed: int, heads: int = 4, d: int = 8):
    """A sample laid out as [2 text, image candidates, 6 text] after earlier pruning, with the full layout at
    layer 0 (the embeddings). Returns the context and the raw tensors the oracle reads."""
    gen = torch.Generator().manual_seed(seed)
    full = 2 + n_tokens + 6
    embeds = torch.randn(full, 16, generator=gen)
    image_cols = 2 + cand
    cols = torch.cat([torch.arange(2), image_cols, torch.arange(2 + n_tokens, full)])
    length = cols.numel()
    q, k = torch.randn(heads, length, d, generator=gen), torch.randn(2, length, d, generator=gen)
    hidden = torch.randn(length, 16, generator=gen)
    valid = torch.ones(length, dtype=torch.bool)
    text_cols = cols[torch.isin(cols, image_cols, invert=True)]
    ctx = LLMContext(
        sample=0, image=0, layer=layer, n_layers=8, n_tokens=n_tokens, token_index=cand,
        hidden=hidden[2 : 2 + len(cand)],
        text_hidden=hidden[torch.isin(cols, image_cols, invert=True)], image_cols=image_cols, text_cols=text_cols,
        text_after_image=text_cols >= 2 + n_tokens, last_col=full - 1,
        layers={0: LayerCapture(cols=torch.arange(full), valid=torch.ones(full, dtype=torch.bool), hidden=embeds),
                layer - 1: LayerCapture(cols=cols, valid=valid, queries=q, keys=k, hidden=hidden)},
    )  # fmt: skip
    return ctx, embeds, eager_attention(q, k), hidden


@pytest.mark.parametrize(
    ("stage", "n_cand", "count"),
    [(0, 40, 13), (1, 18, 8), (2, 11, 4)],  # three stages, each on the survivors of a pruned layout
)
def test_sparsevlm_stages_match_the_official_code(stage, n_cand, count):
    n_tokens = 40
    gen = torch.Generator().manual_seed(stage)
    cand = torch.sort(torch.randperm(n_tokens, generator=gen)[:n_cand]).values
    ctx, embeds, attn, hidden = _stage_context(n_tokens, cand, layer=3 + stage, seed=10 + stage)
    kept, merged = sparsevlm_stage(embeds, (2, n_tokens), attn, 2, n_cand, hidden, count)
    got = make_method("sparsevlm").select(ctx, count)
    by_relation = [i for i in got.keep.tolist() if i not in got.replace_at.tolist()]
    assert sorted(by_relation) == kept
    assert got.replace_with.shape == merged.shape
    assert torch.allclose(got.replace_with.float(), merged, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kwargs", [{"keep": 0.3334}, {"keep": 0.1112}, {"schedule": (0.5, 0.25, 0.125)}])
def test_sparsevlm_first_stage_end_to_end(family, kwargs):
    inputs = inputs_for(family, size=SIZES[family])
    ref = reference(family, inputs)
    n, start = ref.image.numel(), int(ref.image[0])
    if "schedule" in kwargs:
        count = int(0.5 * n)
    else:
        count = {0.3334: 300, 0.1112: 66}[kwargs["keep"]] * n // 576
    count = max(1, count)
    # stage 1 prunes the output of pruning_loc 0 (layer 2 of 32 scaled to 4 layers) with layer 0's attention
    kept, merged = sparsevlm_stage(ref.hidden[0], (start, n), ref.attentions[0], start, n, ref.hidden[1], count)
    model, _ = build(family, "eager")
    with tokensieve.sieve(model, "sparsevlm", **kwargs) as s, torch.no_grad():
        model(**inputs)
    got = set(s.trace.kept(0, 0, stage=0).tolist())
    assert set(kept) <= got and len(got) == len(kept) + merged.shape[0]


# ----- PyramidDrop and TransPrune: the stage layer's own q/k ------------------------------------------------------
def _own_context(layer: int, seed: int):
    """A context whose layer ``layer`` (own q/k) and ``layer - 1`` hold different random q/k."""
    ctx, _, _, _ = _stage_context(24, torch.arange(24), layer=layer, seed=seed)
    gen = torch.Generator().manual_seed(seed + 100)
    prev = ctx.layers[layer - 1]
    own = LayerCapture(cols=prev.cols, valid=prev.valid, queries=torch.randn(prev.queries.shape, generator=gen),
                       keys=torch.randn(prev.keys.shape, generator=gen), hidden=prev.hidden)  # fmt: skip
    ctx.layers[layer] = own
    return ctx


def pdrop_oracle(attn: torch.Tensor, image: slice, keep_length: int) -> list[int]:
    """``pdrop_rank_drop``: the last prompt token's head-mean attention over the image, ``topk(keep_length)``."""
    return sorted(attn.mean(0)[-1, image].topk(keep_length).indices.tolist())


def iga_ttv_oracle(attn, image: slice, ttv_layers: list[torch.Tensor], keep_length: int) -> list[int]:
    """``transprune_rank_drop``: IGA of the rows after the image, TTV summed over layers, both normalised."""
    iga = attn.mean(0)[image.stop :][:, image].mean(0)
    ttv = torch.zeros(image.stop - image.start)
    for weight in ttv_layers:
        ttv = ttv + weight[image]
    score = ttv / (ttv.sum() + 1e-8) + iga / (iga.sum() + 1e-8)
    return sorted(score.topk(keep_length).indices.tolist())


@pytest.mark.parametrize("own", [True, False])
@pytest.mark.parametrize("keep_length", [3, 12])
def test_pdrop_scores_with_the_stage_layers_own_qk(monkeypatch, own, keep_length):
    monkeypatch.setattr(_own_qk, "OWN_QK_SUPPORTED", own)
    ctx = _own_context(layer=4, seed=1)
    source = ctx.layers[4 if own else 3]  # the fallback reads layer l - 1
    expected = pdrop_oracle(eager_attention(source.queries, source.keys), slice(2, 26), keep_length)
    assert sorted(make_method("pdrop").select(ctx, keep_length).tolist()) == expected


def compute_transf_weight(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """The official TTV of one module over the sequence [L]."""
    ratio = after.norm(dim=-1) / before.norm(dim=-1)
    necc = torch.exp(1 - F.cosine_similarity(before, after, dim=-1))
    return ratio * necc / necc.sum()


@pytest.mark.parametrize("own", [True, False])
@pytest.mark.parametrize("keep_length", [4, 15])
def test_transprune_scores_with_the_stage_layers_own_qk(monkeypatch, own, keep_length):
    monkeypatch.setattr(_own_qk, "OWN_QK_SUPPORTED", own)
    ctx = _own_context(layer=4, seed=2)
    gen = torch.Generator().manual_seed(7)
    method = make_method("transprune", accumulate_from=2)
    ttv = []
    for j in (2, 3):
        base = ctx.layers.get(j)
        cols, valid = ctx.layers[3].cols, ctx.layers[3].valid
        io = [torch.randn(cols.numel(), 16, generator=gen) for _ in range(4)]
        cap = LayerCapture(cols=cols, valid=valid, attn_in=io[0], attn_out=io[1], mlp_in=io[2], mlp_out=io[3])
        if base is not None:
            cap.queries, cap.keys, cap.hidden = base.queries, base.keys, base.hidden
        ctx.layers[j] = cap
        ttv.append(compute_transf_weight(io[0], io[1]) + compute_transf_weight(io[2], io[3]))
    source = ctx.layers[4 if own else 3]
    expected = iga_ttv_oracle(eager_attention(source.queries, source.keys), slice(2, 26), ttv, keep_length)
    assert sorted(method.select(ctx, keep_length).tolist()) == expected


@NEEDS_OWN_QK
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("keep", [8, 0.5])
def test_pdrop_first_stage_end_to_end(family, keep):
    inputs = inputs_for(family, size=SIZES[family])
    ref = reference(family, inputs)
    n, start = ref.image.numel(), int(ref.image[0])
    keep_length = keep if isinstance(keep, int) else int(n * keep)
    expected = pdrop_oracle(ref.attentions[1], slice(start, start + n), keep_length)  # layer 8 of 32 -> 1 of 4
    model, _ = build(family, "eager")
    with tokensieve.sieve(model, "pdrop", keep=keep) as s, torch.no_grad():
        model(**inputs)
    assert s.trace.kept(0, 0, stage=0).tolist() == expected


def _module_io(model, layer: int, inputs) -> torch.Tensor:
    """The official TTV of decoder ``layer`` from hooks on its attention and MLP blocks (normed input, output)."""
    blocks = model.model.language_model.layers[layer]
    seen = {}

    def keep(name):
        def hook(module, args, kwargs, output):
            x = kwargs.get("hidden_states", args[0] if args else None)
            seen[name] = (x[0].float(), (output[0] if isinstance(output, tuple) else output)[0].float())

        return hook

    handles = [blocks.self_attn.register_forward_hook(keep("attn"), with_kwargs=True),
               blocks.mlp.register_forward_hook(keep("mlp"), with_kwargs=True)]  # fmt: skip
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for h in handles:
            h.remove()
    return compute_transf_weight(*seen["attn"]) + compute_transf_weight(*seen["mlp"])


@NEEDS_OWN_QK
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("keep", [0.125, 1])  # a ratio (the official 0.125) and a final count
def test_transprune_first_stage_end_to_end(family, keep):
    inputs = inputs_for(family, size=SIZES[family])
    ref = reference(family, inputs)
    model, _ = build(family, "eager")
    n, start = ref.image.numel(), int(ref.image[0])
    ratio = 0.875 * (keep / 0.125 if isinstance(keep, float) else keep / n / 0.125)
    keep_length = min(n, int(n * ratio))
    ttv = [_module_io(model, 0, inputs)]  # accumulation from layer 0 up to the stage layer 1 (of 4)
    expected = iga_ttv_oracle(ref.attentions[1], slice(start, start + n), ttv, keep_length)
    with tokensieve.sieve(model, "transprune", keep=keep) as s, torch.no_grad():
        model(**inputs)
    assert s.trace.kept(0, 0, stage=0).tolist() == expected


def test_pdrop_and_transprune_say_when_they_are_not_faithful_yet():
    for name in ("pdrop", "transprune"):
        cls = type(make_method(name))
        assert ("own_qk" in cls.needs) == OWN_QK
        assert (cls.fidelity == "faithful") == OWN_QK
        if not OWN_QK:
            assert cls.fidelity.startswith("NOT faithful yet")

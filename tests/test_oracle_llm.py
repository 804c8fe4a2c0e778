"""Oracles for the in-LLM methods, transcribed from the official code (they never import tokensieve.methods):

- FastV: ``pkunlp-icler/FastV`` ``src/FastV/lmms-eval/fastv_kvcache.py``;
- DART: ``Chenfei-Liao/VTC-Bench`` ``external/DART/llava/model/language_model/modeling_llama_self.py``;
- EntropyPrune: ``YahongWang1/EntropyPrune`` ``modeling_llama_self.py::maten_prune`` (query variant).

Each runs on the tensors of an unpruned forward of a tiny model of every family (batch 1, no padding, as the
official code) and must keep the very tokens ``tokensieve.sieve`` keeps, at a count and a ratio budget.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from _oracle import inputs_for, reference
from conftest import build, prompt

import tokensieve
from tokensieve.testing import random_image

FAMILIES = ("llava", "llava_next", "qwen2_5_vl")
SIZES = {"llava": (56, 56), "llava_next": (56, 84), "qwen2_5_vl": (112, 140)}


def _sieved(family: str, inputs, method: str, **kwargs) -> torch.Tensor:
    model, _ = build(family, "eager")
    with tokensieve.sieve(model, method, **kwargs) as s, torch.no_grad():
        model(**inputs)
    return s.trace.kept(0, 0)


# ----- FastV ------------------------------------------------------------------------------------------------------
def fastv_oracle(attn_prev: torch.Tensor, image: torch.Tensor, keep: int) -> list[int]:
    """Last token's head-mean attention at layer K-1 over the image, ``topk(int(n * ratio))``, sorted."""
    score = attn_prev.mean(0)[-1, image]
    return sorted(score.topk(keep).indices.tolist())


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("keep", [5, 0.5])
def test_fastv_matches_the_official_code(family, keep):
    inputs = inputs_for(family, size=SIZES[family])
    ref = reference(family, inputs)
    n = ref.image.numel()
    count = keep if isinstance(keep, int) else int(n * keep)
    assert _sieved(family, inputs, "fastv", keep=keep, layer=2).tolist() == fastv_oracle(
        ref.attentions[1], ref.image, count
    )


# ----- DART -------------------------------------------------------------------------------------------------------
def dart_oracle(keys: torch.Tensor, states: torch.Tensor, start: int, length: int, max_num: int,
                pivot_image: int = 4, pivot_text: int = 4) -> list[int]:  # fmt: skip
    """``get_retained_image_token``: keys [H, L, d] of layer K-1 after RoPE, ``states`` [L, D] the normed
    output of layer K-1, the image at ``start:start+length``; returns kept image offsets, sorted."""
    token_topk = math.ceil(max_num // (pivot_image + pivot_text))
    flat = keys.permute(1, 0, 2).reshape(keys.shape[1], -1)
    image_l1 = torch.norm(flat[start : start + length], p=1, dim=-1)
    query_l1 = torch.norm(flat[start + length :], p=1, dim=-1)
    image_indices = (image_l1.topk(pivot_image).indices + start).tolist()
    query_indices = (query_l1.topk(pivot_text).indices + start + length).tolist()
    indices_set = set(image_indices + query_indices)
    valid_indices = set(range(start, start + length)) - set(image_indices)
    valid_indices_list = list(valid_indices)
    for item in list(indices_set):
        valid_vectors = states[valid_indices_list, :]
        cos_sim = -F.cosine_similarity(states[item, :], valid_vectors, dim=-1)
        top_k_indices = cos_sim.topk(token_topk).indices
        top_k_real_indices = [valid_indices_list[i] for i in top_k_indices]
        indices_set.update(top_k_real_indices)
        valid_indices.difference_update(top_k_real_indices)
        valid_indices_list = list(valid_indices)
    indices_set.difference_update(query_indices)
    return sorted(i - start for i in indices_set)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("keep", [8, 0.75])
def test_dart_matches_the_official_code(family, keep):
    inputs = inputs_for(family, size=SIZES[family])
    ref = reference(family, inputs)
    n, start = ref.image.numel(), int(ref.image[0])
    count = keep if isinstance(keep, int) else int(keep * n)
    states = ref.text_model.norm(ref.hidden[2])  # output of layer K-1 = 1, through the final norm
    expected = dart_oracle(ref.keys[1], states, start, n, count)
    assert _sieved(family, inputs, "dart", keep=keep, layer=2).tolist() == expected


def test_dart_pivots_competing_for_one_token_follow_the_official_set_order():
    """Every pivot's least similar token is the same one, so the pivot visited first claims it and the others
    take their second choice: the visiting order of ``list(set(...))`` decides the kept set."""
    from tokensieve.context import LayerCapture, LLMContext
    from tokensieve.methods.dart import DART

    torch.manual_seed(0)
    start, n, text = 3, 12, 6
    length = start + n + text
    keys = torch.randn(2, length, 4)
    keys[:, start : start + n] *= torch.linspace(0.5, 2.0, n)[None, :, None]  # distinct L1 norms
    states = torch.randn(length, 8) + 3.0  # all pointing the same way ...
    states[start + 7] = -states[start + 7]  # ... but one image token, the least similar to every pivot
    expected = dart_oracle(keys, states, start, n, max_num=8, pivot_image=2, pivot_text=2)
    cols = torch.arange(length)
    cap = LayerCapture(cols=cols, valid=torch.ones(length, dtype=torch.bool), keys=keys)
    text_cols = torch.tensor([*range(start), *range(start + n, length)])
    ctx = LLMContext(
        sample=0, image=0, layer=2, n_layers=4, n_tokens=n, token_index=torch.arange(n),
        hidden=states[start : start + n], text_hidden=states[text_cols], image_cols=torch.arange(start, start + n),
        text_cols=text_cols, text_after_image=text_cols >= start + n, last_col=length - 1, layers={1: cap},
    )  # fmt: skip
    got = DART(pivot_image_tokens=2, pivot_text_tokens=2).select(ctx, 8)
    assert sorted(got.tolist()) == expected and 7 in expected


def _padded_batch(family: str, explicit_positions: bool):
    """The same image alone and second in a left-padded batch of two. Positions are passed per sample (as
    ``generate()`` does): in a plain forward without them HF starts a padded row's RoPE positions at the padding,
    which leaves attention unchanged but not DART's key L1 norm (a framework matter, see the report)."""
    model, proc = build(family, "eager")
    proc.tokenizer.padding_side = "left"
    image, other = random_image(3, SIZES[family]), random_image(5, SIZES[family])
    texts = [prompt(family, "what is the color ?"), prompt(family, "describe this image and how many circles ?")]
    alone = proc(images=[image], text=texts[:1], return_tensors="pt")
    batch = proc(images=[other, image], text=texts[::-1], return_tensors="pt", padding=True)
    runs = []
    for inputs, b in ((alone, 0), (batch, 1)):
        extra = {}
        if explicit_positions and family != "qwen2_5_vl":
            extra["position_ids"] = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        with tokensieve.sieve(model, "dart", keep=8, layer=2) as s, torch.no_grad():
            model(**inputs, **extra)
        runs.append(s.trace.kept(b, 0).tolist())
    return runs


@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_dart_alone_and_in_a_padded_batch_agree_with_per_sample_positions(family):
    alone, batched = _padded_batch(family, explicit_positions=True)
    assert alone == batched


# ----- EntropyPrune -----------------------------------------------------------------------------------------------
def entropyprune_oracle(queries: torch.Tensor, heads: int, save_num: int) -> list[int]:
    """``maten_prune`` on image queries [n, H * d]: centre across heads, dual Gram ``R R^T / H``, entropy of
    its eigenvalues (float64, clamped to 1e-10) over ``log H``, keep the highest."""
    r = queries.double().reshape(queries.shape[0], heads, -1)
    r = r - r.mean(dim=1, keepdim=True)
    gram = r @ r.transpose(1, 2) / heads
    lam = torch.linalg.eigvalsh(gram).clamp(min=1e-10)
    entropy = -(lam * lam.log()).sum(-1) / math.log(heads)
    return sorted(entropy.topk(save_num).indices.tolist())


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("keep", [6, 0.5])
def test_entropyprune_matches_the_official_code(family, keep):
    inputs = inputs_for(family, size=SIZES[family])
    ref = reference(family, inputs)
    layer = ref.text_model.layers[1]  # K - 1 = 1
    with torch.no_grad():
        q = layer.self_attn.q_proj(layer.input_layernorm(ref.hidden[1]))[ref.image]
    heads = ref.model.config.text_config.num_attention_heads
    n = ref.image.numel()
    count = keep if isinstance(keep, int) else int(keep * n)
    got = _sieved(family, inputs, "entropyprune", keep=keep, layer=2).tolist()
    assert got == entropyprune_oracle(q, heads, count)

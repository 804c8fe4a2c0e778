"""One matrix over every registered method x family x budget (a count and a ratio).

A new method is picked up from ``list_methods()``; its test hyperparameters come from :data:`KWARGS`, the families
it cannot serve from :data:`UNSUPPORTED`, documented extras on top of the budget from :data:`KEEPS_NEWLINES`,
keep-all settings from :data:`KEEP_ALL_KWARGS`. Known method bugs are strict xfails in :data:`KNOWN_BUGS`, each
naming the method and the bug (the method files own the fix): a fix shows up as an XPASS(strict) failure.

Checks per cell: the final count equals the budget (or the documented extras); same seed, same tokens; an image
alone and inside a left-padded batch of 4 with mixed image counts keeps the same tokens; sdpa and eager give the
same picks. Per method and family: keep-all is exact; hooks are gone after an exception inside a forward.
"""

from __future__ import annotations

import pytest
import torch
from conftest import build, prompt

import tokensieve
from tokensieve.methods.base import make_method
from tokensieve.testing import random_image

FAMILIES = ("llava", "llava_next", "qwen2_5_vl")
BUDGETS = {"count": 3, "ratio": 0.5}
# Test hyperparameters: smaller Monte-Carlo banks (speed); DART's exact-budget variant (its default keeps
# ``image pivots + P * (k // P)`` tokens, the official TOKEN_TOPK rule, checked by its known-answer tests).
KWARGS: dict[str, dict] = {"zoo": {"m": 8}, "idpruner": {"zoo_m": 8}, "dart": {"exact_budget": True}}
# keep=1.0 is keep-all only with these (PDrop: keep is the first stage's count, later stages keep lam**s of it).
KEEP_ALL_KWARGS: dict[str, dict] = {"pdrop": {"lam": 1.0}}
# Methods that keep LLaVA-NeXT's image_newline tokens (ctx.always_keep) on top of the budget (documented extras).
KEEPS_NEWLINES = {"catp", "flowcut", "hiprune", "idpruner", "pool", "tcc", "todre", "visionzip", "zoo"}
UNSUPPORTED: dict[str, set[str]] = {}  # method -> families it refuses at construction (checked to refuse clearly)
# (method, family, budget or "keep_all") -> (check, reason): strict xfails, so a fix shows up as XPASS(strict).
KNOWN_BUGS: dict[tuple[str, str, str], tuple[str, str]] = {}


def _expected_final(method, n: int, always_keep: int) -> int:
    """The documented final count: the budget of the method's last stage; LLaVA-NeXT newline tokens
    (``always_keep``) stay on top of it for the methods that keep them."""
    layers = method.llm_layers(4) if method.stage == "llm" else [0]
    if hasattr(method, "kept_count"):  # SparseVLM: recycled clusters on top of each stage's count
        count = n
        for stage in range(len(layers)):
            k = method.budget(n, stage_index=stage, n_layers=4)
            count = method.kept_count(count, k) if k < count else count
        return count
    count = method.budget(n, stage_index=len(layers) - 1, n_layers=4)
    if method.name in KEEPS_NEWLINES:
        count += always_keep
    return min(n, count)


def _methods() -> list[str]:
    return [name for name in tokensieve.list_methods() if not name.startswith("_")]


def _make(name: str, keep, **extra):
    return make_method(name, keep=keep, **{**KWARGS.get(name, {}), **extra})


TEXT = "what is the color of the square ?"
# The target image (seed 7) sits alone in a sample with TEXT: in the batch of 4 it is sample 2, after samples with
# two images and with one image and a longer prompt; the last sample has two images again.
BATCH = [
    ((1, 2), "how many ?"),
    ((3,), "describe this image and what is the color of the circle ?"),
    ((7,), TEXT),
    ((4, 5), "is the square red ?"),
]
SIZES = {1: (56, 84), 2: (56, 56), 3: (84, 56), 4: (56, 56), 5: (84, 56), 7: (56, 84)}
TARGET = 2


def _inputs(family: str, samples, attn: str = "sdpa"):
    model, proc = build(family, attn)
    proc.tokenizer.padding_side = "left"
    images = [random_image(i, SIZES[i] if family != "llava" else (56, 56)) for ids, _ in samples for i in ids]
    texts = [prompt(family, text, len(ids)) for ids, text in samples]
    return model, proc(images=images, text=texts, return_tensors="pt", padding=True)


def _run(family: str, method, samples, attn: str = "sdpa"):
    model, inputs = _inputs(family, samples, attn)
    with tokensieve.sieve(model, method) as s, torch.no_grad():
        model(**inputs)
    return s.trace


def _assert_checks(request, key: tuple[str, str, str], checks: dict[str, bool], detail) -> None:
    """Every check passes, except a known bug's check, which must fail (strict xfail)."""
    known = KNOWN_BUGS.get(key)
    failed = sorted(c for c, ok in checks.items() if not ok)
    other = [c for c in failed if known is None or c != known[0]]
    assert not other, (*key, other, detail)
    if known is not None:
        request.applymarker(pytest.mark.xfail(strict=True, reason=f"{key[0]}: {known[1]}"))
        assert known[0] not in failed, (*key, known[0], detail)


def _refuses(name: str, family: str) -> bool:
    if family not in UNSUPPORTED.get(name, set()):
        return False
    model, _ = build(family)
    with pytest.raises((tokensieve.UnsupportedModelError, tokensieve.MethodError)):
        tokensieve.sieve(model, _make(name, 0.5))
    return True


@pytest.mark.parametrize("budget", sorted(BUDGETS))
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", _methods())
def test_matrix_cell(request, name, family, budget):
    if _refuses(name, family):
        return
    keep = BUDGETS[budget]
    method = _make(name, keep)
    alone = _run(family, method, [BATCH[TARGET]])
    again = _run(family, _make(name, keep), [BATCH[TARGET]])
    n = alone.images[(0, 0)]["n_tokens"]
    always = int((alone.images[(0, 0)]["grid_rc"][:, 0] < 0).sum())
    kept = alone.kept(0, 0)
    checks = {
        "count": kept.numel() == _expected_final(method, n, always),
        "seed": torch.equal(again.kept(0, 0), kept),
    }
    batch = _run(family, _make(name, keep), BATCH)
    checks["batch"] = torch.equal(batch.kept(TARGET, 0), kept)
    checks["eager"] = torch.equal(_run(family, _make(name, keep), [BATCH[TARGET]], "eager").kept(0, 0), kept)
    _assert_checks(request, (name, family, budget), checks, (kept.numel(), n))


def _hook_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


class _Injected(RuntimeError):
    pass


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", _methods())
def test_keep_all_exact_and_clean_after_exception(request, name, family):
    if _refuses(name, family):
        return
    model, inputs = _inputs(family, BATCH)
    valid = inputs["attention_mask"].bool()
    with torch.no_grad():
        reference = model(**inputs).logits
    before = _hook_count(model)
    with tokensieve.sieve(model, _make(name, 1.0, **KEEP_ALL_KWARGS.get(name, {}))), torch.no_grad():
        keep_all = model(**inputs).logits
    _assert_checks(
        request, (name, family, "keep_all"), {"keep_all": torch.equal(keep_all[valid], reference[valid])}, ""
    )
    last = model.model.language_model.layers[-1]
    handle = last.register_forward_pre_hook(lambda *a: (_ for _ in ()).throw(_Injected()))
    try:
        with pytest.raises(_Injected), tokensieve.sieve(model, _make(name, 0.5)), torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
    assert _hook_count(model) == before
    assert not {"get_image_features", "generate", "_tokensieve_active"} & (
        set(model.__dict__) | set(model.model.__dict__)
    )
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, reference)

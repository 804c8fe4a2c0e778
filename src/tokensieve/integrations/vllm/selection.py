"""What the vLLM plugin decides, without vLLM: placeholder counts, kept rows, and Qwen's M-RoPE ids.

vLLM fixes each image's placeholder count in the processor, before the vision tower runs, so only pre-LLM
methods whose decision needs the image alone fit: ``divprune``, ``pool``, ``random``, ``zoo``. Their budget
``keep(n)`` depends only on the image's token count ``n``, so the processor can emit ``keep(n)`` placeholders up
front; ``embed_multimodal`` later returns exactly those rows (``[keep(n), D]`` per image).

The image context handed to a method is the one the HF sieve builds for a single image of that family (grid,
groups, pre-projector features, the projector), so the kept indices equal ``Sieve.trace.kept`` for the image
as sample 0 of its batch (tested in ``tests/test_integrations_vllm.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from tokensieve.adapters.base import square_grid
from tokensieve.context import ImageContext, Selection
from tokensieve.core.images import content_key
from tokensieve.methods import Method, MethodError, make_method

VLLM_METHODS = ("divprune", "pool", "random", "zoo")


def make_vllm_method(method: str, keep=None, **hyperparameters) -> Method:
    """The method object, refused unless its decision needs only the image (before the LLM)."""
    if method not in VLLM_METHODS:
        raise MethodError(
            f"the vLLM plugin runs {', '.join(VLLM_METHODS)} (pre-LLM methods whose decision needs only the "
            f"image, so the processor can size the placeholders up front); {method!r} is not one of them"
        )
    m = make_method(method, **({"keep": keep} if keep is not None else {}), **hyperparameters)
    if m.stage != "projector":
        raise MethodError(f"{method} with these hyperparameters prunes inside the LLM ({m.stage}); vLLM cannot")
    return m


def placeholder_count(method: Method, n_tokens: int) -> int:
    """Placeholders the processor gives an image of ``n_tokens`` visual tokens: the method's budget."""
    return method.budget(int(n_tokens))


@dataclass
class ImageRows:
    """One image's decision: ``kept`` indices into its original tokens and the rows the LLM receives."""

    kept: torch.Tensor  # [k] sorted
    rows: torch.Tensor  # [k, D] features[kept], merged values where the method merges


def llava_context(
    features: torch.Tensor, pre_features=None, project=None, projector=None, pixels: torch.Tensor | None = None
) -> ImageContext:
    """LLaVA-1.5 image: tokens on a square grid, one crop (as the HF LLaVA adapter lays them out). ``pixels``
    [3, H, W]: the image's pixel values, hashed into the content key that seeds randomised methods (the HF sieve
    hashes the same tensor, so both paths draw the same tokens)."""
    n = features.shape[0]
    rc, hw = square_grid(n)
    return _context(features, rc.to(features.device), hw, torch.zeros(n, dtype=torch.long), pre_features, project,
                    projector, "llava", pixels)  # fmt: skip


def qwen_context(
    features: torch.Tensor, grid_thw: tuple[int, int, int], merge: int, pre_features=None, project=None,
    projector=None, pixels: torch.Tensor | None = None,
) -> ImageContext:
    """Qwen2/2.5-VL image: merge units on a ``(h / merge) x (w / merge)`` grid per frame, one group per frame.
    ``pixels`` [t*h*w, C]: the image's flattened patch rows (hashed into the content key, as the HF sieve does)."""
    t, h, w = (int(v) for v in grid_thw)
    gh, gw = h // merge, w // merge
    n = features.shape[0]
    if n != t * gh * gw:
        raise ValueError(f"{n} feature rows for grid_thw={grid_thw} (expected {t * gh * gw} at merge {merge})")
    idx = torch.arange(n, device=features.device) % (gh * gw)
    groups = torch.arange(n, device=features.device) // (gh * gw)
    return _context(features, torch.stack([idx // gw, idx % gw], 1), (gh, gw), groups, pre_features, project,
                    projector, "qwen2_vl", pixels)  # fmt: skip


def _context(features, grid_rc, grid_hw, groups, pre_features, project, projector, family, pixels) -> ImageContext:
    n = features.shape[0]
    return ImageContext(
        sample=0,
        image=0,
        n_tokens=n,
        token_index=torch.arange(n, device=features.device),
        features=features,
        grid_rc=grid_rc,
        grid_hw=grid_hw,
        groups=groups.to(features.device),
        always_keep=torch.zeros(n, dtype=torch.bool, device=features.device),
        pre_features=pre_features,
        project=project,
        projector_module=projector,
        family=family,
        content_key=None if pixels is None else content_key(pixels),
    )


def select_rows(method: Method, ctx: ImageContext) -> ImageRows:
    """Run ``method`` on one image and return its kept indices and rows (all rows when the budget covers n)."""
    k = placeholder_count(method, ctx.n_tokens)
    features = ctx.features
    if k >= ctx.n:
        return ImageRows(torch.arange(ctx.n, device=features.device), features)
    with torch.no_grad():
        result = method.select(ctx, k)
    rows = features
    if isinstance(result, Selection):
        if result.replace_at is not None:
            rows = features.clone()
            rows[result.replace_at] = result.replace_with.to(rows.dtype)
        result = result.keep
    kept = torch.unique(torch.as_tensor(result, device=features.device).flatten().long())
    if kept.numel() != k:
        raise RuntimeError(f"tokensieve: {method.name} kept {kept.numel()} tokens, but vLLM reserved {k} placeholders")
    return ImageRows(kept, rows[kept])


def project_fn(module: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """A projector call that returns a tensor (vLLM's parallel linears return ``(output, bias)`` tuples)."""

    def project(x: torch.Tensor) -> torch.Tensor:
        out = module(x)
        return out[0] if isinstance(out, tuple) else out

    return project


def qwen_kept_positions(grid_thw: tuple[int, int, int], merge: int, kept: torch.Tensor) -> torch.Tensor:
    """M-RoPE ids of an image's kept tokens, relative to the image start, plus vLLM's fourth channel.

    Returns ``[k, 4]``: ``(t, h, w)`` of each kept token on the image's LLM grid (t = 0 for images, as in HF's
    ``get_rope_index``) and, in every row, the offset at which the text after the image continues: the unpruned
    image's largest id + 1, so the text keeps the positions it has in the unpruned prompt (the HF sieve's
    ``original`` policy). vLLM's ``recompute_mrope_positions`` reads this layout (EVS writes ``llm_grid_w`` there,
    which equals ours for images no taller than wide).
    """
    t, h, w = (int(v) for v in grid_thw)
    gh, gw = h // merge, w // merge
    index = torch.arange(t * gh * gw)
    grid = torch.stack([torch.zeros_like(index), (index % (gh * gw)) // gw, index % gw], 1)
    offset = max(1, gh, gw)
    kept = kept.to(torch.long).cpu()
    return torch.cat([grid[kept], torch.full((kept.numel(), 1), offset, dtype=torch.long)], 1)

"""MMTok: multimodal coverage maximisation over text and vision tokens."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from ..budget import split_budget
from ..context import ImageContext
from ..ops import max_coverage
from ._text import keyword_embeddings
from .base import Method, MethodError, register


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    # The official code divides by max(norm, 1e-8).
    return F.normalize(x.float(), dim=-1, eps=1e-8)


def coverage_matrix(
    text: torch.Tensor, features: torch.Tensor, pre_features: torch.Tensor, alpha: float, tau_t: float, tau_v: float
) -> torch.Tensor:
    """MMTok's coverage matrix ``C = [P; alpha Q]``, shape [m + n, n].

    ``P = softmax(z_hat v_hat^T / tau_t, over vision) / m`` (text [m, D] against projected tokens [n, D], both
    L2-normalised, as in the official ``mm_coverage_selection``), ``Q = softmax(v'_hat v'_hat^T / tau_v) / n`` on the
    normalised projector inputs [n, d_in]. With no text (m = 0) ``C = alpha Q``.
    """
    v = _unit_rows(pre_features)
    q = torch.softmax(v @ v.T / tau_v, dim=1) / v.shape[0]
    if text.shape[0] == 0:
        return alpha * q
    z, x = _unit_rows(text.to(features.device)), _unit_rows(features)
    p = torch.softmax(z @ x.T / tau_t, dim=1) / z.shape[0]
    return torch.cat([p, alpha * q], dim=0)


QWEN_FAMILIES = ("qwen2_vl", "qwen2_5_vl")  # official Qwen path: its own defaults below


def padding_patch_indices(size: tuple[int, int], grid: int, patch: int = 14) -> list[int]:
    """Patch indices of a ``grid x grid`` LLaVA-1.5 input that lie wholly in the pad-to-square padding of an
    image of ``size = (width, height)`` (official ``calculate_padding_patch_indices``, ``include_overlap=False``):
    the image is scaled so its long side fills ``grid * patch`` pixels, the short side ``int(round(...))``, and
    the padding split ``//2`` before and the rest after; whole rows (or columns) of padding are listed."""
    width, height = size
    target = grid * patch
    if width == height:
        return []
    wide = width > height
    scaled = int(round((height if wide else width) * (target / (width if wide else height))))
    if scaled == target:
        return []
    before = (target - scaled) // 2
    lines = list(range(before // patch)) + list(range(grid - (target - scaled - before) // patch, grid))
    if wide:
        return [row * grid + col for row in lines for col in range(grid)]
    return [row * grid + col for col in lines for row in range(grid)]


@register
@dataclass
class MMTok(Method):
    """MMTok: Multimodal Coverage Maximization for Efficient Inference of VLMs (Dong et al., arXiv 2508.18264).

    Stage ``projector``. Signals: projected tokens ``v`` [n, D], projector inputs ``v'`` [n, d_in] (CLIP layer -2
    patches without CLS on LLaVA; on Qwen2.5-VL the 2x2 group of pre-merger patches, concatenated, [n, 4 d_v]),
    and text-token embeddings ``z`` [m, D] from the LM input embedding table. With
    ``P = softmax(z_hat v_hat^T / tau_t, dim=vision) / m`` and ``Q = softmax(v'_hat v'_hat^T / tau_v) / n`` (hats:
    L2-normalised rows; the official code normalises both text and vision), ``C = [P; alpha Q]`` [(m + n), n] is
    covered greedily (``ops.max_coverage``: gain ``sum_rows relu(C[:, j] - best)``), k picks. Kept tokens are
    sorted and re-indexed (``reindex``, as the official LLaVA code); Qwen keeps original M-RoPE positions.

    Text (official ``text_processor.py`` / ``mmtok_core.py``): the question's words minus a small stopword list,
    re-tokenised without BOS and embedded. Pass the processor's tokenizer (``tokenizer=proc.tokenizer``) for that;
    without it the prompt's raw text-token embeddings are used (BOS, template and stopword tokens included).
    Which text: the text after the image when the core provides ``ctx.text_segment``, else the whole prompt
    (documented fallback; role words ``USER``/``ASSISTANT`` are dropped by the keyword filter).

    Defaults follow the official code per family (``None`` fields): LLaVA (``mmtok/llava/llava_inject.py``):
    ``tau_t=0.02``, keywords with stopwords removed (``extract_keywords_simple``: regex words, stopword filter,
    then split on spaces), CLIP layer -2 patches as ``v'``. Qwen2-VL / Qwen2.5-VL (``mmtok/qwen/``):
    ``tau_t=0.01``, the text ``"Question: " + question`` split on spaces (punctuation kept, no stopword
    removal), and ``v'`` = the **mean** of each token's 4 pre-merger patches [n, d_v]
    (``img_features.reshape(n, 4, -1).mean(1)``). ``alpha=0.5``, ``tau_v=0.2`` everywhere. Budget ``keep``
    per image, ``int(ratio * n)`` (floor) for ratios, as the official ``int(retain_ratio * n)``.

    ``exclude_padding=True`` (official LLaVA-1.5 ``remove_padding_indices``, its default there with LLaVA's
    pad-to-square preprocessing): the patches lying wholly in the square padding (:func:`padding_patch_indices`)
    are never picked. It needs the original image size as ``ctx.image_size`` ``(width, height)``, which the
    framework must provide; HF's LLaVA processors resize without padding by default, so it is off.

    LLaVA-NeXT (official LLaVA code, VisionZip-style): selection runs per crop (base image and each tile) with an
    equal share of the budget, and the ``image_newline`` tokens are not fed at all; so ``per_crop=True`` and
    ``keep_newlines=False`` here. ``keep_newlines=True`` keeps them on top of the budget instead.

    Differences from the official code: the greedy is the incremental exact greedy of ``ops.max_coverage`` (same picks;
    ties to the lower index); per-crop budgets are ``k // n_crops`` with the remainder to the first crops (the
    official code gives every crop the same fixed count); HF tiles are unpadded, so tile sizes differ from the
    official 576; chat-template role words are dropped from the text (the official code sees the question alone).
    """

    alpha: float = 0.5
    tau_t: float | None = None  # None: 0.02 (LLaVA) / 0.01 (Qwen), as the official code
    tau_v: float = 0.2
    per_crop: bool = True
    keep_newlines: bool = False
    remove_stopwords: bool | None = None  # None: True (LLaVA) / False (Qwen, "Question: " + text split on spaces)
    mean_patches: bool | None = None  # None: Qwen's pre-merger patches averaged (official); False: concatenated
    exclude_padding: bool = False
    tokenizer: Any = field(default=None, repr=False, compare=False)

    name = "mmtok"
    stage = "projector"
    needs = frozenset({"features", "pre_features", "text"})
    paper = "MMTok: Multimodal Coverage Maximization for Efficient Inference of VLMs"
    arxiv = "2508.18264"
    fidelity = (
        "faithful with a tokenizer (official LLaVA / Qwen settings); without one, raw prompt-token embeddings stand "
        "in for the keywords; the official LLaVA-1.5 pad-to-square exclusion is exclude_padding=True"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if (self.tau_t is not None and self.tau_t <= 0) or self.tau_v <= 0:
            raise MethodError(f"mmtok: temperatures must be positive, got tau_t={self.tau_t}, tau_v={self.tau_v}")
        if self.alpha < 0:
            raise MethodError(f"mmtok: alpha must be >= 0, got {self.alpha}")

    def cover(
        self, text: torch.Tensor, features: torch.Tensor, pre_features: torch.Tensor, k: int, tau_t: float = 0.02,
        exclude: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Greedy max-coverage picks (indices into ``features``) in selection order; ``exclude`` [n] bool
        columns are never picked (they still count as coverage rows, as the official ``score_mask``)."""
        matrix = coverage_matrix(text, features, pre_features, self.alpha, tau_t, self.tau_v)
        if exclude is not None and bool(exclude.any()):
            allowed = torch.nonzero(~exclude).flatten()
            return allowed[max_coverage(matrix[:, allowed], min(k, allowed.numel()))]
        return max_coverage(matrix, k)

    def family_settings(self, ctx: ImageContext) -> tuple[float, bool, bool, str]:
        """(tau_t, remove_stopwords, mean_patches, text prefix) for this image's family."""
        qwen = ctx.family in QWEN_FAMILIES
        tau_t = self.tau_t if self.tau_t is not None else (0.01 if qwen else 0.02)
        stop = self.remove_stopwords if self.remove_stopwords is not None else not qwen
        mean = self.mean_patches if self.mean_patches is not None else qwen
        return tau_t, stop, mean, ("" if stop else "Question: ") if qwen else ""

    def padding_mask(self, ctx: ImageContext) -> torch.Tensor | None:
        if not self.exclude_padding:
            return None
        size = getattr(ctx, "image_size", None)
        if size is None or ctx.always_keep.any():
            raise MethodError(
                "mmtok: exclude_padding=True needs a single-crop LLaVA-1.5 image and its original size as "
                "ctx.image_size (width, height), which this framework did not provide; leave exclude_padding=False."
            )
        h, w = ctx.grid_hw
        flat = ctx.grid_rc[:, 0] * w + ctx.grid_rc[:, 1]
        pad = torch.tensor(padding_patch_indices(tuple(size), h), dtype=torch.long, device=flat.device)
        return torch.isin(flat, pad)

    def select(self, ctx: ImageContext, k: int) -> torch.Tensor:
        tau_t, stop, mean, prefix = self.family_settings(ctx)
        text = keyword_embeddings(ctx, self.tokenizer, "after", stop, prefix)
        pre = ctx.pre_features if ctx.pre_features is not None else ctx.features
        if mean and ctx.pre_features is not None:
            pre = pre.reshape(pre.shape[0], 4, -1).mean(1)
        padding = self.padding_mask(ctx)
        newline = ctx.always_keep
        cand = torch.nonzero(~newline).flatten()
        lines = torch.nonzero(newline).flatten()
        budget = min(k, cand.numel())
        groups = ctx.groups[cand]
        ids = torch.unique(groups).tolist() if self.per_crop else [None]
        members = [cand if g is None else cand[groups == g] for g in ids]
        shares = split_budget(budget, [int(m.numel()) for m in members])
        picks = [
            m[self.cover(text, ctx.features[m], pre[m], s, tau_t, None if padding is None else padding[m])]
            for m, s in zip(members, shares, strict=True)
            if s
        ]
        chosen = torch.cat(picks) if picks else cand[:0]
        if self.keep_newlines:
            return torch.cat([lines, chosen])
        # Only when the budget exceeds the non-newline tokens: fill it with newlines rather than fall short.
        return torch.cat([chosen, lines[: max(0, k - chosen.numel())]])

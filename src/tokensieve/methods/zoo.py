"""ZOO-Prune: projector sensitivity from zeroth-order gradient estimates, then sensitivity-aware diverse selection."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..budget import resolve_keep, split_budget
from ..context import ImageContext, seeded_generator
from ..ops import greedy_max_min, greedy_sum_fusion, minmax_normalise
from ..ops.zoo_sensitivity import (
    exact_mlp_sensitivity,
    finite_difference_sensitivity,
    jvp_sensitivity,
    module_caller,
    projector_copy,
    unit_directions,
)
from .base import Method, MethodError, register

ESTIMATORS = ("montecarlo", "exact", "jvp")
FUSIONS = ("product", "sum")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@register
@dataclass
class Zoo(Method):
    """ZOO-Prune (Kim et al., CVPR 2026, arXiv 2509.24837): zeroth-order projector sensitivity + SADS.

    Stage ``projector`` (before the LLM; no attention maps, so SDPA/FlashAttention work). Signals:
    ``pre_features`` X [n, d_in] (the projector input: CLIP layer -2 patches on LLaVA, the merger input of
    4 patches on Qwen2/2.5-VL), the projector ``M`` (``project`` / ``projector_module``), and the projected
    features Z = M(X) [n, D] (``features``). Query-agnostic: no text is read.

    1. Sensitivity ``S(i) = (1/m) sum_j ||M(x_i + h u_j) - M(x_i - h u_j)|| / (2h)`` with one bank of ``m``
       Gaussian directions normalised to unit norm, shared by every token (all crops, every image), drawn from
       ``seed`` alone (:func:`tokensieve.context.seeded_generator` with no content key): the picks are then a
       function of the image's features and the seed, also when another engine (vLLM) encodes the image. Two
       projector calls per chunk of ``chunk_rows`` (token, direction) rows.
    2. ``S_hat = (S - min S) / (max S - min S + 1e-8)``, all ones when S is constant.
    3. SADS on Z with ``D = 1 - cos``: first ``argmax S_hat``, then ``argmax S_hat(i) * min_{p in P} D(i, p)``
       (``fusion="product"``, the code) or ``S_hat(i) + min_p D(i, p)`` (``fusion="sum"``, the paper's ablation).
    4. Kept tokens are sorted and re-indexed (``reindex``; the framework keeps original M-RoPE positions on Qwen).

    Estimators (``estimator``):

    - ``"montecarlo"`` (default): the central differences above, the paper's estimator of ``E_u ||J u||``.
    - ``"exact"``: ``sqrt(E_u ||J u||^2) = ||J||_F / sqrt(d_in)`` in closed form for LLaVA's projector
      ``M(x) = W2 gelu(W1 x + b1) + b2``. Derivation: ``J = W2 diag(g) W1`` with ``g = gelu'(W1 x + b1)`` gives
      ``||J||_F^2 = g^T G g``, ``G = (W2^T W2) * (W1 W1^T)`` (elementwise, computed once per projector and cached);
      a uniform unit ``u`` has ``E[u u^T] = I / d_in``, so ``E||J u||^2 = ||J||_F^2 / d_in``. Deterministic, about
      ``N H^2`` FLOPs instead of ``2 m N`` projector passes. Raises on projectors that are not Linear-act-Linear.
    - ``"jvp"``: the same quantity as ``"exact"``, estimated as ``sqrt(mean_j ||J u_j||^2)`` with
      ``torch.func.jvp`` over the same seeded bank; works for any differentiable projector (Qwen's merger).

    The root-mean-square (``exact``/``jvp``) and the mean (``montecarlo``) of ``||J u||`` rank tokens almost the same
    way, but not identically.

    Other options: ``lowrank=r`` runs the sensitivity pass through a rank-``r`` SVD copy of every projector linear
    (built from the loaded weights on first use, biases kept, cached per projector; the official LLaVA-NeXT code
    uses 128; linears of rank <= r stay dense). ``dtype`` is the sensitivity pass's precision (a cached copy of
    the projector is made when it differs from the projector's own; ``exact`` always runs in float32).

    LLaVA-NeXT: sensitivity is normalised and SADS runs independently per crop (``ctx.groups``), the budget split
    equally (``k // n_crops``, the remainder to the first crops; a crop smaller than its share passes the rest on
    to the others: :func:`tokensieve.budget.split_budget`), and ``image_newline`` tokens (``ctx.always_keep``)
    are kept on top of the budget: an image keeps ``k + n_newlines`` tokens. Single-crop families are one
    group (Qwen: one per frame). The official NeXT code (``llava_arch_llava_next_7b.py``) finds the newline rows
    before the base crop is prepended, so it keeps tokens at shifted positions and drops the real newlines;
    here the real newlines are kept on top of the budget, which is what its comment intends. Its ratio budget
    is ``int(2880 * ratio)`` whatever the image size: ``ratio_of=2880`` gives that convention (a ratio
    ``keep`` becomes ``int(keep * ratio_of)``, capped at the image's tokens); by default a ratio is of this
    image's own tokens (floor).

    Defaults ``m=64``, ``h=0.01``, ``seed=0``, budget ``keep=0.25`` (the paper's LLaVA-1.5 settings use ``keep=64``,
    ``128``, ``192`` of 576; ``int(ratio * 576)`` with ratio 0.1112/0.2223/0.3334 gives the same counts).

    Differences from the official code (``AIM-SKKU/ZOO-Prune``): float32 by default (the official code runs the
    perturbed projector in fp16, where ``h u`` is near the rounding step; ``dtype="float16"`` reproduces it);
    seeded directions (the official code draws them unseeded); the official NeXT code drops the remainder of
    ``target // n_crops`` and assumes every crop can fill its share; Qwen2/2.5-VL has no official code (here the
    merger input of 4 patches is perturbed and its output read); ``lowrank`` is off by default on every family.
    """

    m: int = 64
    h: float = 0.01
    seed: int = 0
    fusion: str = "product"
    estimator: str = "montecarlo"
    lowrank: int | None = None
    dtype: str = "float32"
    chunk_rows: int = 8192
    ratio_of: int | None = None  # None: a ratio keep is of this image's tokens; 2880: the official NeXT budget

    name = "zoo"
    stage = "projector"
    needs = frozenset({"features", "pre_features", "projector"})
    paper = "ZOO-Prune: Training-Free Token Pruning via Zeroth-Order Gradient Estimation in VLMs (CVPR 2026)"
    arxiv = "2509.24837"
    fidelity = (
        "faithful on LLaVA-1.5 (fp32 and seeded by default; fp16 via dtype); NeXT keeps the real newlines on top "
        "(official code keeps shifted ones), per-image ratio budget (ratio_of=2880 for the official); Qwen mapping "
        "has no official code"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.estimator not in ESTIMATORS:
            raise MethodError(f"zoo: estimator={self.estimator!r}; choose one of {ESTIMATORS}")
        if self.fusion not in FUSIONS:
            raise MethodError(f"zoo: fusion={self.fusion!r}; choose one of {FUSIONS}")
        if self.dtype not in DTYPES:
            raise MethodError(f"zoo: dtype={self.dtype!r}; choose one of {tuple(DTYPES)}")
        if self.m < 1 or self.h <= 0 or self.chunk_rows < 1:
            raise MethodError(f"zoo: need m >= 1, h > 0, chunk_rows >= 1 (got {self.m}, {self.h}, {self.chunk_rows})")
        if self.ratio_of is not None and self.ratio_of < 1:
            raise MethodError(f"zoo: ratio_of={self.ratio_of} must be a positive token count or None")
        if self.lowrank is not None and self.lowrank < 1:
            raise MethodError(f"zoo: lowrank must be a positive rank or None, got {self.lowrank}")

    def budget(self, n_tokens: int, *, stage_index: int = 0, n_layers: int = 0) -> int:
        if self.ratio_of is None or not isinstance(self.keep, float):
            return resolve_keep(self.keep, n_tokens)
        return max(1, min(n_tokens, int(self.keep * self.ratio_of)))

    # ----- sensitivity ---------------------------------------------------------------------------------------
    def _projection(self, ctx: ImageContext, d_in: int) -> tuple:
        """The projector to perturb, as ``(callable, module or None, dtype)`` in the sensitivity pass's dtype."""
        dtype = DTYPES[self.dtype]
        module = ctx.projector_module
        if module is None:
            if ctx.project is None:
                raise MethodError("zoo needs the projector (ctx.project or ctx.projector_module)")
            if self.lowrank is not None:
                raise MethodError("zoo: lowrank needs ctx.projector_module")
            return ctx.project, None, dtype
        own_dtype = next(module.parameters()).dtype
        if self.lowrank is None and own_dtype == dtype and ctx.project is not None:
            return ctx.project, module, dtype
        copy = projector_copy(module, self.lowrank, dtype)
        return module_caller(copy, d_in), copy, dtype

    @torch.no_grad()
    def sensitivity(self, ctx: ImageContext, index: torch.Tensor | None = None) -> torch.Tensor:
        """Raw sensitivity S [len(index)] (float32) of the candidates ``index`` (default: all ``ctx.n``)."""
        if ctx.pre_features is None:
            raise MethodError("zoo needs ctx.pre_features (declare 'pre_features' in needs)")
        x = ctx.pre_features if index is None else ctx.pre_features[index]
        d_in = x.shape[1]
        if self.estimator == "exact":
            if ctx.projector_module is None:
                raise MethodError("zoo: estimator='exact' needs ctx.projector_module")
            module = ctx.projector_module
            if self.lowrank is not None:
                module = projector_copy(module, self.lowrank, torch.float32)
            return exact_mlp_sensitivity(module, x, self.chunk_rows)
        project, _, dtype = self._projection(ctx, d_in)
        directions = unit_directions(self.m, d_in, seeded_generator(self.seed, content_key=0))  # one bank
        x = x.to(dtype)
        if self.estimator == "jvp":
            return jvp_sensitivity(project, x, directions, self.chunk_rows)
        return finite_difference_sensitivity(project, x, directions, self.h, self.chunk_rows)

    # ----- selection -----------------------------------------------------------------------------------------
    def _sads(self, z: torch.Tensor, weights: torch.Tensor, k: int) -> torch.Tensor:
        if self.fusion == "product":
            return greedy_max_min(z, k, weights=weights, first="max_weight")
        return greedy_sum_fusion(z, weights, k)

    def select(self, ctx: ImageContext, k: int) -> torch.Tensor:
        device = ctx.features.device
        always = torch.nonzero(ctx.always_keep).flatten()
        prunable = torch.nonzero(~ctx.always_keep).flatten()
        if k >= prunable.numel():
            return torch.arange(ctx.n, device=device)
        scores = self.sensitivity(ctx, prunable).to(device)
        groups = ctx.groups[prunable]
        group_ids, sizes = torch.unique(groups, return_counts=True)
        chosen = [always]
        for gid, budget in zip(group_ids.tolist(), split_budget(k, sizes.tolist()), strict=True):
            if budget == 0:
                continue
            members = torch.nonzero(groups == gid).flatten()
            weights = minmax_normalise(scores[members])
            picks = self._sads(ctx.features[prunable[members]], weights, budget)
            chosen.append(prunable[members[picks]])
        return torch.cat(chosen)


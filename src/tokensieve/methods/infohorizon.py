"""Information Horizon: a shallow pruner before the LLM, then *random* pruning at a deep decoder layer."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..budget import Keep, layer_average_to_stage_count, resolve_keep, stages_layer_average, validate_keep
from ..context import LLMContext
from ..ops import greedy_max_min
from ._layers import normalize_layer, scale_layer
from .base import LLMMethod, Method, MethodError, make_method, register

PAPER_DEEP_LAYER = 20  # the official deep layer on LLaVA-1.5-7B (32 layers)
PAPER_TOKENS = 576
# FLOPs-average configs of the official scripts (LLaVA-1.5, 576 tokens, 32 layers): average -> (shallow, deep).
PAPER_CONFIGS: dict[int, tuple[int, int]] = {192: (284, 38), 64: (96, 10)}
IN_LLM_SHALLOW = ("divprune", "random")  # shallow rules a single InfoHorizon object can run itself at layer 0


def deep_layer_for(n_layers: int, layer: int | None = None) -> int:
    """The deep pruning layer: ``layer`` (negative counts from the end) or ``scale_layer(20, n_layers)``
    (``max(1, round(20 * n_layers / 32))``, :mod:`tokensieve.methods._layers`).

    Clipped to ``[1, n_layers - 1]`` so the deep stage always comes after layer 0 and inside the model.
    """
    if layer is None:
        return min(n_layers - 1, scale_layer(PAPER_DEEP_LAYER, n_layers))
    return normalize_layer(layer, n_layers, name="infohorizon: layer", low=1)


@register
@dataclass
class InfoHorizon(LLMMethod):
    """Information Horizon, "All You Need Are Random Visual Tokens?" (arXiv 2512.07580): beyond an
    *information horizon* layer (about layer 20 of 32 on LLaVA-1.5) no pruning criterion beats random, so the
    recipe is an existing pruner at a shallow stage (DivPrune at layer 0) followed by **random** pruning deep in
    the LLM.

    This object is the deep stage: stage ``llm`` at ``layer`` (default ``round(20/32 * n_layers)``, 20 on a
    32-layer LLM), a uniform random subset ``randperm(n)[:k]`` of the tokens still present (the official code's
    ``random.sample``), seeded by ``seed``, the sample and the image. Signals: none. Positions: ``reindex`` (the
    official ``modeling_llama_self.py`` rebuilds contiguous position ids after the deep prune and shifts the
    decode positions); on M-RoPE families the framework keeps the original 3-D ids unless ``positions`` is set.

    Composition. The sieve takes a list of stages, so the full recipe is
    ``tokensieve.sieve(model, [DivPrune(keep=284), InfoHorizon(keep=38)])``, built by :func:`infohorizon_pipeline`
    or :meth:`stages` (any pre-LLM method may be the shallow stage; the paper also allows DART before the
    horizon). ``tokensieve.sieve(model, "infohorizon", keep=38, keep_shallow=284)`` runs the whole recipe as one
    object: with ``keep_shallow`` set, it also prunes at layer 0 with the ``shallow`` rule (``"divprune"``: greedy
    max-min on cosine distance of the layer-0 hidden states, which *are* the projected features DivPrune reads,
    so the selection equals the projector-stage DivPrune; or ``"random"``). Without ``keep_shallow`` only the deep
    random stage runs.

    Budget: ``keep`` is the count kept from the deep layer on (an int, or a fraction of the image's *original*
    tokens); ``keep_shallow`` the count kept from layer 0. FLOPs-average settings (avg 192 = 284 then 38, avg 64
    = 96 then 10 on LLaVA-1.5) are computed by :func:`infohorizon_pipeline` with ``average=``.
    """

    keep: Keep = 38
    layer: int | None = None
    seed: int = 0
    shallow: str = "divprune"
    keep_shallow: Keep | None = None

    name = "infohorizon"
    needs = frozenset({"hidden"})
    default_positions = "reindex"
    paper = "All You Need Are Random Visual Tokens? Demystifying Token Pruning in VLLMs (Information Horizon)"
    arxiv = "2512.07580"
    fidelity = "faithful to the official DivPrune+random script; the deep layer is scaled to the model's depth"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.keep_shallow is not None:
            validate_keep(self.keep_shallow, "keep_shallow")
            if self.shallow not in IN_LLM_SHALLOW:
                raise MethodError(
                    f"infohorizon: shallow={self.shallow!r} cannot run inside this object; use "
                    f"InfoHorizon(...).stages() or infohorizon_pipeline() for it, or one of {IN_LLM_SHALLOW}"
                )

    def llm_layers(self, n_layers: int) -> list[int]:
        deep = deep_layer_for(n_layers, self.layer)
        return [deep] if self.keep_shallow is None else [0, deep]

    def _is_shallow(self, stage_index: int) -> bool:
        return self.keep_shallow is not None and stage_index == 0

    def budget(self, n_tokens: int, *, stage_index: int = 0, n_layers: int = 0) -> int:
        if self._is_shallow(stage_index):
            return resolve_keep(self.keep_shallow, n_tokens)
        return resolve_keep(self.keep, n_tokens, strict=self.keep_shallow is None)

    def select(self, ctx: LLMContext, k: int) -> torch.Tensor:
        if self._is_shallow(ctx.stage_index) and self.shallow == "divprune":
            return greedy_max_min(ctx.hidden.detach(), k, first="farthest_neighbour")
        order = torch.randperm(ctx.n, generator=ctx.generator(self.seed))
        return order[:k].to(ctx.token_index.device)

    def stages(self) -> list[Method]:
        """The recipe as a list for the sieve: ``[shallow method(keep=keep_shallow), deep random stage]``.

        The shallow stage is the registered pre-LLM method ``shallow`` (any name, e.g. ``"divprune"``,
        ``"visionzip"``); without ``keep_shallow`` there is no shallow stage and the list is ``[self]``.
        """
        if self.keep_shallow is None:
            return [self]
        return [make_method(self.shallow, keep=self.keep_shallow), replace(self, keep_shallow=None)]


def infohorizon_pipeline(
    shallow: str | Method = "divprune",
    keep_shallow: Keep | None = None,
    keep_deep: Keep | None = None,
    deep_layer: int | None = None,
    n_layers: int | None = None,
    average: Keep | None = None,
    n_tokens: int = PAPER_TOKENS,
    seed: int = 0,
    positions: str | None = None,
) -> list[Method]:
    """The Information-Horizon recipe (arXiv 2512.07580) as a list of stages for :func:`tokensieve.sieve`.

    Parameters
    ----------
    shallow : registry name or method object of the shallow stage (default DivPrune before the LLM; an in-LLM
        method before the deep layer also works, e.g. ``DART(layer=2)`` as the paper allows). A method object is
        used as given (its own ``keep``); a name gets ``keep=keep_shallow``.
    keep_shallow, keep_deep : tokens per image kept after the shallow stage / from the deep layer on.
    deep_layer : the deep layer; default ``round(20/32 * n_layers)`` (20 on 32 layers), resolved by the sieve
        from the model's depth when ``n_layers`` is not given.
    n_layers : decoder layers of the target model; needed with ``average``.
    average : a FLOPs-equivalent layer-averaged budget (tokens, or a fraction of ``n_tokens``). The shallow count
        defaults to the official one where the paper gives it (:data:`PAPER_CONFIGS`: 192 -> 284, 64 -> 96), else
        ``int(1.5 * average)`` (the 64 -> 96 ratio); the deep count is then solved with
        :func:`tokensieve.budget.layer_average_to_stage_count` so that the average over layers of
        ``shallow`` for the first ``deep_layer`` layers and ``deep`` afterwards is the largest not above
        ``average``: avg 192 gives 284 then 38 at layer 20 of 32, avg 64 gives 96 then 10, as the official
        scripts.
    n_tokens : visual tokens per image, to read a float ``average`` and to clip counts (576 on LLaVA-1.5).
    seed, positions : of the deep random stage.

    Returns
    -------
    list[Method] : ``[shallow stage, InfoHorizon deep stage]``.
    """
    if average is not None:
        if n_layers is None:
            raise MethodError("infohorizon_pipeline: average= needs n_layers (the model's decoder layers)")
        if keep_deep is not None:
            raise MethodError("infohorizon_pipeline: pass either average= or keep_deep=, not both")
        avg = resolve_keep(average, n_tokens)
        layer = deep_layer_for(n_layers, deep_layer)
        if keep_shallow is None:
            default = PAPER_CONFIGS.get(avg) if n_tokens == PAPER_TOKENS else None
            keep_shallow = default[0] if default is not None else min(n_tokens, max(1, int(1.5 * avg)))
        shallow_count = resolve_keep(keep_shallow, n_tokens)
        keep_deep = layer_average_to_stage_count(avg, shallow_count, n_layers, layer)
        deep_layer = layer
        assert stages_layer_average([shallow_count, keep_deep], [0, layer], n_tokens, n_layers) <= avg + 1e-9
    if keep_deep is None:
        raise MethodError("infohorizon_pipeline: pass keep_deep= (tokens kept from the deep layer on) or average=")
    if isinstance(shallow, Method):
        first = shallow
    else:
        if keep_shallow is None:
            raise MethodError("infohorizon_pipeline: pass keep_shallow= for the shallow stage")
        first = make_method(shallow, keep=keep_shallow)
    return [first, InfoHorizon(keep=keep_deep, layer=deep_layer, seed=seed, positions=positions)]

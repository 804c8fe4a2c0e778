"""The plan: methods + adapter -> a frozen, validated description of what the hooks do, built before any forward.

Everything a user can get wrong (budgets the family fixes, stage order, layers, seeds, signals the family cannot
capture) is checked here, so a bad sieve fails at construction and never mid-forward.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from types import MappingProxyType

from torch import nn

from ..adapters.base import Adapter, UnsupportedModelError
from ..budget import resolve_keep
from ..methods.base import Method, MethodError, make_method

PRE_LLM_STAGES = ("vision", "projector")
LAYER_SIGNALS = frozenset({"attention", "layer_hidden", "sublayer_io"})  # read at capture layers j < K
MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class Plan:
    """What the sieve does, per stage and per decoder layer (read-only once built)."""

    methods: tuple[Method, ...]
    pre_llm: tuple[Method, ...]  # vision/projector stages, applied at the input of decoder layer 0
    llm_stages: MappingProxyType  # decoder layer -> tuple of llm methods pruning from that layer on
    needs: frozenset[str]
    vision_layers: tuple[int, ...]  # vision-tower layers whose q/k/v and hidden states are captured
    capture_plan: MappingProxyType  # decoder layer j -> frozenset of signals captured there
    own_qk_layers: frozenset[int]  # layers K whose own q/k (from their input) a stage at K reads
    n_layers: int
    mrope: bool

    def policy(self, method: Method) -> str:
        """The method's position policy; on M-RoPE families the default is ``original`` (sliced 3-D ids), as in
        every official Qwen2-VL code path, since contiguous 1-D ranks would discard the image grid."""
        if method.positions is not None:
            return method.positions
        return "original" if self.mrope else method.default_positions


def resolve_methods(method, keep, kwargs) -> list[Method]:
    """A list of method objects from a name (+ keep and hyperparameters), an object, or a list of either."""
    if isinstance(method, (list, tuple)):
        if kwargs:
            raise MethodError("with a list of methods, pass hyperparameters on each method object, not as kwargs")
        out = [make_method(m, keep=keep) if isinstance(m, str) and keep is not None else make_method(m) for m in method]
        if not out:
            raise MethodError("the list of methods is empty")
        return out
    if isinstance(method, Method):
        if keep is not None:
            raise MethodError("keep was passed next to a method object; set keep on the object instead")
        return [make_method(method, **kwargs)]
    if keep is not None:
        kwargs = {**kwargs, "keep": keep}
    return [make_method(method, **kwargs)]


def check_model(model: nn.Module) -> None:
    """A compiled model would run its compiled graph and skip the sieve's hooks: refuse it clearly."""
    if hasattr(model, "_orig_mod"):
        raise UnsupportedModelError(
            "tokensieve: the model was wrapped by torch.compile; the compiled graph would skip the sieve's hooks. "
            "Enter the sieve on the uncompiled model (model._orig_mod) and do not compile it while the sieve is on."
        )
    compiled = [name or "model" for name, m in model.named_modules() if getattr(m, "_compiled_call_impl", None)]
    if compiled:
        raise UnsupportedModelError(
            f"tokensieve: {compiled[0]} was compiled in place (module.compile()); compiled modules skip the sieve's "
            f"hooks. Load the model again (or do not call .compile()) before entering the sieve."
        )


def _check_fields(m: Method) -> None:
    """Seeds must be non-negative 63-bit ints; an llm stage's ``layer`` must be an int."""
    names = {f.name for f in fields(m)}
    if "seed" in names:
        seed = m.seed
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
            raise MethodError(f"{m.name}: seed={seed!r}; pass an int in [0, 2**63 - 1]")
    if m.stage == "llm" and "layer" in names and m.layer is not None:
        if isinstance(m.layer, bool) or not isinstance(m.layer, int):
            raise MethodError(f"{m.name}: layer={m.layer!r}; pass an int decoder layer index (negative from the end)")


def _llm_layers(m: Method, n_layers: int) -> list[int]:
    try:
        layers = m.llm_layers(n_layers)
    except TypeError as err:
        raise MethodError(f"{m.name}: cannot place it in the decoder ({err}); pass layer as an int") from err
    if not layers:
        raise MethodError(f"{m.name} is an llm-stage method with no decoder layer; pass layer=K")
    return list(layers)


def _stages(methods: list[Method], n_layers: int) -> tuple[tuple[Method, ...], dict[int, tuple[Method, ...]]]:
    rank = {"vision": 0, "projector": 1, "llm": 2}
    llm: dict[int, list[Method]] = {}
    last = (-1, -1)
    for m in methods:
        _check_fields(m)
        layers = _llm_layers(m, n_layers) if m.stage == "llm" else [0]
        key = (rank[m.stage], layers[0])
        if key < last:
            raise MethodError(
                f"methods must be listed in pipeline order (vision, projector, then llm by layer); "
                f"{m.name} comes after a later stage"
            )
        last = key
        if m.stage != "llm":
            continue
        for layer in layers:
            if layer == 0 and "attention" in m.needs:
                raise MethodError(f"{m.name} reads attention of layer K-1, so it needs layer >= 1")
            llm.setdefault(layer, []).append(m)
    pre = tuple(m for m in methods if m.stage in PRE_LLM_STAGES)
    return pre, {layer: tuple(ms) for layer, ms in llm.items()}


def _check_family(adapter: Adapter, methods: list[Method], needs: set[str]) -> None:
    fixed = adapter.fixed_tokens_per_image()
    for m in methods:
        if fixed is not None and isinstance(m.keep, int):
            resolve_keep(m.keep, fixed)  # raises BudgetError before any forward pass
    if {"vision_qk", "vision_hidden"} & needs and not adapter.supports_vision_qk:
        users = [m.name for m in methods if {"vision_qk", "vision_hidden"} & set(m.needs)]
        raise UnsupportedModelError(
            f"{', '.join(users)} read(s) vision-tower attention, which the {adapter.family} adapter "
            f"cannot capture yet; use a projector-stage method (e.g. divprune, zoo) on this family."
        )
    cls_readers = [m.name for m in methods if getattr(m, "requires_cls", False)]
    if cls_readers and not adapter.vision_layout()[0]:
        raise UnsupportedModelError(
            f"{', '.join(cls_readers)} score(s) tokens by [CLS] attention and the {adapter.family} vision "
            f"tower has no [CLS] token; use a built-in vision method (visionzip, hiprune, flowcut, tcc: they "
            f"have a CLS-free path) or a projector-stage method (e.g. divprune, zoo) on this family."
        )


def _vision_layers(adapter: Adapter, methods: list[Method]) -> tuple[int, ...]:
    n_vision = len(adapter.vision_attention_layers())
    wanted = {layer if layer >= 0 else n_vision + layer for m in methods for layer in m.vision_layers(n_vision)}
    if any(m.stage == "vision" and {"vision_qk", "vision_hidden"} & set(m.needs) for m in methods):
        wanted.add(adapter.vision_feature_layer_index())  # the default layer of every vision method
    return tuple(sorted(wanted))


def _capture_plan(llm: dict[int, tuple[Method, ...]], n_layers: int) -> dict[int, frozenset[str]]:
    plan: dict[int, set[str]] = {}
    for layer, stage_methods in llm.items():
        for m in stage_methods:
            wanted = LAYER_SIGNALS & set(m.needs)
            if not wanted:
                continue
            for j in m.capture_layers(layer, n_layers):
                if not 0 <= j < layer:
                    raise MethodError(f"{m.name} at layer {layer} asks for signals of layer {j}; use 0 <= j < {layer}")
                plan.setdefault(j, set()).update(wanted)
    return {j: frozenset(s) for j, s in plan.items()}


def build_plan(adapter: Adapter, methods: Sequence[Method]) -> Plan:
    methods = list(methods)
    n_layers = adapter.n_layers
    pre, llm = _stages(methods, n_layers)
    needs = set().union(*(m.needs for m in methods))
    _check_family(adapter, methods, needs)
    own = frozenset(layer for layer, ms in llm.items() if any("own_qk" in m.needs for m in ms))
    return Plan(
        methods=tuple(methods),
        pre_llm=pre,
        llm_stages=MappingProxyType(llm),
        needs=frozenset(needs),
        vision_layers=_vision_layers(adapter, methods),
        capture_plan=MappingProxyType(_capture_plan(llm, n_layers)),
        own_qk_layers=own,
        n_layers=n_layers,
        mrope=bool(adapter.mrope),
    )

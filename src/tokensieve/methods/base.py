"""The method contract and the registry.

A method is a small ``@dataclass`` whose typed fields are its hyperparameters. Class attributes describe it:
``name`` (registry key), ``stage`` (``"vision"``, ``"projector"`` or ``"llm"``), ``needs`` (the signals the
framework must capture for it), ``default_positions`` (``"reindex"`` or ``"original"``), and the paper.
``select(ctx, k)`` is a pure function of a typed context and returns indices into the context's candidates
(or a :class:`~tokensieve.context.Selection` when it also merges tokens).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import ClassVar

import torch

from ..budget import Keep, layer_average_to_stage_count, resolve_keep, validate_keep
from ..context import ImageContext, LLMContext, Selection

STAGES = ("vision", "projector", "llm")
POSITION_POLICIES = ("reindex", "original")

# Signals a method may declare in ``needs``.
SIGNALS = {
    "features": "projected visual features (what the LLM receives)",
    "pre_features": "projector input features",
    "projector": "the projector module / callable M",
    "text": "prompt text token ids and input embeddings",
    "vision_qk": "queries/keys of chosen vision-tower layers (attention recomputed from them)",
    "vision_hidden": "hidden states of chosen vision-tower layers (CLS included)",
    "hidden": "hidden states at the pruning layer",
    "attention": "queries/keys after RoPE of the capture layers (default: the layer before the pruning layer)",
    "layer_hidden": "hidden states at the input of the capture layers",
    "sublayer_io": "normed inputs and outputs of the attention and MLP blocks of the capture layers",
    "own_qk": "queries/keys after RoPE of the pruning layer itself, from its input (ctx.capture(ctx.layer))",
}

_REGISTRY: dict[str, type[Method]] = {}


class MethodError(ValueError):
    """A method name, hyperparameter or stage that cannot be used."""


@dataclass
class Method:
    """Base class of every pruning method. Subclasses are dataclasses and call :func:`register`."""

    keep: Keep = 0.25
    positions: str | None = None  # None: the method's default policy

    name: ClassVar[str] = ""
    stage: ClassVar[str] = "projector"
    needs: ClassVar[frozenset[str]] = frozenset({"features"})
    default_positions: ClassVar[str] = "reindex"
    paper: ClassVar[str] = ""
    arxiv: ClassVar[str] = ""
    fidelity: ClassVar[str] = "faithful"  # or a short note on what differs from the official code
    requires_cls: ClassVar[bool] = False  # reads the vision tower's [CLS] token (checked before any forward pass)

    def __post_init__(self) -> None:
        validate_keep(self.keep)
        if self.positions is not None and self.positions not in POSITION_POLICIES:
            raise MethodError(f"positions={self.positions!r}: choose one of {POSITION_POLICIES}")

    @property
    def position_policy(self) -> str:
        return self.positions or self.default_positions

    def budget(self, n_tokens: int, *, stage_index: int = 0, n_layers: int = 0) -> int:
        """Tokens of one image to keep after this stage (``stage_index`` for multi-layer schedules)."""
        return resolve_keep(self.keep, n_tokens)

    def llm_layers(self, n_layers: int) -> list[int]:
        """Decoder layers at which an ``llm`` method prunes (each prunes from that layer on)."""
        return []

    def capture_layers(self, layer: int, n_layers: int) -> list[int]:
        """Decoder layers whose signals (``attention``, ``layer_hidden``, ``sublayer_io``) an ``llm`` stage at
        ``layer`` reads; each must be < ``layer``. Default: the layer just before."""
        return [layer - 1] if layer >= 1 else []

    def vision_layers(self, n_vision_layers: int) -> list[int]:
        """Vision-tower layers whose q/k or hidden states this method reads (non-negative indices)."""
        return []

    def select(self, ctx: ImageContext | LLMContext, k: int) -> torch.Tensor | Selection:
        raise NotImplementedError

    def describe(self) -> str:
        params = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in fields(self))
        return f"{self.name}({params})"


@dataclass
class LLMMethod(Method):
    """An in-LLM method: prunes the hidden states at decoder ``layer`` (and keeps them pruned afterwards)."""

    layer: int = 2
    average_budget: bool = False  # read ``keep`` as a layer-averaged (FLOPs-equivalent) budget
    stage: ClassVar[str] = "llm"
    needs: ClassVar[frozenset[str]] = frozenset({"hidden"})
    default_positions: ClassVar[str] = "original"

    def budget(self, n_tokens: int, *, stage_index: int = 0, n_layers: int = 0) -> int:
        """``keep`` from this layer on; with ``average_budget`` the count whose layer average is ``keep``."""
        count = resolve_keep(self.keep, n_tokens)
        if not self.average_budget:
            return count
        return layer_average_to_stage_count(count, n_tokens, n_layers, self.llm_layers(n_layers)[0])

    def llm_layers(self, n_layers: int) -> list[int]:
        layer = self.layer if self.layer >= 0 else n_layers + self.layer
        if not 0 <= layer < n_layers:
            raise MethodError(
                f"{self.name}: layer={self.layer} is outside the model's {n_layers} decoder layers; "
                f"pass layer in [0, {n_layers - 1}]."
            )
        return [layer]


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: add a method to the registry under ``cls.name``."""
    if not cls.name:
        raise MethodError(f"{cls.__name__} has no name")
    if cls.stage not in STAGES:
        raise MethodError(f"{cls.__name__}.stage={cls.stage!r} is not one of {STAGES}")
    unknown = set(cls.needs) - set(SIGNALS)
    if unknown:
        raise MethodError(f"{cls.__name__} needs unknown signals {sorted(unknown)}; known: {sorted(SIGNALS)}")
    _REGISTRY[cls.name] = cls
    return cls


def list_methods() -> list[str]:
    """Names of every registered method, sorted."""
    _load_builtin_methods()
    return sorted(_REGISTRY)


def method_class(name: str) -> type[Method]:
    _load_builtin_methods()
    key = name.lower().replace("-", "_")
    if key not in _REGISTRY:
        raise MethodError(f"unknown method {name!r}; known methods: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[key]


def make_method(method: str | Method, **kwargs) -> Method:
    """A method object from a registry name and hyperparameters, or the object itself."""
    if isinstance(method, Method):
        if kwargs:
            raise MethodError(
                f"hyperparameters {sorted(kwargs)} were passed next to a method object; set them on the object"
            )
        return method
    if not isinstance(method, str):
        raise MethodError(f"method must be a registry name or a Method object, not {type(method).__name__}")
    cls = method_class(method)
    names = {f.name for f in fields(cls)}
    unknown = set(kwargs) - names
    if unknown:
        raise MethodError(f"{cls.name} has no hyperparameter {sorted(unknown)}; it takes {sorted(names)}")
    return cls(**kwargs)


def _load_builtin_methods() -> None:
    from . import _builtin  # noqa: F401  (importing registers every method file)

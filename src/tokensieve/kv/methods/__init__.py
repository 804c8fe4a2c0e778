"""The KV method registry: registry name -> dataclass."""

from __future__ import annotations

from dataclasses import fields

from .base import Call, KVMethod, KVMethodError, Piece
from .dense import Dense
from .fasa import FASA
from .hisa import HISA
from .oracle import OracleTopK
from .streaming import StreamingWindow
from .tokenselect import TokenSelect
from .tsa import TSA

_BUILTIN = (Dense, FASA, HISA, OracleTopK, StreamingWindow, TokenSelect, TSA)
_REGISTRY: dict[str, type[KVMethod]] = {m.name: m for m in _BUILTIN}


def register_kv_method(cls: type[KVMethod]) -> type[KVMethod]:
    _REGISTRY[cls.name] = cls
    return cls


def list_kv_methods() -> list[str]:
    return sorted(_REGISTRY)


def is_kv_method(name: object) -> bool:
    return isinstance(name, str) and name in _REGISTRY


def make_kv_method(name: str | KVMethod, **hyperparameters) -> KVMethod:
    """Build a method by registry name with keyword hyperparameters (unknown names raise, listing the valid ones)."""
    if isinstance(name, KVMethod):
        if hyperparameters:
            raise KVMethodError("pass hyperparameters either in the method object or as keywords, not both")
        return name
    if not is_kv_method(name):
        raise KVMethodError(f"unknown KV method {name!r}; available: {', '.join(list_kv_methods())}")
    cls = _REGISTRY[name]
    known = {f.name for f in fields(cls)} - {"extra"}
    unknown = set(hyperparameters) - known
    if unknown:
        raise KVMethodError(
            f"{name} has no hyperparameter(s) {sorted(unknown)}; valid: {sorted(known) or 'none'}"
        )
    return cls(**hyperparameters)


__all__ = [
    "Call", "KVMethod", "KVMethodError", "Piece", "is_kv_method", "list_kv_methods", "make_kv_method",
    "register_kv_method",
]

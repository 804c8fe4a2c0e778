"""The KV budget: ``keep`` is the number of cached tokens each query attends.

An ``int`` is a count; a ``float`` in ``(0, 1]`` is a fraction of the sample's prompt (context) length, turned
into a count with ``int(keep * n_context)`` (never below one), the project's one rounding rule.
"""

from __future__ import annotations

from ..budget import validate_keep


class KVBudgetError(ValueError):
    """A ``keep`` value that cannot be turned into a count of attended KV tokens."""


def validate_kv_keep(keep: object) -> int | float:
    """Check the type and range of ``keep`` before any forward pass; return it as int or float."""
    return validate_keep(keep, count="count of KV tokens each query attends (int, e.g. 2048)",
                         whole="the context", error=KVBudgetError)  # fmt: skip


def resolve_kv_keep(keep: int | float, n_context: int) -> int:
    """The attended-token count for one sample whose prompt holds ``n_context`` tokens."""
    if isinstance(keep, int):
        return keep
    return max(1, int(keep * n_context))

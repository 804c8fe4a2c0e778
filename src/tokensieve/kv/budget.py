"""The KV budget: ``keep`` is the number of cached tokens each query attends.

An ``int`` is a count; a ``float`` in ``(0, 1]`` is a fraction of the sample's prompt (context) length, turned
into a count with ``int(keep * n_context)`` (never below one), the project's one rounding rule.
"""

from __future__ import annotations

import math
from numbers import Integral, Real


class KVBudgetError(ValueError):
    """A ``keep`` value that cannot be turned into a count of attended KV tokens."""


def validate_kv_keep(keep: object) -> int | float:
    """Check the type and range of ``keep`` before any forward pass; return it as int or float."""
    if isinstance(keep, bool) or not isinstance(keep, Real):
        raise KVBudgetError(
            f"keep={keep!r} is not a number: pass the number of KV tokens each query attends (int, e.g. 2048) "
            f"or a fraction of the context (float in (0, 1], e.g. 0.125)."
        )
    if isinstance(keep, Integral):
        if keep <= 0:
            raise KVBudgetError(
                f"keep={keep} must be a positive count of KV tokens (e.g. 2048) or a fraction in (0, 1]."
            )
        return int(keep)
    if not math.isfinite(keep) or not 0.0 < float(keep) <= 1.0:
        raise KVBudgetError(
            f"keep={keep} is a float, so it is read as a fraction of the context and must lie in (0, 1]; "
            f"pass an int for a token count."
        )
    return float(keep)


def resolve_kv_keep(keep: int | float, n_context: int) -> int:
    """The attended-token count for one sample whose prompt holds ``n_context`` tokens."""
    if isinstance(keep, int):
        return keep
    return max(1, int(keep * n_context))

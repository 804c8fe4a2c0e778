"""KV-cache token selection for long-context causal LMs (TokenSelect, HISA, baselines) and kv-bench.

``with KVSieve(model, "tokenselect", keep=2048) as s: model.generate(...)``; ``s.trace.kv_selected(layer, step)``.
"""

from .budget import KVBudgetError
from .families import UnsupportedKVModelError, supported_kv_families
from .methods import KVMethod, KVMethodError, is_kv_method, list_kv_methods, make_kv_method
from .sieve import KVSieve
from .trace import KVTrace, KVTraceError

__all__ = [
    "KVBudgetError", "KVMethod", "KVMethodError", "KVSieve", "KVTrace", "KVTraceError", "UnsupportedKVModelError",
    "is_kv_method", "list_kv_methods", "make_kv_method", "supported_kv_families",
]

"""The sieve: a context manager that prunes visual tokens of a HuggingFace VLM while it is active.

The facade only wires the parts of :mod:`tokensieve.core` together:

- :mod:`~tokensieve.core.plan`: methods + adapter -> a frozen, validated Plan (every check before any forward);
- :mod:`~tokensieve.core.hooks`: installs and removes the hooks and the ``get_image_features`` / ``generate``
  wrappers (also after an exception);
- :mod:`~tokensieve.core.calls`: what each hook does per call (request state per thread, in
  :mod:`~tokensieve.core.state`); :mod:`~tokensieve.core.stages` runs the stages through one apply path;
  :mod:`~tokensieve.core.layout` compacts rows and builds masks per attention backend.

After each prefill with images, ``trace`` is that prefill's :class:`Trace` and ``traces`` lists the Trace of every
prefill so far (the latest ``max_traces``), e.g. one per ``pipeline(...)`` input.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Sequence

from torch import nn

from .adapters.base import Adapter, get_adapter
from .budget import Keep
from .core.calls import Calls, NoImageTokensWarning
from .core.hooks import Hooks, SieveUsageError
from .core.plan import Plan, build_plan, check_model, resolve_methods
from .core.state import States
from .methods.base import Method
from .trace import Trace

__all__ = ["NoImageTokensWarning", "Sieve", "SieveUsageError", "sieve"]


class Sieve:
    """Prune the visual tokens of ``model`` while the ``with`` block is active.

    Parameters
    ----------
    model : a supported ``*ForConditionalGeneration`` VLM (LLaVA-1.5, LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL).
    method : registry name, a method object, or a list of method objects (one per stage, composed in order).
    keep : tokens per image (int) or fraction of each image's tokens (float in (0, 1]).
    max_traces : how many per-prefill Traces ``traces`` keeps (oldest dropped first).
    **method_kwargs : hyperparameters of the method when ``method`` is a name.
    """

    def __init__(
        self,
        model: nn.Module,
        method: str | Method | Sequence[str | Method] = "random",
        keep: Keep | None = None,
        max_traces: int = 1024,
        **method_kwargs,
    ):
        check_model(model)
        self.model = model
        self.adapter: Adapter = get_adapter(model)
        self.methods = resolve_methods(method, keep, method_kwargs)
        self.plan: Plan = build_plan(self.adapter, self.methods)
        self.traces: deque[Trace] = deque(maxlen=max_traces)
        self._trace = Trace()
        self._lock = threading.Lock()
        self._states = States()
        self._calls = Calls(self.adapter, self.plan, self._states, self._publish)
        self._hooks: Hooks | None = None

    @property
    def trace(self) -> Trace:
        """The Trace of the latest prefill with images (an empty Trace before any)."""
        return self._trace

    @property
    def needs(self) -> frozenset[str]:
        return self.plan.needs

    def _publish(self, trace: Trace) -> None:
        with self._lock:
            self._trace = trace
            self.traces.append(trace)

    def __enter__(self) -> Sieve:
        if self._hooks is not None:
            raise SieveUsageError("tokensieve: this sieve is already active; enter it once at a time")
        hooks = Hooks(self.model, self.adapter, self._calls, self._states, self)
        try:
            hooks.install()
        except BaseException:
            hooks.remove()
            raise
        self._hooks = hooks
        return self

    def __exit__(self, *exc) -> None:
        if self._hooks is not None:
            self._hooks.remove()
            self._hooks = None


def sieve(
    model: nn.Module,
    method: str | Method | Sequence[str | Method] = "random",
    keep: Keep | None = None,
    **kwargs,
) -> Sieve:
    """Prune visual tokens of ``model`` inside a ``with`` block.

    >>> with tokensieve.sieve(model, "divprune", keep=64) as s:   # doctest: +SKIP
    ...     out = model.generate(**inputs, max_new_tokens=20)
    >>> s.trace.kept(sample=0, image=0)                             # doctest: +SKIP

    A KV-selection method (``tokensieve.kv.list_kv_methods()``: ``tokenselect``, ``hisa``, ...) on a causal LM
    returns a :class:`tokensieve.kv.KVSieve` instead (``keep``: KV tokens each query attends).
    """
    from .kv import KVSieve, is_kv_method  # lazy: the KV family loads only when asked for

    if is_kv_method(method) or type(method).__module__.startswith("tokensieve.kv."):
        return KVSieve(model, method, 2048 if keep is None else keep, **kwargs)
    return Sieve(model, method, keep, **kwargs)

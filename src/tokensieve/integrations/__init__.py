"""Optional integrations with evaluation and serving frameworks.

- :mod:`tokensieve.integrations.lmms`: a ``tokensieve`` model for lmms-eval (extra ``tokensieve[lmms]``) and an
  offline lmms-eval task for the embedded synthetic set.
- :mod:`tokensieve.integrations.vllm`: an out-of-tree vLLM plugin for the pre-LLM methods whose decision needs
  only the image (extra ``tokensieve[vllm]``).

Nothing here is imported by ``import tokensieve``; each module imports its framework lazily.
"""

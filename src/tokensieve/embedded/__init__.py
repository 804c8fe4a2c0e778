"""The embedded default: synthetic VQA tasks and a small trained LLaVA shipped with the package.

- :mod:`tokensieve.embedded.synthetic`: seeded tasks (``make_split``, ``make_incontext``, ``prompt_for``).
- :mod:`tokensieve.embedded.build`: offline tokenizer/processor/config and ``load_embedded``.
- :mod:`tokensieve.embedded.evaluate`: greedy answering and per-family accuracy.
- :mod:`tokensieve.embedded.train`: the training recipe that produced the shipped weights.
"""

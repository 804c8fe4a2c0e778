"""``tokensieve bench``: methods x budgets side by side, into a resumable run folder with a report.

- :mod:`tokensieve.bench.runner`: cells, the JSONL results file, resume (:func:`run_bench`);
- :mod:`tokensieve.bench.metrics`: accuracy, retention, analytic FLOPs, KV-cache bytes, latency;
- :mod:`tokensieve.bench.loaders`: the synthetic task and POPE / GQA through ``datasets``;
- :mod:`tokensieve.bench.report`: ``report.md``, plots and the kept-token picture grid;
- :mod:`tokensieve.bench.cli`: the ``bench`` and ``show`` sub-commands.
"""

from .loaders import Task, load_task
from .metrics import prefill_flops
from .runner import BenchConfig, BenchResult, run_bench

__all__ = ["BenchConfig", "BenchResult", "Task", "load_task", "prefill_flops", "run_bench"]

"""The offline lmms-eval task ``tokensieve_synthetic``: the embedded synthetic questions, written locally.

:func:`write_task` renders the same questions ``tokensieve bench --task synthetic`` scores (``make_split``) into a
parquet file with an embedded image column, next to a task YAML and a ``utils.py`` that imports the document
functions below. Nothing is downloaded; pass the folder to lmms-eval with ``--include_path``.

Scoring is the bench's: exact match after whitespace normalisation (:func:`tokensieve.bench.metrics.exact_match`),
and greedy decoding of at most two new tokens (the task's ``max_new_tokens``).
"""

from __future__ import annotations

import io
from pathlib import Path

from tokensieve.embedded.synthetic import make_split

TASK_NAME = "tokensieve_synthetic"
MAX_NEW_TOKENS = 2  # as tokensieve.bench.loaders.load_task("synthetic")

_YAML = """\
task: {task}
dataset_path: parquet
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
process_results: !function utils.process_results
generation_kwargs:
  max_new_tokens: {max_new_tokens}
  temperature: 0
  do_sample: false
  until: ["\\n\\n"]
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
  source: "tokensieve embedded synthetic, split {split}, {limit} questions per family"
"""

_UTILS = '''"""Document functions of the tokensieve_synthetic task (written by tokensieve.integrations.lmms.task)."""
from tokensieve.integrations.lmms.task import doc_to_text, doc_to_visual, process_results  # noqa: F401
'''


def doc_to_visual(doc: dict) -> list:
    return [doc["image"].convert("RGB")]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    kwargs = lmms_eval_specific_kwargs or {}
    return f"{kwargs.get('pre_prompt', '')}{doc['question']}{kwargs.get('post_prompt', '')}"


def process_results(doc: dict, results: list[str]) -> dict:
    from tokensieve.bench.metrics import exact_match

    return {"exact_match": float(exact_match(results[0], doc["answer"]))}


def task_rows(split: str = "test", limit: int = 40) -> list[dict]:
    """One row per question, in bench order (families in turn, ``limit`` each)."""
    rows = []
    for index, sample in enumerate(make_split(split, limit)):
        buffer = io.BytesIO()
        sample.image.save(buffer, format="PNG")
        rows.append(
            {
                "id": index,
                "image": {"bytes": buffer.getvalue(), "path": None},
                "question": sample.question,
                "answer": sample.answer,
                "family": sample.family,
            }
        )
    return rows


def write_task(out_dir: str | Path, split: str = "test", limit: int = 40, task: str = TASK_NAME) -> Path:
    """Write ``out_dir/<task>/`` (YAML, utils.py, data parquet); returns that folder."""
    import datasets

    folder = Path(out_dir).resolve() / task
    folder.mkdir(parents=True, exist_ok=True)
    features = datasets.Features(
        {
            "id": datasets.Value("int64"),
            "image": datasets.Image(),
            "question": datasets.Value("string"),
            "answer": datasets.Value("string"),
            "family": datasets.Value("string"),
        }
    )
    data = folder / f"{task}_{split}.parquet"
    datasets.Dataset.from_list(task_rows(split, limit), features=features).to_parquet(str(data))
    (folder / f"{task}.yaml").write_text(
        _YAML.format(task=task, data=data, max_new_tokens=MAX_NEW_TOKENS, split=split, limit=limit)
    )
    (folder / "utils.py").write_text(_UTILS)
    return folder

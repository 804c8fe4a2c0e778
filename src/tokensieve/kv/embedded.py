"""The embedded long-context LM shipped in the repo (trained by scripts/kv_train.py)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from .tasks import TASKS, make_sample

MODEL_DIR = Path(__file__).parent / "model"


def embedded_model_dir() -> Path:
    if not (MODEL_DIR / "model.safetensors").exists():
        raise FileNotFoundError(
            f"no embedded KV model at {MODEL_DIR}; train it with "
            f"`PYTHONPATH=src python scripts/kv_train.py --out {MODEL_DIR}`"
        )
    return MODEL_DIR


def load_embedded(path: str | Path | None = None, attn: str = "sdpa"):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(path or embedded_model_dir(), attn_implementation=attn)
    return model.eval()


def embedded_meta(path: str | Path | None = None) -> dict:
    meta = Path(path or MODEL_DIR) / "meta.json"
    return json.loads(meta.read_text()) if meta.exists() else {}


@torch.no_grad()
def dense_accuracy(model, lengths: list[int], n: int, seed: int = 1234) -> dict[str, float]:
    """Exact match per ``task@length``: teacher-forced argmax over the answer (equal to greedy exact match),
    on samples drawn in order length -> task from ``random.Random(seed)`` (as written to meta.json)."""
    rng = random.Random(seed)
    return {f"{task}@{length}": task_accuracy(model, task, length, n, rng) for length in lengths for task in TASKS}


@torch.no_grad()
def task_accuracy(model, task: str, length: int, n: int, rng: random.Random, chunk: int = 8) -> float:
    """Teacher-forced exact match of ``task`` at ``length`` on ``n`` fresh samples (``n_distract=8`` as in
    ``dense_accuracy``), batched ``chunk`` at a time: meta.json's figures and the in-loop check of
    scripts/kv_train.py."""
    samples = [make_sample(task, length, rng, n_distract=8) for _ in range(n)]
    ok = 0
    for i in range(0, n, chunk):
        part = samples[i : i + chunk]
        x = torch.tensor([s.prompt + s.answer for s in part])
        hidden = model.model(x).last_hidden_state[:, length - 1 : -1]
        pred = model.lm_head(hidden).argmax(-1)
        ok += int((pred == torch.tensor([s.answer for s in part])).all(-1).sum())
    return ok / n

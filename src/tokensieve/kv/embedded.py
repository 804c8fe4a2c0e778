"""The embedded long-context LM shipped in the repo (trained by scripts/kv_train.py)."""

from __future__ import annotations

import json
from pathlib import Path

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

"""A copy of a LLaVA checkpoint in the key layout vLLM's loader reads.

The embedded model's safetensors name the CLIP tower's weights ``vision_tower.embeddings...`` (the layout
transformers loads). vLLM 0.32's LLaVA expects ``vision_tower.vision_model.embeddings...`` and stops with
``There is no module or parameter named 'vision_tower.embeddings'``. :func:`vllm_llava_checkpoint` writes a copy
with those keys renamed, next to the same config, tokenizer and processor files. The weights are unchanged.
"""

from __future__ import annotations

import shutil
from pathlib import Path

PREFIX, VLLM_PREFIX = "vision_tower.", "vision_tower.vision_model."


def vllm_key(key: str) -> str:
    if key.startswith(PREFIX) and not key.startswith(VLLM_PREFIX):
        return VLLM_PREFIX + key[len(PREFIX) :]
    return key


def vllm_llava_checkpoint(src: str | Path, dst: str | Path) -> Path:
    """Copy ``src`` to ``dst`` with vLLM's vision-tower key names; returns ``dst``."""
    from safetensors.torch import load_file, save_file

    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for path in src.iterdir():
        if path.is_file() and path.suffix != ".safetensors":
            shutil.copy2(path, dst / path.name)
    for path in sorted(src.glob("*.safetensors")):
        weights = load_file(str(path))
        save_file({vllm_key(k): v for k, v in weights.items()}, str(dst / path.name), metadata={"format": "pt"})
    return dst

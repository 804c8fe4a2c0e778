"""lmms-eval integration: the ``tokensieve`` model and the offline ``tokensieve_synthetic`` task.

lmms-eval finds the model through the ``lmms_eval.models`` entry point, which points at :func:`get_manifests`.
This module imports only lmms-eval's registry (it runs while ``lmms_eval.models`` is still initialising); the
model classes live in :mod:`tokensieve.integrations.lmms.model` and are imported by lmms-eval on use.

Usage::

    python -m tokensieve.integrations.lmms task --out tasks/          # writes the offline task + its data
    lmms-eval --model tokensieve \\
        --model_args pretrained=embedded,method=divprune,keep=0.11 \\
        --tasks tokensieve_synthetic --include_path tasks/ --batch_size 8 --log_samples --output_path runs/
"""

from __future__ import annotations

MODEL_ID = "tokensieve"


def get_manifests():
    """The lmms-eval manifest of the ``tokensieve`` model (chat class by default, ``--force_simple`` for simple)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(
        model_id=MODEL_ID,
        simple_class_path="tokensieve.integrations.lmms.model.TokenSieveSimple",
        chat_class_path="tokensieve.integrations.lmms.model.TokenSieveChat",
    )

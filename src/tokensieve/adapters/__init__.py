"""Adapters, one module per family. Importing this package registers every concrete adapter; ``base`` holds the
contract and the registry and imports none of them (no import circle)."""

from . import llava, llava_next, qwen2_vl  # noqa: F401  (each registers itself with @register_adapter)
from .base import Adapter, FeatureRecord, ImageTokens, UnsupportedModelError, get_adapter, supported_families

__all__ = ["Adapter", "FeatureRecord", "ImageTokens", "UnsupportedModelError", "get_adapter", "supported_families"]

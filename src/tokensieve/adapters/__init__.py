from .base import Adapter, FeatureRecord, ImageTokens, UnsupportedModelError, get_adapter, supported_families

__all__ = ["Adapter", "FeatureRecord", "ImageTokens", "UnsupportedModelError", "get_adapter", "supported_families"]

"""tokensieve: training-free visual-token pruning for HuggingFace vision-language models."""

from .adapters import UnsupportedModelError, supported_families
from .budget import BudgetError, layer_average_to_stage_count, resolve_keep
from .context import ImageContext, LLMContext, Selection
from .methods import LLMMethod, Method, MethodError, list_methods, make_method, method_class
from .sieve import NoImageTokensWarning, Sieve, SieveUsageError, sieve
from .trace import Trace

__version__ = "0.1.0"

__all__ = [
    "BudgetError",
    "ImageContext",
    "LLMContext",
    "LLMMethod",
    "Method",
    "MethodError",
    "NoImageTokensWarning",
    "Selection",
    "Sieve",
    "SieveUsageError",
    "Trace",
    "UnsupportedModelError",
    "layer_average_to_stage_count",
    "list_methods",
    "make_method",
    "method_class",
    "resolve_keep",
    "sieve",
    "supported_families",
]

"""``--model_args`` of the lmms-eval ``tokensieve`` model: what loads the model, what builds the sieve.

``pretrained=PATH,method=NAME,keep=K,<hyperparameters>`` plus the loading options below. Everything that is not
a loading option is a hyperparameter of ``method`` and is checked against the method's dataclass here, before
the model is loaded. lmms-eval has already turned ``"true"``/numbers into Python values.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tokensieve.budget import Keep, validate_keep
from tokensieve.methods import MethodError, make_method

NO_PRUNING = "none"
EMBEDDED = "embedded"  # pretrained=embedded: the model shipped inside tokensieve

LOAD_OPTIONS = {
    "pretrained": None,
    "device": None,  # default: cuda if available, else cpu
    "device_map": None,  # e.g. auto; default: the whole model on ``device``
    "dtype": "auto",  # auto: float32 on CPU, bfloat16 on GPU; or a torch dtype name
    "attn_implementation": None,  # transformers' default (sdpa) when None
    "batch_size": 1,
    "max_batch_size": None,
    "max_new_tokens": 128,  # used when the task's generation_kwargs do not say
}  # every other key (seed included) is a hyperparameter of the method


@dataclass
class ModelArgs:
    """Parsed ``--model_args``."""

    pretrained: str
    method: str = NO_PRUNING
    keep: Keep | None = None
    hyperparameters: dict = field(default_factory=dict)
    load: dict = field(default_factory=dict)

    @property
    def prunes(self) -> bool:
        return self.method != NO_PRUNING

    def sieve_kwargs(self) -> dict:
        """Keyword arguments for ``tokensieve.sieve(model, **kwargs)``."""
        return {"method": self.method, "keep": self.keep, **self.hyperparameters}


def parse_model_args(kwargs: dict) -> ModelArgs:
    """Split and validate lmms-eval's model kwargs; raises ``ValueError``/``MethodError`` naming the fix."""
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    pretrained = kwargs.pop("pretrained", None)
    if not pretrained:
        raise ValueError(
            "tokensieve needs pretrained=PATH (a local or hub LLaVA-1.5 / LLaVA-NeXT / Qwen2-VL / Qwen2.5-VL), "
            "or pretrained=embedded for the model shipped with tokensieve"
        )
    load = {k: kwargs.pop(k, default) for k, default in LOAD_OPTIONS.items() if k != "pretrained"}
    method = str(kwargs.pop("method", NO_PRUNING)).lower()
    keep = kwargs.pop("keep", None)
    if method == NO_PRUNING:
        if keep is not None or kwargs:
            extra = sorted(kwargs) + (["keep"] if keep is not None else [])
            raise ValueError(f"method=none runs the model unpruned; drop {extra} or name a method")
        return ModelArgs(pretrained=str(pretrained), load=load)
    if keep is not None:
        keep = validate_keep(_number(keep), "keep")
    try:  # unknown method or hyperparameter names fail here, before the model loads
        make_method(method, **({"keep": keep} if keep is not None else {}), **kwargs)
    except TypeError as error:  # a dataclass rejecting a value
        raise MethodError(f"{method}: {error}") from error
    return ModelArgs(pretrained=str(pretrained), method=method, keep=keep, hyperparameters=kwargs, load=load)


def _number(value):
    """``keep`` from the command line: ``64`` is a count, ``0.11`` (or ``1.0``) a fraction."""
    if isinstance(value, str):
        text = value.strip()
        try:
            return int(text)
        except ValueError:
            try:
                return float(text)
            except ValueError:
                return value  # validate_keep names the problem
    return value

"""Batched, sieved generation for a harness: load a supported VLM, answer prompts, report kept tokens.

Independent of lmms-eval (the wrapper in :mod:`.model` is thin), so it is tested in the fast suite. One sieve is
entered per batch: between batches, and after an exception, the model has no hooks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tokensieve import sieve

from .args import EMBEDDED, ModelArgs
from .prompts import build_prompt


@dataclass
class Prompt:
    """One request: its images (PIL) and chat messages (HF format: ``{"type": "image"}`` / ``"text"`` items)."""

    images: list
    messages: list[dict]


@dataclass
class Answer:
    text: str
    stats: dict = field(default_factory=dict)


def resolve_device(device: str | None) -> str:
    if device:
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(dtype: str | None, device: str) -> torch.dtype:
    if dtype in (None, "auto"):
        return torch.float32 if device == "cpu" else torch.bfloat16
    value = getattr(torch, str(dtype), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"dtype={dtype!r} is not a torch dtype; use auto, float32, float16 or bfloat16")
    return value


def model_path(pretrained: str) -> str:
    if pretrained == EMBEDDED:
        from tokensieve.embedded.build import EMBEDDED_DIR

        return str(EMBEDDED_DIR)
    return pretrained


def load_processor(path: str):
    """``AutoProcessor``; for Qwen2/2.5-VL without torchvision, the image-only processor (no video processor)."""
    from transformers import AutoProcessor

    config = json.loads((Path(path) / "config.json").read_text()) if Path(path, "config.json").exists() else {}
    qwen = config.get("model_type") in ("qwen2_vl", "qwen2_5_vl")
    try:
        processor = AutoProcessor.from_pretrained(path)
    except (ImportError, AttributeError):
        if not qwen:
            raise
        return _image_only_qwen_processor(path)
    if qwen and not hasattr(processor, "tokenizer"):  # only an image processor or a tokenizer was found
        return _image_only_qwen_processor(path)
    return processor


def _image_only_qwen_processor(path: str):
    from transformers import AutoImageProcessor, AutoTokenizer, Qwen2VLProcessor

    class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):  # the video processor needs torchvision
        def check_argument_for_proper_class(self, name, arg):
            if arg is None and name == "video_processor":
                return None
            return super().check_argument_for_proper_class(name, arg)

    tokenizer = AutoTokenizer.from_pretrained(path)
    template = getattr(tokenizer, "chat_template", None)
    jinja = Path(path) / "chat_template.jinja"
    if jinja.exists():
        template = jinja.read_text()
    return ImageOnlyQwen2VLProcessor(
        image_processor=AutoImageProcessor.from_pretrained(path),
        tokenizer=tokenizer,
        video_processor=None,
        chat_template=template,
    )


class SievedVLM:
    """A VLM and its processor; :meth:`generate` answers a batch under ``tokensieve.sieve`` (or unpruned)."""

    def __init__(self, args: ModelArgs, model=None, processor=None):
        self.args = args
        self.device = resolve_device(args.load.get("device"))
        if model is None:
            model, processor = self._load()
        self.model, self.processor = model, processor
        self.dtype = next(model.parameters()).dtype
        self.image_token_id = int(model.config.image_token_id)
        if args.prunes:  # adapter and plan checks (unsupported family, bad budget) before any request
            sieve(model, **args.sieve_kwargs())

    def _load(self):
        from transformers import AutoModelForImageTextToText

        path = model_path(self.args.pretrained)
        load = self.args.load
        kwargs = {"dtype": resolve_dtype(load.get("dtype"), self.device)}
        if load.get("attn_implementation"):
            kwargs["attn_implementation"] = load["attn_implementation"]
        if load.get("device_map"):
            kwargs["device_map"] = load["device_map"]
        model = AutoModelForImageTextToText.from_pretrained(path, **kwargs)
        if not load.get("device_map"):
            model.to(self.device)
        return model.eval(), load_processor(path)

    def generate(self, prompts: list[Prompt], gen_kwargs: dict) -> list[Answer]:
        """Answers in the order of ``prompts`` (one ``generate`` call, left-padded)."""
        hf_kwargs, until = generation_kwargs(gen_kwargs, self.args.load.get("max_new_tokens", 128), self.processor)
        inputs = self._inputs(prompts)
        if self.args.prunes:
            with sieve(self.model, **self.args.sieve_kwargs()) as active, torch.inference_mode():
                output = self.model.generate(**inputs, **hf_kwargs)
                trace = active.trace
        else:
            with torch.inference_mode():
                output = self.model.generate(**inputs, **hf_kwargs)
            trace = None
        new = output[:, inputs["input_ids"].shape[1] :]
        texts = self.processor.tokenizer.batch_decode(new, skip_special_tokens=True)
        pad = self.processor.tokenizer.pad_token_id
        answers = []
        for b, text in enumerate(texts):
            stats = token_stats(trace, b, inputs, self.image_token_id)
            stats["output_tokens"] = int((new[b] != pad).sum()) if pad is not None else int(new.shape[1])
            answers.append(Answer(cut_at_stop(text, until), stats))
        return answers

    def _inputs(self, prompts: list[Prompt]) -> dict:
        tokenizer = self.processor.tokenizer
        side = tokenizer.padding_side
        tokenizer.padding_side = "left"  # every answer starts right after its prompt
        try:
            texts = [build_prompt(self.processor, p.messages) for p in prompts]
            images = [image.convert("RGB") for p in prompts for image in p.images]
            inputs = dict(self.processor(images=images or None, text=texts, return_tensors="pt", padding=True))
        finally:
            tokenizer.padding_side = side
        device = self.model.device if self.args.load.get("device_map") else self.device
        inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        return inputs


def generation_kwargs(gen: dict, default_max_new_tokens: int, processor) -> tuple[dict, list[str]]:
    """lmms-eval's ``generation_kwargs`` as ``generate()`` keywords, and the stop strings (``until``)."""
    gen = dict(gen or {})
    until = gen.pop("until", None) or []
    until = [until] if isinstance(until, str) else list(until)
    temperature = float(gen.pop("temperature", 0.0) or 0.0)
    do_sample = bool(gen.pop("do_sample", temperature > 0))
    tokenizer = processor.tokenizer
    out = {
        "max_new_tokens": int(gen.pop("max_new_tokens", None) or default_max_new_tokens),
        "do_sample": do_sample,
        "num_beams": int(gen.pop("num_beams", 1) or 1),
        "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
    }
    top_p, top_k = gen.pop("top_p", None), gen.pop("top_k", None)
    if do_sample:
        out["temperature"] = temperature
        if top_p is not None:
            out["top_p"] = float(top_p)
        if top_k is not None:
            out["top_k"] = int(top_k)
    for key in ("repetition_penalty", "length_penalty", "min_new_tokens", "no_repeat_ngram_size"):
        if gen.get(key) is not None:
            out[key] = gen.pop(key)
    return out, until


def cut_at_stop(text: str, until: list[str]) -> str:
    for stop in until:
        if stop and stop in text:
            text = text.split(stop, 1)[0]
    return text


def token_stats(trace, b: int, inputs: dict, image_token_id: int) -> dict:
    """Visual tokens of sample ``b``: before pruning, kept after the last stage, and averaged over LLM layers."""
    ids = inputs["input_ids"][b]
    mask = inputs.get("attention_mask")
    valid = mask[b].bool() if mask is not None else torch.ones_like(ids, dtype=torch.bool)
    image_tokens = int(((ids == image_token_id) & valid).sum())
    stats = {"input_tokens": int(valid.sum()), "image_tokens": image_tokens}
    keys = sorted(key for key in (trace.images if trace is not None else {}) if key[0] == b)
    if not keys:  # unpruned (or a prompt without images)
        stats.update(visual_tokens=image_tokens, visual_tokens_layer_avg=float(image_tokens), kept_per_image=[])
        return stats
    kept = [int(trace.kept(b, i).numel()) for _, i in keys]
    stats.update(
        visual_tokens=sum(kept),
        visual_tokens_layer_avg=round(sum(trace.layer_average(b, i) for _, i in keys), 4),
        kept_per_image=kept,
    )
    return stats

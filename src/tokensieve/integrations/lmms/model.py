"""The lmms-eval ``tokensieve`` model: any supported VLM under ``tokensieve.sieve``, batched.

``--model_args pretrained=PATH,method=NAME,keep=K,<hyperparameters>`` (see :mod:`.args`). Requests are grouped
by identical generation kwargs and answered ``batch_size`` at a time; a pruning decision depends only on the
image (and prompt), never on the batch. Each answer carries a ``TokenCounts`` whose ``to_dict`` adds the visual
tokens before pruning, kept after the last stage, and averaged over the LLM layers, so ``--log_samples`` writes
them into every logged sample's ``token_counts``.

Data-parallel: under ``torchrun`` or ``accelerate launch`` lmms-eval shards documents by ``RANK``/``WORLD_SIZE``;
each rank loads the model on ``cuda:LOCAL_RANK`` (or the CPU).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
from lmms_eval.api.instance import GenerationResult, TokenCounts
from lmms_eval.api.model import lmms
from lmms_eval.protocol import ChatMessages
from tqdm.auto import tqdm

from .args import parse_model_args
from .engine import Prompt, SievedVLM


@dataclass
class SieveTokenCounts(TokenCounts):
    """lmms-eval's per-request counters plus tokensieve's visual-token counts."""

    image_tokens: int | None = None
    visual_tokens: int | None = None
    visual_tokens_layer_avg: float | None = None
    kept_per_image: list | None = None
    method: str | None = None

    def to_dict(self) -> dict:
        out = super().to_dict()
        for name in ("method", "image_tokens", "visual_tokens", "visual_tokens_layer_avg", "kept_per_image"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        return out


class _TokenSieveLMM(lmms):
    def __init__(self, pretrained: str | None = None, **kwargs) -> None:
        super().__init__()
        self._rank = int(os.environ.get("RANK", 0))
        self._world_size = int(os.environ.get("WORLD_SIZE", 1))
        kwargs.pop("max_batch_size", None)
        args = parse_model_args({"pretrained": pretrained, **kwargs})
        if not args.load.get("device") and torch.cuda.is_available():
            args.load["device"] = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        self.args = args
        self.engine = SievedVLM(args)
        self.batch_size_per_gpu = int(args.load.get("batch_size") or 1)
        self._device = torch.device(self.engine.device)
        if self._world_size > 1:
            from accelerate import Accelerator

            self.accelerator = Accelerator(cpu=self._device.type == "cpu")

    @property
    def device(self):
        return self._device

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    def _prompt(self, args) -> tuple[Prompt, dict]:
        raise NotImplementedError

    def generate_until(self, requests) -> list[GenerationResult]:
        prompts = [self._prompt(request.args) for request in requests]
        groups: dict[str, list[int]] = {}
        for index, (_, gen) in enumerate(prompts):
            groups.setdefault(json.dumps(gen, sort_keys=True, default=str), []).append(index)
        results: list[GenerationResult | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=self.rank != 0, desc="tokensieve")
        for indices in groups.values():
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                answers = self.engine.generate([prompts[i][0] for i in chunk], prompts[chunk[0]][1])
                for i, answer in zip(chunk, answers, strict=True):
                    counts = SieveTokenCounts(method=self.args.method, **answer.stats)
                    results[i] = GenerationResult(answer.text, counts)
                    key = (str(requests[i].args[0]), prompts[i][1])
                    self.cache_hook.add_partial("generate_until", key, answer.text)
                bar.update(len(chunk))
        bar.close()
        return results

    def loglikelihood(self, requests):
        raise NotImplementedError("tokensieve answers generate_until tasks only; loglikelihood tasks are not supported")

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("tokensieve does not support multi-round tasks yet")


class TokenSieveChat(_TokenSieveLMM):
    """Chat requests ``(ctx, doc_to_messages, gen_kwargs, doc_id, task, split)``."""

    is_simple = False

    def _prompt(self, args) -> tuple[Prompt, dict]:
        _, doc_to_messages, gen_kwargs, doc_id, task, split = args[:6]
        messages = ChatMessages(messages=doc_to_messages(self.task_dict[task][split][doc_id]))
        images, videos, _ = messages.extract_media()
        if videos:
            raise ValueError("tokensieve prunes image tokens; video inputs are not supported")
        return Prompt(list(images), messages.to_hf_messages()), dict(gen_kwargs)


class TokenSieveSimple(_TokenSieveLMM):
    """Simple requests ``(ctx, gen_kwargs, doc_to_visual, doc_id, task, split)``."""

    is_simple = True

    def _prompt(self, args) -> tuple[Prompt, dict]:
        ctx, gen_kwargs, doc_to_visual, doc_id, task, split = args[:6]
        visuals = [v for v in (doc_to_visual(self.task_dict[task][split][doc_id]) or []) if v is not None]
        content = [{"type": "image"} for _ in visuals] + [{"type": "text", "text": str(ctx)}]
        return Prompt(visuals, [{"role": "user", "content": content}]), dict(gen_kwargs)

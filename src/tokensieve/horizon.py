"""The information of each visual token at each decoder layer, and the information horizon (arXiv 2512.07580).

"All You Need Are Random Visual Tokens?" measures a visual token's *information* at layer ``l`` as the change of
the output probability when that token alone is removed from layer ``l`` on. Past the *information horizon*
the information of every token is about zero, which is why random pruning is as good as any criterion there.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .adapters.base import get_adapter
from .context import LLMContext
from .horizon_plot import describe_horizon, layer_information, plot_information, token_grid  # noqa: F401
from .methods.base import LLMMethod
from .sieve import sieve


@dataclass
class Drop(LLMMethod):
    """Remove chosen visual tokens from decoder ``layer`` on (a probe, not registered as a method).

    ``drop`` maps ``(sample, image)`` to the indices (into that image's original token order) removed at
    ``layer``; every other image keeps all its tokens. Positions default to ``original`` so removing a token
    does not shift the others' RoPE positions.
    """

    keep: float | int = 1.0
    layer: int = 0
    drop: dict[tuple[int, int], list[int]] = field(default_factory=dict)

    name = "drop"
    needs = frozenset()

    def budget(self, n_tokens: int, *, stage_index: int = 0, n_layers: int = 0) -> int:
        return max(0, n_tokens - 1)  # below the candidate count, so select() is always called

    def select(self, ctx: LLMContext, k: int) -> torch.Tensor:
        removed = torch.as_tensor(self.drop.get((ctx.sample, ctx.image), []), dtype=torch.long)
        keep = ~torch.isin(ctx.token_index.cpu(), removed)
        return torch.nonzero(keep).flatten().to(ctx.token_index.device)


def _last_positions(mask: torch.Tensor) -> torch.Tensor:
    """Index [B] of the last real token of each row (left or right padding)."""
    return mask.shape[1] - 1 - mask.flip(1).long().argmax(1)


def _repeat_inputs(inputs: dict, n: int) -> dict:
    """Every tensor repeated ``n`` times along dim 0: copies of the batch, images stay in sample order."""
    out = {}
    for key, value in inputs.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            out[key] = value.repeat(n, *([1] * (value.dim() - 1)))
        else:
            out[key] = value
    return out


def answer_probability(model, inputs: dict, answer_token_id: int, sample: int = 0) -> torch.Tensor:
    """Probability [copies] of ``answer_token_id`` at the last prompt position of ``sample`` in every copy of the
    batch in ``inputs`` (``inputs`` holds ``copies`` copies of a batch of ``B`` samples)."""
    with torch.no_grad():
        logits = model(**inputs).logits
    mask = inputs.get("attention_mask")
    mask = torch.ones(logits.shape[:2], dtype=torch.long) if mask is None else mask
    last = _last_positions(mask.to(logits.device))
    probs = torch.softmax(logits[torch.arange(logits.shape[0]), last].float(), dim=-1)[:, answer_token_id]
    return probs


def token_information(
    model,
    processor_inputs: dict,
    answer_token_id: int | None = None,
    layers: Sequence[int] | None = None,
    sample: int = 0,
    image: int = 0,
    batch_size: int | None = None,
    positions: str | None = "original",
) -> torch.Tensor:
    """Information of each visual token of one image at each decoder layer (arXiv 2512.07580).

    ``info[i, j] = p(a) - p_{-j@l}(a)`` with ``l = layers[i]``: ``p(a)`` is the probability of the answer token
    ``a`` at the last prompt position of ``sample`` without pruning, ``p_{-j@l}(a)`` the same with token ``j`` of
    ``image`` removed from decoder layer ``l`` on (hidden states and KV cache of layers ``>= l``; layers before
    ``l`` see it). Positive values: the token helped the answer. ``a`` is the unpruned model's greedy next token
    unless ``answer_token_id`` is given.

    Parameters
    ----------
    model : a VLM supported by the sieve.
    processor_inputs : the processor's output for a batch (every sample is run; only ``sample`` is read).
    layers : decoder layers (default all).
    batch_size : prompt copies per forward (each copy removes one token); default all ``n_tokens`` copies of the
        batch in one forward. Lower it when memory is short.
    positions : position policy after the removal (``"original"``: the other tokens keep their positions).

    Returns
    -------
    Tensor [len(layers), n_tokens] float32 on the CPU.
    """
    inputs = {k: v for k, v in dict(processor_inputs).items()}
    n_layers = get_adapter(model).n_layers
    layers = list(range(n_layers)) if layers is None else [int(x) for x in layers]
    with sieve(model, Drop(layer=0)) as s:  # keep-all pass: the reference probability and the image size
        with torch.no_grad():
            logits = model(**inputs).logits
        n_tokens = s.trace.images[(sample, image)]["n_tokens"]
    mask = inputs.get("attention_mask")
    mask = torch.ones(logits.shape[:2], dtype=torch.long) if mask is None else mask
    last = int(_last_positions(mask.to(logits.device))[sample])
    probs = torch.softmax(logits[sample, last].float(), dim=-1)
    if answer_token_id is None:
        answer_token_id = int(probs.argmax())
    reference = float(probs[answer_token_id])

    batch = int(inputs["input_ids"].shape[0])
    chunk = n_tokens if batch_size is None else max(1, int(batch_size))
    info = torch.zeros(len(layers), n_tokens)
    for i, layer in enumerate(layers):
        for start in range(0, n_tokens, chunk):
            tokens = list(range(start, min(n_tokens, start + chunk)))
            copies = _repeat_inputs(inputs, len(tokens))
            drop = {(c * batch + sample, image): [j] for c, j in enumerate(tokens)}
            with sieve(model, Drop(layer=layer, drop=drop, positions=positions)):
                p = answer_probability(model, copies, answer_token_id)
            rows = torch.arange(len(tokens)) * batch + sample
            info[i, start : start + len(tokens)] = reference - p[rows].cpu()
    return info


def information_horizon(info: torch.Tensor, threshold: float = 1e-3, layers: Sequence[int] | None = None) -> int:
    """The information horizon: the first layer from which the mean |information| stays below ``threshold``.

    Criterion: with ``m[i] = mean_j |info[i, j]|``, the horizon is ``layers[h]`` for the smallest ``h`` such that
    ``m[i] < threshold`` for every ``i >= h`` (later layers included, so a late bump moves the horizon past it).
    If even the last layer is at or above the threshold, the horizon is ``layers[-1] + 1`` (beyond the model).
    ``layers`` defaults to ``0..len(info)-1``.
    """
    m = layer_information(info)
    layers = list(range(m.shape[0])) if layers is None else list(layers)
    horizon = layers[-1] + 1
    for i in range(m.shape[0] - 1, -1, -1):
        if float(m[i]) >= threshold:
            break
        horizon = layers[i]
    return horizon


# ----- command line -----------------------------------------------------------------------------------------------
def load_model(path: str | None = None):
    """(model, processor, prompt builder): a local HF checkpoint, or the embedded model when ``path`` is None."""
    from .bench.cli import load_model as load
    from .bench.loaders import Task, build_prompt
    from .bench.metrics import exact_match
    from .embedded.synthetic import Sample

    model, processor, _ = load(path, device="cpu")
    task = Task(name="horizon", samples=[], match=exact_match, max_new_tokens=1)

    def prompt(question: str) -> str:
        sample = Sample(image=None, question=question, answer="", family="horizon", relevant_tokens=[])
        return build_prompt(processor, sample, task)

    return model, processor, prompt


def image_layout(model, inputs: dict, sample: int = 0, image: int = 0) -> dict:
    """The token layout (``trace.images`` entry) of one image, from a keep-everything pass."""
    with sieve(model, Drop(layer=0)) as s, torch.no_grad():
        model(**inputs)
    return s.trace.images[(sample, image)]


def _cmd_horizon(args: argparse.Namespace) -> int:
    from PIL import Image

    from .bench.usage import check_image, check_model_spec, check_out_file

    check_image(args.image)
    check_out_file(args.out)
    check_model_spec(args.model)
    model, processor, build_prompt = load_model(args.model)
    image = Image.open(args.image).convert("RGB")
    inputs = processor(images=[image], text=[build_prompt(args.question)], return_tensors="pt")
    dtype = next(model.parameters()).dtype
    inputs = {k: (v.to(dtype) if k == "pixel_values" else v) for k, v in inputs.items()}
    info = token_information(model, inputs, batch_size=args.batch_size)
    layers = list(range(info.shape[0]))
    horizon = information_horizon(info, threshold=args.threshold)
    for layer, value in enumerate(layer_information(info).tolist()):
        print(f"layer {layer:3d}  mean |information| {value:.6f}")
    print(f"information horizon (threshold {args.threshold:g}): {describe_horizon(horizon, layers, args.threshold)}")
    plot_information(info, args.out, horizon=horizon, title=args.question, layout=image_layout(model, inputs),
                     threshold=args.threshold, image=image)  # fmt: skip
    print(f"plot saved to {args.out}")
    return 0


def add_horizon_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``tokensieve horizon IMAGE "question" [--model PATH] [--out plot.png]`` to the CLI."""
    from .bench.usage import positive_int

    p = subparsers.add_parser(
        "horizon",
        help="per-layer information of each visual token and the information horizon (arXiv 2512.07580)",
    )
    p.add_argument("image", help="image file")
    p.add_argument("question", help="question about the image")
    p.add_argument("--model", default=None, help="local HF checkpoint (default: the embedded model)")
    p.add_argument("--out", default="horizon.png", help="where to save the plot (PNG)")
    p.add_argument("--threshold", type=float, default=1e-3, help="mean |information| below which a layer is quiet")
    p.add_argument("--batch-size", type=positive_int, default=None, help="prompt copies per forward (default: all)")
    p.set_defaults(func=_cmd_horizon)
    return p

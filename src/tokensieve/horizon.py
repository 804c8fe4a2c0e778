"""The information of each visual token at each decoder layer, and the information horizon (arXiv 2512.07580).

"All You Need Are Random Visual Tokens?" measures a visual token's *information* at layer ``l`` as the change of
the output probability when that token alone is removed from layer ``l`` on. Past the *information horizon*
the information of every token is about zero, which is why random pruning is as good as any criterion there.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .adapters.base import get_adapter
from .context import LLMContext
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


def layer_information(info: torch.Tensor) -> torch.Tensor:
    """Mean absolute information per layer, [n_layers]."""
    return info.abs().float().mean(1)


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


def plot_information(
    info: torch.Tensor,
    path: str | Path,
    layers: Sequence[int] | None = None,
    horizon: int | None = None,
    title: str | None = None,
) -> Path:
    """Save a PNG: heatmap of information [layer x token] and the mean |information| per layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = list(range(info.shape[0])) if layers is None else list(layers)
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [2, 1]})
    lim = float(info.abs().max()) or 1.0
    im = ax0.imshow(info.numpy(), aspect="auto", cmap="coolwarm", vmin=-lim, vmax=lim, interpolation="nearest")
    ax0.set_yticks(range(len(layers)), [str(x) for x in layers])
    ax0.set_xlabel("visual token")
    ax0.set_ylabel("decoder layer (removed from here on)")
    fig.colorbar(im, ax=ax0, label="p(answer) - p(answer | token removed)")
    ax1.plot(layers, layer_information(info).numpy(), marker="o")
    ax1.set_xlabel("decoder layer")
    ax1.set_ylabel("mean |information|")
    if horizon is not None:
        ax1.axvline(horizon, color="k", linestyle="--", label=f"horizon = {horizon}")
        ax1.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ----- command line -----------------------------------------------------------------------------------------------
def load_model(path: str | None = None):
    """(model, processor, prompt builder): a local HF checkpoint, or the embedded model when ``path`` is None."""
    if path is None:
        from .embedded.build import EMBEDDED_DIR, load_embedded
        from .embedded.synthetic import IMAGE_TOKEN, turn_text

        if not (EMBEDDED_DIR / "config.json").exists() or not any(EMBEDDED_DIR.glob("*.safetensors")):
            raise FileNotFoundError(
                f"the embedded model's weights are not in {EMBEDDED_DIR}; train them with `tokensieve train-tiny` "
                f"or pass --model PATH to a local LLaVA / LLaVA-NeXT / Qwen2-VL checkpoint"
            )
        model, processor = load_embedded()
        return model, processor, lambda question: f"{IMAGE_TOKEN} {turn_text(question)}"
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    processor = AutoProcessor.from_pretrained(path)

    def build_prompt(question: str) -> str:
        image_token = getattr(processor, "image_token", "<image>")
        if image_token in question:
            return question
        if getattr(processor, "chat_template", None):
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
            return processor.apply_chat_template(messages, add_generation_prompt=True)
        return f"{image_token} {question}"

    return model, processor, build_prompt


def _cmd_horizon(args: argparse.Namespace) -> int:
    from PIL import Image

    model, processor, build_prompt = load_model(args.model)
    image = Image.open(args.image).convert("RGB")
    inputs = processor(images=[image], text=[build_prompt(args.question)], return_tensors="pt")
    dtype = next(model.parameters()).dtype
    inputs = {k: (v.to(dtype) if k == "pixel_values" else v) for k, v in inputs.items()}
    info = token_information(model, inputs, batch_size=args.batch_size)
    horizon = information_horizon(info, threshold=args.threshold)
    for layer, value in enumerate(layer_information(info).tolist()):
        print(f"layer {layer:3d}  mean |information| {value:.6f}")
    print(f"information horizon (threshold {args.threshold:g}): layer {horizon}")
    plot_information(info, args.out, horizon=horizon, title=args.question)
    print(f"plot saved to {args.out}")
    return 0


def add_horizon_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``tokensieve horizon IMAGE "question" [--model PATH] [--out plot.png]`` to the CLI."""
    p = subparsers.add_parser(
        "horizon",
        help="per-layer information of each visual token and the information horizon (arXiv 2512.07580)",
    )
    p.add_argument("image", help="image file")
    p.add_argument("question", help="question about the image")
    p.add_argument("--model", default=None, help="local HF checkpoint (default: the embedded model)")
    p.add_argument("--out", default="horizon.png", help="where to save the plot (PNG)")
    p.add_argument("--threshold", type=float, default=1e-3, help="mean |information| below which a layer is quiet")
    p.add_argument("--batch-size", type=int, default=None, help="prompt copies per forward (default: all tokens)")
    p.set_defaults(func=_cmd_horizon)
    return p

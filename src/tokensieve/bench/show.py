"""``tokensieve show IMAGE QUESTION``: one answer under a method, and a titled overlay of the kept tokens."""

from __future__ import annotations

import argparse

from ..budget import Keep
from .cli import load_model, parse_keep, parse_methods
from .usage import check_device, check_dtype, check_image, check_model_spec, check_out_file, positive_int

REFERENCE = "none"


def add_show_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``show`` on an argparse sub-parser collection (sets ``func``)."""
    p = subparsers.add_parser(
        "show",
        help="answer one question about one image under a method and write the kept-token overlay",
        description="Answer QUESTION about IMAGE with the visual tokens pruned by --method and write an overlay "
        "of the kept tokens (dropped patches darkened), titled with the method, keep, question and answer. "
        "--method none answers with the unpruned model.",
    )
    p.add_argument("image", help="image file")
    p.add_argument("question", help="question text")
    p.add_argument("--method", default="zoo", type=lambda t: parse_methods(t, allow_none=True),
                   help="method name, comma-separated names composed in order, or none (unpruned)")  # fmt: skip
    p.add_argument("--keep", type=parse_keep, default="0.25", help="tokens per image (int) or fraction (float)")
    p.add_argument("--model", default=None, help="HF VLM id or local path (default: the embedded model)")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--out", default="overlay.png", help="overlay PNG (default %(default)s)")
    p.add_argument("--max-new-tokens", type=positive_int, default=16)
    p.add_argument("--view", default="auto", choices=("auto", "stretch", "center_crop", "pad"),
                   help="how a square token grid maps onto a non-square image")  # fmt: skip
    p.set_defaults(func=cmd_show)
    return p


def _inputs(model, processor, image, question: str, max_new_tokens: int) -> dict:
    import torch

    from ..embedded.synthetic import Sample
    from .loaders import Task, build_prompt
    from .metrics import exact_match

    sample = Sample(image=image, question=question, answer="", family="show", relevant_tokens=[])
    task = Task(name="show", samples=[sample], match=exact_match, max_new_tokens=max_new_tokens)
    inputs = processor(images=[image], text=[build_prompt(processor, sample, task)], return_tensors="pt")
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    return inputs


def show(
    model, processor, image, question: str, method: str | list[str], keep: Keep, max_new_tokens: int = 16
) -> tuple[str, list[int] | None, dict]:
    """Answer ``question`` about ``image`` under the sieve: ``(answer, kept indices, trace image info)``.

    ``method="none"``: the unpruned model (``kept`` is ``None``; the layout comes from a keep-everything pass)."""
    import torch

    from ..sieve import sieve

    inputs = _inputs(model, processor, image, question, max_new_tokens)
    tokenizer = processor.tokenizer
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    unpruned = method == REFERENCE
    with sieve(model, "random" if unpruned else method, keep=1.0 if unpruned else keep) as active:
        with torch.inference_mode():
            if unpruned:  # the layout only: the answer comes from the plain model below
                model(**inputs)
            else:
                output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
    if unpruned:
        with torch.inference_mode():
            output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    image_index = max(i for s, i in active.trace.images if s == 0)
    kept = None if unpruned else active.trace.kept(0, image_index).tolist()
    return " ".join(answer.split()), kept, active.trace.images[(0, image_index)]


def cmd_show(args: argparse.Namespace) -> int:
    from PIL import Image

    from ..viz import save_overlay

    methods = args.method if isinstance(args.method, list) else parse_methods(args.method, allow_none=True)
    check_image(args.image)
    out = check_out_file(args.out)
    check_model_spec(args.model)
    check_device(args.device)
    check_dtype(args.dtype)
    method: str | list[str] = methods[0] if len(methods) == 1 else methods
    model, processor, name = load_model(args.model, args.device, args.dtype)
    with Image.open(args.image) as file:
        image = file.convert("RGB")
    answer, kept, info = show(model, processor, image, args.question, method, args.keep, args.max_new_tokens)
    label = "+".join(methods)
    n_kept = info["n_tokens"] if kept is None else len(kept)
    budget = "unpruned" if method == REFERENCE else f"keep={args.keep!r}"
    title = f"{label} ({budget}): {n_kept}/{info['n_tokens']} visual tokens"
    title += f"\nQ: {args.question}\nA: {answer or '(empty answer)'}"
    save_overlay(image, kept, info, out, title, view=args.view)
    print(f"answer: {answer}")
    print(f"{label} {budget}: kept {n_kept}/{info['n_tokens']} visual tokens ({name}); overlay: {out}")
    return 0

"""Train the embedded LLaVA from scratch on the synthetic tasks (CPU; step budget with a wall-clock cap).

Recipe (``/work/shared/research/feasibility.md`` explains the visual-token collapse it avoids):

- multi-turn prompts: one image, up to eight questions (one built for a balanced answer, the rest derived
  from the same scene), answers closed by ``</s>``; a small share of rows hold several images (in-context
  style) so multi-image prompts stay in distribution;
- loss: cross-entropy on answer tokens
  + a dense auxiliary loss on the projected visual tokens: a training-only linear head on the
  RMS-normalised features classifies, for every visual token, the object under it (shape x colour), the
  digit printed on it, whether it is an object's centre token (counting objects rather than area), and its
  grid row and column (position questions). Without it the visual tokens collapse;
  + two attention "pointer" losses (training only; they shape the model's own attention, nothing is
  added to it): at each position that predicts an answer word (``answer:`` and, for two-word answers, the
  first word), two heads of LM layer 0 attend to the question's colour/shape
  words, and two heads of layer 1 attend to the centre tokens of the objects those words describe (plus the
  sequence start for existence/count questions, a sink that lets "none" and counts be read out). With
  answer + dense aux losses alone the LM stayed at the text prior for 25 min on this task;
- AdamW, warmup then cosine decay over the budget (steps, or the wall-clock cap if that comes first; on a
  shared CPU the cap keeps the schedule complete), fp32 (bf16 autocast was slower here), gradient clipping.

This is the recipe of the v1 weights, shipped until v2 replaced them (``tokensieve train-tiny`` runs the v2
recipe in :mod:`tokensieve.embedded.train`). They came from
``python -m tokensieve.embedded.train_v1 --minutes 57 --steps 9000 --eval-every-steps 600 --out-dir DIR``
(the wall-clock cap ended it at 5,838 steps, 95k images, 57 min on 2 cores; best validation checkpoint, val
99.5%; its log is ``docs/embedded_v1_training_log.txt``). Reading and counting are learned last: reading stayed
at chance until about step 3,000, then reached 100% by step 4,200.
The saved artefact is a plain HF ``LlavaForConditionalGeneration`` plus processor (``save_pretrained``).
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tokensieve.embedded.batches import BatchBuilder, pixel_tensor  # noqa: F401  (re-exported)
from tokensieve.embedded.build import (
    EMBEDDED_DIR,
    build_config,
    build_model,
    build_processor,
    build_tokenizer,
)
from tokensieve.embedded.evaluate import accuracy, answer
from tokensieve.embedded.losses_v1 import AUX_HEADS, forward_losses, pointer_loss  # noqa: F401
from tokensieve.embedded.synthetic import (
    FAMILIES,
    make_incontext,
    make_split,
    make_training_example,
)


@dataclass
class TrainConfig:
    """Hyperparameters of one training run."""

    steps: int = 3600
    minutes: float = 50.0  # wall-clock cap
    seed: int = 0
    batch_size: int = 16
    lr: float = 1.5e-3
    weight_decay: float = 0.05
    warmup_steps: int = 150
    min_lr_ratio: float = 0.05
    aux_weight: float = 1.0
    pointer_weight: float = 1.0
    pointer_layer: int = 1
    pointer_heads: int = 2
    multi_image_fraction: float = 0.08
    vision_hidden: int = 128
    vision_layers: int = 2
    text_hidden: int = 128
    text_layers: int = 3
    heads: int = 4
    bf16: bool = False  # bf16 autocast was ~10x slower than fp32 on the 2-core CPU used
    eval_every_steps: int = 600
    eval_every_minutes: float = 12.0
    eval_per_family: int = 40
    threads: int = 2


def sample_rows(rng: np.random.Generator, batch_size: int, multi_image_fraction: float) -> list:
    """A batch: usually single-image multi-turn rows; sometimes half as many rows of 2-3 images each."""
    if rng.random() < multi_image_fraction:
        rows = []
        for _ in range(max(1, batch_size // 2)):
            demos = [make_training_example(rng, max_turns=1, layout="v1") for _ in range(int(rng.integers(1, 3)))]
            rows.append(demos + [make_training_example(rng, max_turns=2, layout="v1")])
        return rows
    return [[make_training_example(rng, layout="v1")] for _ in range(batch_size)]


def evaluate_model(model, processor, samples, incontext) -> dict[str, float]:
    """Validation accuracy per family, plus in-context (multi-image) mean."""
    model.eval()
    result = accuracy(samples, answer(model, processor, samples, batch_size=40))
    result["incontext"] = accuracy(incontext, answer(model, processor, incontext, batch_size=20))["mean"]
    model.train()
    return result


def _format(scores: dict[str, float]) -> str:
    return " ".join(f"{k} {100 * v:5.1f}" for k, v in scores.items())


def train(out_dir: str | Path = EMBEDDED_DIR, minutes: float = 50.0, seed: int = 0, **overrides) -> dict:
    """Train for ``steps`` steps or ``minutes`` of wall time, whichever ends first.

    Saves the best-on-validation model + processor in ``out_dir``.

    Returns the final validation scores of the saved model.
    """
    config = TrainConfig(minutes=minutes, seed=seed, **overrides)
    torch.set_num_threads(config.threads)
    out_dir = Path(out_dir)
    tokenizer = build_tokenizer()
    processor = build_processor(tokenizer)
    model = build_model(
        build_config(
            tokenizer,
            vision_hidden=config.vision_hidden,
            vision_layers=config.vision_layers,
            text_hidden=config.text_hidden,
            text_layers=config.text_layers,
            heads=config.heads,
        ),
        seed=seed,
    )
    model.train()
    image_tokens = (model.config.vision_config.image_size // model.config.vision_config.patch_size) ** 2
    aux_head = nn.Linear(model.config.text_config.hidden_size, sum(AUX_HEADS.values()))
    parameters = list(model.parameters()) + list(aux_head.parameters())
    decay = [p for p in parameters if p.ndim >= 2]
    no_decay = [p for p in parameters if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr,
        betas=(0.9, 0.98),
    )
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"model: {n_params / 1e6:.2f}M parameters, {image_tokens} visual tokens per image; {config}",
        flush=True,
    )

    builder = BatchBuilder(tokenizer, image_tokens)
    rng = np.random.default_rng([0, seed])
    val_samples = make_split("val", config.eval_per_family, layout="v1")
    val_incontext = make_incontext(4 * len(FAMILIES), shots=2, seed=10_000 + seed, layout="v1")
    budget = 60.0 * config.minutes
    start = time.perf_counter()
    next_eval = 60.0 * config.eval_every_minutes
    best_mean, best_scores, step, images_seen = -1.0, {}, 0, 0
    running: dict[str, float] = {}

    def save_if_best(scores: dict[str, float]) -> None:
        nonlocal best_mean, best_scores
        if scores["mean"] >= best_mean:
            best_mean, best_scores = scores["mean"], scores
            model.save_pretrained(out_dir)
            processor.save_pretrained(out_dir)
            print(f"  saved to {out_dir} (val mean {100 * best_mean:.1f})", flush=True)

    while True:
        elapsed = time.perf_counter() - start
        if elapsed >= budget or step >= config.steps:
            break
        progress = max(elapsed / budget, step / config.steps)
        warm = min(1.0, (step + 1) / config.warmup_steps)
        cosine = config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        for group in optimizer.param_groups:
            group["lr"] = config.lr * warm * cosine

        batch = builder.batch(sample_rows(rng, config.batch_size, config.multi_image_fraction))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.bf16):
            losses = forward_losses(model, aux_head, batch, config.pointer_layer, config.pointer_heads)
        aux = sum(v for k, v in losses.items() if k.startswith("aux_")) / len(AUX_HEADS)
        pointers = losses.get("pointer", 0.0) + losses.get("word", 0.0)
        loss = losses["answer"] + config.aux_weight * aux + config.pointer_weight * pointers
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        step += 1
        images_seen += batch["pixel_values"].shape[0]
        for k, v in losses.items():
            running[k] = 0.98 * running.get(k, float(v.detach())) + 0.02 * float(v.detach())
        if step % 50 == 0:
            rate = images_seen / (time.perf_counter() - start)
            print(
                f"step {step} t {elapsed / 60:5.1f}m cpu {time.process_time() / 60:5.1f}m "
                f"img {images_seen} ({rate:.0f}/s) "
                f"lr {optimizer.param_groups[0]['lr']:.2e} " + " ".join(f"{k} {v:.3f}" for k, v in running.items()),
                flush=True,
            )
        if step % config.eval_every_steps == 0 or time.perf_counter() - start >= next_eval:
            next_eval = time.perf_counter() - start + 60.0 * config.eval_every_minutes
            scores = evaluate_model(model, processor, val_samples, val_incontext)
            print(
                f"eval step {step} t {(time.perf_counter() - start) / 60:.1f}m val {_format(scores)}",
                flush=True,
            )
            save_if_best(scores)

    scores = evaluate_model(model, processor, val_samples, val_incontext)
    print(f"final step {step} t {(time.perf_counter() - start) / 60:.1f}m val {_format(scores)}", flush=True)
    save_if_best(scores)
    print(
        f"best val {_format(best_scores)}; wall {(time.perf_counter() - start) / 60:.1f} min, "
        f"process cpu {time.process_time() / 60:.1f} min",
        flush=True,
    )
    return best_scores


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train the embedded tiny LLaVA on the synthetic VQA tasks.")
    parser.add_argument("--out-dir", default="runs/embedded-v1", help="never the shipped folder by default")
    parser.add_argument("--steps", type=int, default=TrainConfig.steps)
    parser.add_argument("--minutes", type=float, default=TrainConfig.minutes, help="wall-clock cap")
    parser.add_argument("--seed", type=int, default=TrainConfig.seed)
    parser.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    parser.add_argument("--lr", type=float, default=TrainConfig.lr)
    parser.add_argument("--aux-weight", type=float, default=TrainConfig.aux_weight)
    parser.add_argument("--pointer-weight", type=float, default=TrainConfig.pointer_weight)
    parser.add_argument("--multi-image-fraction", type=float, default=TrainConfig.multi_image_fraction)
    parser.add_argument("--vision-hidden", type=int, default=TrainConfig.vision_hidden)
    parser.add_argument("--vision-layers", type=int, default=TrainConfig.vision_layers)
    parser.add_argument("--text-hidden", type=int, default=TrainConfig.text_hidden)
    parser.add_argument("--text-layers", type=int, default=TrainConfig.text_layers)
    parser.add_argument("--eval-every-steps", type=int, default=TrainConfig.eval_every_steps)
    parser.add_argument("--eval-every-minutes", type=float, default=TrainConfig.eval_every_minutes)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (slower than fp32 on some CPUs)")
    args = parser.parse_args(argv)
    if Path(args.out_dir).resolve() == EMBEDDED_DIR:
        parser.error("--out-dir is the shipped weights' folder; train elsewhere and copy the result there")
    train(
        args.out_dir,
        minutes=args.minutes,
        seed=args.seed,
        batch_size=args.batch_size,
        lr=args.lr,
        aux_weight=args.aux_weight,
        pointer_weight=args.pointer_weight,
        multi_image_fraction=args.multi_image_fraction,
        vision_hidden=args.vision_hidden,
        vision_layers=args.vision_layers,
        text_hidden=args.text_hidden,
        text_layers=args.text_layers,
        steps=args.steps,
        eval_every_steps=args.eval_every_steps,
        eval_every_minutes=args.eval_every_minutes,
        bf16=args.bf16,
    )


if __name__ == "__main__":
    main()

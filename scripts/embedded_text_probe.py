"""How fast does the v2 decoder alone learn the embedded questions? A diagnostic, not part of the recipe.

Each row is a scene written as text (its caption, then `` .``) followed by its question turns, in the
instruction format (``q answer: a </s>``), with the loss on the answers only: no image, no projector. It prints
the answer-token accuracy (teacher forced, ``</s>`` excluded), overall and per question family, on 64
held-out scenes every 100 steps.

``PYTHONPATH=src python scripts/embedded_text_probe.py --layers 12 --lr 1.5e-3 --steps 400``
(docs/embedded.md, "The third run", has the figures).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from tokensieve.embedded.clip_stage import caption
from tokensieve.embedded.run import STAGES, Run, V2Config
from tokensieve.embedded.stages import collate, examples
from tokensieve.embedded.vocabulary import ANSWER_MARK

FAMILY_OF_QUESTION = (("how many", "count"), ("is there", "exist"), ("where", "position"), ("what number", "read"))


def family_of(question: str) -> str:
    return next((family for start, family in FAMILY_OF_QUESTION if question.startswith(start)), "color")


def text_rows(builder, rng: np.random.Generator, n: int, every_token: bool = False) -> dict[str, torch.Tensor]:
    """Right-padded rows and, under ``"family"``, each answer token's question family (``""`` elsewhere)."""
    rows, families = [], []
    for example in examples(rng, n):
        ids = [builder.bos_id] + builder._ids(caption(example.scene) + " .")
        labels = [-100] * len(ids)
        family = [""] * len(ids)
        for question, reply in example.turns:
            prompt = builder._ids(f"{question} {ANSWER_MARK}")
            target = builder._ids(reply) + [builder.eos_id]
            ids += prompt + target
            labels += [-100] * len(prompt) + target
            family += [""] * len(prompt) + [family_of(question)] * len(target)
        rows.append((ids, list(ids) if every_token else labels))
        families.append(family)
    return {**collate(rows, builder.pad_id), "family": families}


def copy_rows(builder, rng: np.random.Generator, n: int) -> dict[str, torch.Tensor]:
    """``<s> caption . caption </s>`` with the loss on the second copy: a pretraining task that forms induction
    (match-and-copy) heads, which looking an object up in the caption needs."""
    rows = []
    for example in examples(rng, n, max_turns=1):
        first = [builder.bos_id] + builder._ids(caption(example.scene) + " .")
        second = builder._ids(caption(example.scene)) + [builder.eos_id]
        rows.append((first + second, [-100] * len(first) + second))
    return collate(rows, builder.pad_id)


@torch.no_grad()
def answer_accuracy(model, batch: dict, eos_id: int) -> dict[str, float]:
    """Answer-token accuracy (``</s>`` excluded), overall (``"all"``) and per question family."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    predicted, gold = logits[:, :-1].argmax(-1), batch["labels"][:, 1:]
    scored = (gold != -100) & (gold != eos_id)
    right = predicted == gold
    width = gold.shape[1]
    family = np.array([(row + [""] * (width + 1))[1 : width + 1] for row in batch["family"]])
    result = {"all": float(right[scored].float().mean())}
    for name in sorted(set(family[scored.numpy()])):
        mask = scored & torch.from_numpy(family == name)
        result[name] = float(right[mask].float().mean())
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--lr", type=float, default=1.5e-3)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=128, help="decoder width (the vision tower keeps 128)")
    parser.add_argument("--heads", type=int, default=4)
    every = "next-token loss on every token, as in LM pretraining (default: on the answers only)"
    parser.add_argument("--every-token", action="store_true", help=every)
    parser.add_argument("--copy-steps", type=int, default=0, help="first train this many steps on caption copying")
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = V2Config(text_layers=args.layers, text_hidden=args.hidden, heads=args.heads)
    run = Run(config, Path(tempfile.mkdtemp()))
    run.stage = STAGES.index("align")  # the decoder and projector train, the vision tower is frozen
    run.new_optimizer()
    rng, held_out = np.random.default_rng(7), text_rows(run.builder, np.random.default_rng(99), 64)
    start = time.perf_counter()
    for step in range(args.steps):
        for group in run.optimizer.param_groups:
            group["lr"] = run.lr_at(step, args.steps, args.lr)
        if step < args.copy_steps:
            batch = copy_rows(run.builder, rng, args.batch)
        else:
            batch = text_rows(run.builder, rng, args.batch, args.every_token)
            batch.pop("family")
        loss = run.model(**batch).loss
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(run.trainable(), 1.0)
        run.optimizer.step()
        if (step + 1) % 100 == 0:
            run.model.eval()
            accuracy = answer_accuracy(run.model, held_out, run.builder.eos_id)
            run.model.train()
            minutes = (time.perf_counter() - start) / 60
            scores = " ".join(f"{name} {value:.3f}" for name, value in accuracy.items())
            setting = f"layers {args.layers} hidden {args.hidden} heads {args.heads} every-token {args.every_token}"
            setting += f" copy-steps {args.copy_steps}"
            print(f"{setting} lr {args.lr} step {step + 1}: answer-token accuracy {scores} "
                  f"({minutes:.1f} min)", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()

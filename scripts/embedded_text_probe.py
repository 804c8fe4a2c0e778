"""How fast does the v2 decoder alone learn the embedded questions? A diagnostic, not part of the recipe.

Each row is a scene written as text (its caption, then `` .``) followed by its question turns, in the
instruction format (``q answer: a </s>``), with the loss on the answers only: no image, no projector. It prints
the answer-token accuracy (teacher forced, ``</s>`` excluded) on 64 held-out scenes every 100 steps.

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


def text_rows(builder, rng: np.random.Generator, n: int) -> dict[str, torch.Tensor]:
    rows = []
    for example in examples(rng, n):
        ids = [builder.bos_id] + builder._ids(caption(example.scene) + " .")
        labels = [-100] * len(ids)
        for question, reply in example.turns:
            prompt = builder._ids(f"{question} {ANSWER_MARK}")
            target = builder._ids(reply) + [builder.eos_id]
            ids += prompt + target
            labels += [-100] * len(prompt) + target
        rows.append((ids, labels))
    return collate(rows, builder.pad_id)


@torch.no_grad()
def answer_accuracy(model, batch: dict[str, torch.Tensor], eos_id: int) -> float:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    predicted, gold = logits[:, :-1].argmax(-1), batch["labels"][:, 1:]
    scored = (gold != -100) & (gold != eos_id)
    return float((predicted[scored] == gold[scored]).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--lr", type=float, default=1.5e-3)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(1)
    run = Run(V2Config(text_layers=args.layers), Path(tempfile.mkdtemp()))
    run.stage = STAGES.index("align")  # the decoder and projector train, the vision tower is frozen
    run.new_optimizer()
    rng, held_out = np.random.default_rng(7), text_rows(run.builder, np.random.default_rng(99), 64)
    start = time.perf_counter()
    for step in range(args.steps):
        for group in run.optimizer.param_groups:
            group["lr"] = run.lr_at(step, args.steps, args.lr)
        loss = run.model(**text_rows(run.builder, rng, args.batch)).loss
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(run.trainable(), 1.0)
        run.optimizer.step()
        if (step + 1) % 100 == 0:
            run.model.eval()
            accuracy = answer_accuracy(run.model, held_out, run.builder.eos_id)
            run.model.train()
            minutes = (time.perf_counter() - start) / 60
            print(f"layers {args.layers} lr {args.lr} step {step + 1}: answer-token accuracy {accuracy:.3f} "
                  f"({minutes:.1f} min)", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()

"""Train the embedded long-context LM (a small Llama) from scratch on the synthetic retrieval tasks.

    nice -n 10 PYTHONPATH=src python scripts/kv_train.py --out src/tokensieve/kv/model --minutes 40

Checkpoints every ``--ckpt-every`` steps to ``<out>/train_state.pt`` (model, optimiser, step, elapsed time, RNG)
and resumes from it, so an interrupted run continues; the time box counts across resumes. At the end it
saves the model (safetensors, ~1 MB) and ``meta.json`` with the dense accuracy per task and length.
Loss: cross-entropy on answer tokens only. Length curriculum 128 -> 1024 over the time box; up to 16 extra
questions per sequence (MQAR style).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from tokensieve.kv.embedded import dense_accuracy
from tokensieve.kv.tasks import PAD, VOCAB, training_sequence

CONFIG = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=192, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=8192, rope_theta=10000.0,
              tie_word_embeddings=True, pad_token_id=PAD, bos_token_id=1, eos_token_id=2)


def batch(step_rng: random.Random, length: int, tokens_per_step: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(1, tokens_per_step // length)
    seqs = [training_sequence(length, step_rng, extra=16) for _ in range(n)]
    width = max(len(t) for t, _ in seqs)
    ids = torch.full((n, width), PAD, dtype=torch.long)
    labels = torch.full((n, width), -100, dtype=torch.long)
    for i, (t, y) in enumerate(seqs):
        ids[i, : len(t)] = torch.tensor(t)
        labels[i, : len(y)] = torch.tensor(y)
    return ids, labels


def curriculum_length(frac: float, rng: random.Random) -> int:
    top = min(3, int(frac * 5))  # 128, 256, 512, 1024 (CPU-bound: short contexts, many questions each)
    return 128 * 2 ** rng.randint(max(0, top - 2), top)


def evaluate(model, lengths: list[int], n: int, seed: int = 1234) -> dict:
    model.eval()
    acc = dense_accuracy(model, lengths, n, seed)
    model.train()
    return acc


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="src/tokensieve/kv/model")
    ap.add_argument("--minutes", type=float, default=40.0)
    ap.add_argument("--tokens-per-step", type=int, default=2048)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--ckpt-every", type=int, default=25)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--state", default=None, help="checkpoint path (default <out>/train_state.pt; not shipped)")
    ap.add_argument("--eval-n", type=int, default=40)
    ap.add_argument("--eval-lengths", default="512,1024,2048,4096")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**CONFIG, attn_implementation="sdpa"))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    state_path = Path(args.state) if args.state else out / "train_state.pt"
    step, elapsed, rng, log = 0, 0.0, random.Random(0), []
    if state_path.exists():
        st = torch.load(state_path, weights_only=False)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        step, elapsed, log = st["step"], st["elapsed"], st["log"]
        rng.setstate(st["rng"])
        print(f"resumed at step {step}, {elapsed / 60:.1f} min")
    budget = args.minutes * 60
    model.train()
    while elapsed < budget:
        t0 = time.perf_counter()
        frac = elapsed / budget
        length = curriculum_length(frac, rng)
        ids, labels = batch(rng, length, args.tokens_per_step)
        lr = args.lr * min(1.0, (step + 1) / 20) * (0.1 + 0.9 * (1 - frac))
        for group in opt.param_groups:
            group["lr"] = lr
        hidden = model.model(ids).last_hidden_state
        on = labels != -100  # the LM head only where there is an answer token (CPU time)
        logits = model.lm_head(hidden[on])
        loss = F.cross_entropy(logits, labels[on])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        elapsed += time.perf_counter() - t0
        log.append((step, round(elapsed, 1), length, round(loss.item(), 4)))
        if step % 10 == 0:
            print(f"step {step} {elapsed / 60:.1f}min L={length} loss={loss.item():.3f}", flush=True)
        if step % args.ckpt_every == 0:
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "elapsed": elapsed,
                        "log": log, "rng": rng.getstate()}, state_path)
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    acc = evaluate(model, [int(x) for x in args.eval_lengths.split(",")], args.eval_n)
    meta = {"steps": step, "eval_n": args.eval_n, "eval_lengths": args.eval_lengths,
            "train_minutes": round(elapsed / 60, 1), "dense_accuracy": acc,
            "final_loss": log[-1][3] if log else None, "config": CONFIG}
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    print(json.dumps(acc, indent=1))


if __name__ == "__main__":
    main()

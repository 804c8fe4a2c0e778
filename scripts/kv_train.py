"""Train the embedded long-context LM (a small Llama) from scratch on the synthetic retrieval tasks.

    OMP_NUM_THREADS=1 nice -n 5 PYTHONPATH=src python scripts/kv_train.py --threads 1 --minutes 100 \
        --state /work/kvtrain2/state.pt --out src/tokensieve/kv/model

``--curriculum 64:4096`` replaces the fixed length mix by the accuracy-driven ladder of
``tokensieve.kv.curriculum`` (in-loop dense check every ``--check-every`` steps, ``--gate-tasks`` at
``--threshold`` open the next doubling, ``--replay`` of the steps stay on the shorter rungs); docs/kv/embedded_model.md.

Checkpoints every ``--ckpt-every`` steps to ``--state`` (model, optimiser, step, elapsed time, RNG, log) and
resumes from it, so an interrupted run continues; the time box counts across resumes. At the end it saves the
model (safetensors) and ``meta.json`` with the recipe and the dense accuracy per task and length.

Recipe: loss on answer tokens only (the LM head runs only there); each sequence is one task sample plus up to
``--extra`` MQAR-style questions on its distractor needles. Lengths are drawn per step from ``--lengths``
(``L:weight,...``); before ``--warm-frac`` of the time box they come from ``--warm-lengths`` (64-128 tokens, few
distractors): attention starts uniform, so the gradient towards the lookup circuit shrinks with the context length
and the plateau before it forms is far shorter on short sequences.
``--key-label`` (default): the question's key token is also labelled with the answer, an auxiliary target
where the lookup is a plain induction step (the token after the earlier occurrence of the current one), which a
small model finds far sooner than the lookup from ``A`` (that needs the key moved there first); evaluation is
unchanged (the answer after ``Q key A``). Tasks are drawn with ``--task-weights``.
``--attn-weight W`` adds W times a training-only supervision of the retrieval circuit's attention
(``tokensieve.kv.train_attention``); ``--grow-from STATE`` starts a deeper model from a shallower run's state
(``tokensieve.kv.train_grow``); ``--chain`` picks the chain head's targets and ``--group`` makes key groups among
the distractors (training only). The shipped model's commands: docs/kv/embedded_model.md.
lr: linear warm-up, then cosine to 10%.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from tokensieve.kv.curriculum import Curriculum, make_schedule
from tokensieve.kv.embedded import dense_accuracy, task_accuracy
from tokensieve.kv.tasks import PAD, TASKS, VOCAB, fits
from tokensieve.kv.train_attention import CHAINS, AttentionSupervisor
from tokensieve.kv.train_batch import batch, draw_length, parse_weights
from tokensieve.kv.train_grow import grow_into


def model_config(args: argparse.Namespace) -> dict:
    return dict(vocab_size=VOCAB, hidden_size=args.hidden, intermediate_size=args.inter or 2 * args.hidden,
                num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                head_dim=args.hidden // args.heads, max_position_embeddings=8192, rope_theta=args.rope_theta,
                tie_word_embeddings=True, pad_token_id=PAD, bos_token_id=1, eos_token_id=2)


def lr_at(step: int, frac: float, base: float, warmup: int) -> float:
    return base * min(1.0, (step + 1) / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * min(frac, 1.0))))


def train_step(model, opt, ids: torch.Tensor, labels: torch.Tensor, sup: AttentionSupervisor | None = None,
               attn_weight: float = 0.0) -> float:
    if sup is not None:
        sup.set_batch(ids, labels)
    hidden = model.model(ids).last_hidden_state
    on = labels != -100
    loss = F.cross_entropy(model.lm_head(hidden[on]), labels[on])
    if sup is not None:
        loss = loss + attn_weight * sup.loss()
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss.item()


def arguments() -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="src/tokensieve/kv/model")
    ap.add_argument("--minutes", type=float, default=100.0)
    ap.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0: time box only)")
    ap.add_argument("--tokens-per-step", type=int, default=4096)
    ap.add_argument("--lengths", default="256:3,512:3,1024:2,2048:1")
    ap.add_argument("--warm-frac", type=float, default=0.15)
    ap.add_argument("--warm-lengths", default="64:2,128:1", help="length mix before --warm-frac of the time box")
    ap.add_argument("--task-weights", default="1,1,2,1", help=f"weights of {','.join(TASKS)}")
    ap.add_argument("--extra", type=int, default=16)
    ap.add_argument("--key-label", action=argparse.BooleanOptionalAction, default=True,
                    help="also label each question's key token with its answer (auxiliary induction target)")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--inter", type=int, default=0)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--rope-theta", type=float, default=10000.0)
    ap.add_argument("--ckpt-every", type=int, default=25)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--state", default=None, help="checkpoint path (default <out>/train_state.pt; keep it out of git)")
    ap.add_argument("--eval-n", type=int, default=40)
    ap.add_argument("--eval-lengths", default="512,1024,2048,4096")
    ap.add_argument("--curriculum", default="", help="START:STOP: the accuracy-driven doubling length ladder "
                    "(after the --warm-* phase; replaces --lengths; constant lr after warm-up)")
    ap.add_argument("--threshold", type=float, default=0.95, help="in-loop dense accuracy that opens the next rung")
    ap.add_argument("--gate-tasks", default=",".join(TASKS), help="tasks whose check gates the next rung")
    ap.add_argument("--replay", type=float, default=0.5, help="share of steps on the rungs below the current one")
    ap.add_argument("--check-every", type=int, default=250)
    ap.add_argument("--check-n", type=int, default=32)
    ap.add_argument("--repeat", type=float, default=0.0, help="share of sequences that are induction copies")
    ap.add_argument("--attn-weight", type=float, default=0.0, help="weight of the training-only attention "
                    "supervision of the lookup circuit (tokensieve.kv.train_attention; 0: off)")
    ap.add_argument("--chain", default="previous", choices=CHAINS, help="targets of the chain head "
                    "(tokensieve.kv.train_attention.chain_targets)")
    ap.add_argument("--group", type=float, default=0.0, help="share of distractor needles that join the previous "
                    "one's key (multivalue-like groups, asked in full; tokensieve.kv.tasks.group_keys)")
    ap.add_argument("--grow-from", default=None, help="a shallower run's --state: its layers keep the bottom and "
                    "top places, the new middle layers start as the identity (tokensieve.kv.train_grow)")
    ap.add_argument("--no-final", action="store_true", help="skip saving and evaluating (step-time probes)")
    ap.add_argument("--reuse-eval", action="store_true",
                    help="keep meta.json's dense_accuracy when it was measured at the same step (re-finalising)")
    return ap.parse_args()


def load(model, opt, args: argparse.Namespace, path: Path) -> tuple[int, float, random.Random, list, Curriculum]:
    step, elapsed, rng, log = 0, 0.0, random.Random(0), []
    lo, hi = (int(x) for x in args.curriculum.split(":")) if args.curriculum else (0, 0)
    cur = Curriculum(make_schedule(lo, hi)) if args.curriculum else None
    if path.exists():
        st = torch.load(path, weights_only=False)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        step, elapsed, log = st["step"], st["elapsed"], st["log"]
        rng.setstate(st["rng"])
        if cur is not None and st.get("curriculum"):  # the schedule continues where it was
            cur = Curriculum.from_dict(st["curriculum"], cur.ladder)
        print(f"resumed at step {step}, {elapsed / 60:.1f} min", flush=True)
    return step, elapsed, rng, log, cur


def save(model, opt, args: argparse.Namespace, path: Path, step: int, elapsed: float, rng, log, cur) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")  # written whole, then renamed: an interrupt never corrupts it
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "elapsed": elapsed,
                "log": log, "rng": rng.getstate(), "args": vars(args),
                "curriculum": cur.to_dict() if cur else None}, tmp)
    tmp.replace(path)


def check(model, cur: Curriculum, args: argparse.Namespace, step: int) -> None:
    """The in-loop dense check at the current rung (fresh samples each time, seeded by the step)."""
    rng, length = random.Random(10_000 + step), cur.length
    model.eval()
    acc = {t: task_accuracy(model, t, length, args.check_n, rng) for t in TASKS if fits(t, length, 8)}
    model.train()
    passed = cur.update(step, acc, args.gate_tasks.split(","), args.threshold)
    scores = " ".join(f"{t}={a:.2f}" for t, a in acc.items())
    print(f"check step {step} L={length} {scores}{' -> next rung' if passed else ''}", flush=True)


def main() -> None:
    args = arguments()
    torch.set_num_threads(args.threads)
    config = model_config(args)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**config, attn_implementation="sdpa"))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    sup = AttentionSupervisor(args.layers, chain=args.chain) if args.attn_weight > 0 else None
    if sup is not None:
        sup.install(model)
    state_path = Path(args.state) if args.state else Path(args.out) / "train_state.pt"
    if args.grow_from and not state_path.exists():  # a resume continues from its own state instead
        print("grown; identity layers:", grow_into(model, torch.load(args.grow_from, weights_only=False)["model"]))
    step, elapsed, rng, log, cur = load(model, opt, args, state_path)
    lengths, weights = parse_weights(args.lengths)
    warm_lengths = parse_weights(args.warm_lengths)
    task_weights = [float(w) for w in args.task_weights.split(",")]
    budget = args.minutes * 60
    model.train()
    while elapsed < budget and (not args.max_steps or step < args.max_steps) and not (cur and cur.done):
        t0 = time.perf_counter()
        frac = elapsed / budget
        if cur and frac >= args.warm_frac:  # the curriculum's mix once the warm phase is over
            length = rng.choices(*cur.mix(args.replay))[0]
        else:
            length = draw_length(frac, rng, lengths, weights, args.warm_frac, warm_lengths)
        ids, labels = batch(rng, length, args.tokens_per_step, args.extra, task_weights, args.key_label, args.repeat,
                             args.group)
        for group in opt.param_groups:  # curriculum: constant lr after warm-up (the run's length is not known)
            group["lr"] = lr_at(step, 0.0 if cur else frac, args.lr, args.warmup)
        loss = train_step(model, opt, ids, labels, sup, args.attn_weight)
        step += 1
        if cur and step % args.check_every == 0:
            check(model, cur, args, step)
        elapsed += time.perf_counter() - t0
        log.append((step, round(elapsed, 1), length, round(loss, 4)))
        if step % 10 == 0:
            recent = [x[3] for x in log[-10:]]
            print(f"step {step} {elapsed / 60:.1f}min L={length} loss={sum(recent) / 10:.3f}", flush=True)
        if step % args.ckpt_every == 0 or (cur and cur.done):
            save(model, opt, args, state_path, step, elapsed, rng, log, cur)
    AttentionSupervisor.uninstall(model)  # the saved config names sdpa
    if not args.no_final:
        finish(model, args, config, step, elapsed, log, cur)


CHECK = {"lengths": [512, 1024], "n": 10, "seed": 1234}  # the small seeded sample tests/test_kv_embedded.py reruns


def finish(model, args: argparse.Namespace, config: dict, step: int, elapsed: float, log: list, cur) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    old = json.loads((out / "meta.json").read_text()) if (out / "meta.json").exists() else {}
    t0 = time.perf_counter()
    if args.reuse_eval and old.get("steps") == step and "dense_accuracy" in old:
        acc, eval_minutes = old["dense_accuracy"], old.get("eval_minutes")
    else:
        acc = dense_accuracy(model, [int(x) for x in args.eval_lengths.split(",")], args.eval_n)
        eval_minutes = round((time.perf_counter() - t0) / 60, 1)
    check = dense_accuracy(model, CHECK["lengths"], CHECK["n"], CHECK["seed"])
    recipe = {k: v for k, v in vars(args).items() if k not in ("out", "state", "no_final", "reuse_eval")}
    meta = {"steps": step, "train_minutes": round(elapsed / 60, 1), "eval_n": args.eval_n,
            "eval_lengths": args.eval_lengths, "eval_seed": 1234, "eval_minutes": eval_minutes,
            "dense_accuracy": acc, "check": {**CHECK, "dense_accuracy": check},
            "final_loss": log[-1][3] if log else None, "recipe": recipe, "config": config,
            "curriculum": cur.to_dict() if cur else None}
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    print(json.dumps(acc, indent=1))


if __name__ == "__main__":
    main()

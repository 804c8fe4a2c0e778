"""Train the embedded model v2 from scratch: CLIP pretraining, then LLaVA's two stages (resumable, CPU).

1. ``clip``: a ``CLIPModel`` learns scene/caption matching with hard negatives; its vision tower (ViT with
   CLS) becomes the LLaVA vision tower and stays frozen afterwards, as in LLaVA-1.5.
2. ``align`` (LLaVA stage 1): projector and language model learn to caption the scene. LLaVA trains only the
   projector here because its LM is pretrained; ours starts from scratch, so this stage also teaches it the
   language of the scenes.
3. ``instruct`` (LLaVA stage 2): projector and LM learn multi-turn visual questions (answers-only loss).

Data: the v2 scene layout (:data:`tokensieve.embedded.synthetic.V2`). docs/embedded.md gives the reasons.

Every few minutes, at the end of each stage, and on Ctrl-C / SIGTERM the full state (weights, optimizer,
data RNG, stage and step) goes to ``OUT/checkpoint/state.pt``; running the same command again continues from
it. Each stage's model is exported to ``OUT/<stage>/`` (plain HF folders). ``OUT`` never defaults to the
shipped weights; ``--ship`` installs the final model there.
"""

from __future__ import annotations

import argparse
import shutil
import signal
from dataclasses import fields
from pathlib import Path

import torch

from tokensieve.embedded.build import EMBEDDED_DIR
from tokensieve.embedded.run import (  # noqa: F401  (re-exported: the recipe's public names)
    STAGES,
    CheckpointMismatchError,
    Run,
    RunFolderError,
    V2Config,
    _take_lock,
)

DEFAULT_OUT = Path("runs/embedded-v2")


def _interrupt(signum, frame):  # SIGTERM behaves like Ctrl-C: save, then stop
    raise KeyboardInterrupt


def train(config: V2Config, out_dir: Path, restart: bool = False, save_every_minutes: float = 5.0) -> Path:
    """Run (or continue) the recipe in ``out_dir``; returns the folder of the final model."""
    out_dir.mkdir(parents=True, exist_ok=True)
    lock = _take_lock(out_dir)
    try:
        return _train(config, out_dir, restart, save_every_minutes)
    finally:
        lock.unlink(missing_ok=True)


def _train(config: V2Config, out_dir: Path, restart: bool, save_every_minutes: float) -> Path:
    if restart and out_dir.exists():
        shutil.rmtree(out_dir / "checkpoint", ignore_errors=True)
        (out_dir / "training_log.txt").unlink(missing_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    run = Run(config, out_dir)
    if run.resume():
        where = f"stage {STAGES[run.stage]} step {run.step}" if run.stage < len(STAGES) else "every stage done"
        run.log(f"resumed from {run.state_path}: {where}")
        if run.changed_on_resume:  # the log says which recipe the stages still to come run with
            changes = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in sorted(run.changed_on_resume.items()))
            run.log(f"settings of stages not begun, changed at this resume: {changes}")
    else:
        run.new_optimizer()
        n = sum(p.numel() for p in run.model.parameters())
        run.log(f"v2 recipe: {n / 1e6:.2f}M parameters; {config}")
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        while run.stage < len(STAGES):
            run.run_stage(60.0 * save_every_minutes)
            run.finish_stage()
    except KeyboardInterrupt:
        run.save()
        run.log(f"interrupted: saved stage {STAGES[run.stage]} step {run.step}; rerun the same command to resume")
        raise SystemExit(130) from None
    finally:
        signal.signal(signal.SIGTERM, previous)
    return out_dir / "instruct"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tokensieve train-tiny",
        description="Train the embedded small LLaVA (v2 recipe: CLIP pretraining, alignment, instruction tuning). "
        "Rerun the same command to continue an interrupted run.",
    )
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT, help=f"run folder (default: {DEFAULT_OUT})")
    parser.add_argument("--ship", action="store_true", help="install the final model as the package's shipped weights")
    parser.add_argument("--restart", action="store_true", help="ignore the checkpoint in --out-dir and start over")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: 2)")
    parser.add_argument("--save-every-minutes", type=float, default=5.0)
    for field in fields(V2Config):
        flag = "--" + field.name.replace("_", "-")
        parser.add_argument(flag, type=type(field.default), default=field.default, help=f"default {field.default}")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    out_dir = args.out_dir.resolve()
    if out_dir == EMBEDDED_DIR or EMBEDDED_DIR in out_dir.parents:
        parser.error(f"--out-dir {args.out_dir} is the shipped weights' folder; train elsewhere and add --ship")
    torch.set_num_threads(args.threads)
    config = V2Config(**{f.name: getattr(args, f.name) for f in fields(V2Config)})
    try:
        final = train(config, out_dir, restart=args.restart, save_every_minutes=args.save_every_minutes)
    except RunFolderError as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    if args.ship:
        for item in final.iterdir():
            shutil.copy(item, EMBEDDED_DIR / item.name)
        print(f"installed {final} as the shipped weights in {EMBEDDED_DIR}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

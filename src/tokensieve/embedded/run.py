"""One v2 training run (:mod:`tokensieve.embedded.train`): the model, CLIP teacher, optimizer and data stream of the
recipe in :mod:`tokensieve.embedded.recipe`, their checkpoint (save and resume), and the run folder's lock."""

from __future__ import annotations

import math
import os
import shutil
import time
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np
import torch

from tokensieve.embedded.batches import BatchBuilder
from tokensieve.embedded.build import build_config, build_model, build_processor, build_tokenizer
from tokensieve.embedded.clip_stage import build_clip
from tokensieve.embedded.evaluate import accuracy, answer
from tokensieve.embedded.pointers import lm_and_pointer_losses
from tokensieve.embedded.recipe import STAGES, V2Config
from tokensieve.embedded.stages import align_batch, clip_step, dense_step, instruct_batch, lm_losses
from tokensieve.embedded.synthetic import V2, V2_VOCABULARY_WORDS, make_split


class RunFolderError(ValueError):
    """The run folder cannot be used as asked (another process holds it, or its settings differ)."""


class CheckpointMismatchError(RunFolderError):
    """The run folder's checkpoint was written with other settings than the ones given."""


RUNTIME_FIELDS = {"eval_every", "eval_per_family"}  # may change between a run and its resumption


def _unstarted_fields(stage: int, step: int) -> set[str]:
    """The settings (``<stage>_...``) of the stages not begun at (``stage``, ``step``): free to change."""
    first = stage + (step > 0)
    return {f.name for f in fields(V2Config) for name in STAGES[first:] if f.name.startswith(f"{name}_")}


class Run:
    """Model, CLIP teacher, optimizer and data stream of one training run, with save/resume."""

    def __init__(self, config: V2Config, out_dir: Path) -> None:
        self.config, self.out_dir = config, out_dir
        self.changed_on_resume: dict[str, tuple] = {}
        self.state_path = out_dir / "checkpoint" / "state.pt"
        self.tokenizer = build_tokenizer(V2_VOCABULARY_WORDS)
        self.processor = build_processor(self.tokenizer)
        c = config
        llava = build_config(
            self.tokenizer, c.vision_hidden, c.vision_layers, c.text_hidden, c.text_layers, c.heads, -2
        )
        self.model = build_model(llava, seed=c.seed)
        self.model.config.embedded_layout = "v2"  # the scene layout it was trained on (make_split(layout=...))
        tok = self.tokenizer
        self.clip = build_clip(llava, len(tok), tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, V2.cells)
        grid = llava.vision_config.image_size // llava.vision_config.patch_size
        self.builder = BatchBuilder(
            self.tokenizer, grid * grid, spread_pointers=True, sink_weight=c.instruct_sink_weight
        )
        self.rng = np.random.default_rng([2, c.seed])
        self.stage, self.step, self.optimizer = 0, 0, None
        self.log_path = out_dir / "training_log.txt"

    # ------------------------------------------------------------------ state
    def trainable(self) -> list[torch.nn.Parameter]:
        if STAGES[self.stage] == "clip":
            return list(self.clip.parameters())
        if STAGES[self.stage] == "dense":
            return [*self.clip.vision_model.parameters(), *self.clip.dense_heads.parameters()]
        self.model.model.vision_tower.requires_grad_(False)
        return [p for n, p in self.model.named_parameters() if not n.startswith("model.vision_tower")]

    def new_optimizer(self) -> None:
        params = self.trainable()
        groups = [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": self.config.weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ]
        lr = getattr(self.config, f"{STAGES[self.stage]}_lr")
        self.optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98))

    def save(self) -> None:
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        state = {
            "config": asdict(self.config),
            "stage": self.stage,
            "step": self.step,
            "model": self.model.state_dict(),
            "stages": STAGES,
            "clip": self.clip.state_dict() if self.stage < STAGES.index("align") else None,
            "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None,
            "rng": self.rng.bit_generator.state,
            "torch_rng": torch.get_rng_state(),
        }
        temporary = self.state_path.with_suffix(".tmp")
        torch.save(state, temporary)
        os.replace(temporary, self.state_path)

    def resume(self) -> bool:
        if not self.state_path.exists():
            return False
        state = torch.load(self.state_path, weights_only=False)
        if tuple(state.get("stages", ())) != STAGES:
            raise CheckpointMismatchError(
                f"{self.state_path} was written by a recipe with other stages; pass --restart to start over"
            )
        free = RUNTIME_FIELDS | _unstarted_fields(state["stage"], state["step"])
        saved = {k: v for k, v in state["config"].items() if k not in free}
        current = {k: v for k, v in asdict(self.config).items() if k not in free}
        if saved != current:
            changed = sorted(k for k in current if saved.get(k) != current[k])
            raise CheckpointMismatchError(
                f"{self.state_path} was written with other settings ({', '.join(changed)}); "
                "rerun with the same options to resume, or pass --restart to start over"
            )
        self.changed_on_resume = {  # settings of stages not begun that this resume changes (for the log)
            k: (state["config"].get(k), v)
            for k, v in asdict(self.config).items()
            if k in free - RUNTIME_FIELDS and state["config"].get(k) != v
        }
        self.model.load_state_dict(state["model"])
        if state["clip"] is not None:
            self.clip.load_state_dict(state["clip"])
        self.stage, self.step = state["stage"], state["step"]
        self.rng.bit_generator.state = state["rng"]
        torch.set_rng_state(state["torch_rng"])
        if self.stage < len(STAGES):
            self.new_optimizer()
            if state["optimizer"] is not None:
                self.optimizer.load_state_dict(state["optimizer"])
        return True

    def log(self, line: str) -> None:
        print(line, flush=True)
        with open(self.log_path, "a") as handle:
            handle.write(line + "\n")

    # ------------------------------------------------------------------ training
    def lr_at(self, step: int, steps: int, base: float) -> float:
        warm = min(1.0, (step + 1) / self.config.warmup_steps)
        ratio = self.config.min_lr_ratio
        return base * warm * (ratio + (1 - ratio) * 0.5 * (1 + math.cos(math.pi * step / steps)))

    def one_step(self, name: str) -> dict[str, torch.Tensor]:
        c = self.config
        if name == "clip":
            losses = clip_step(self.clip, self.builder, self.rng, c.clip_batch)
            loss = losses["clip"] + c.dense_weight * losses["dense"]
        elif name == "dense":
            losses = dense_step(self.clip, self.rng, c.dense_batch)
            loss = losses["dense"]
        else:
            if name == "align":
                batch = align_batch(self.builder, self.rng, c.align_batch)
            else:
                batch = instruct_batch(
                    self.builder,
                    self.rng,
                    c.instruct_batch,
                    c.multi_image_fraction,
                    c.caption_fraction,
                    with_pointers=c.instruct_pointer_weight > 0,
                    family_weights=c.family_weights,
                )
            if "pointer_row" in batch:
                losses = lm_and_pointer_losses(self.model, batch, c.instruct_pointer_layer, c.instruct_pointer_heads)
            else:
                losses = lm_losses(self.model, batch)
            loss = losses["loss"] + c.instruct_pointer_weight * (losses.get("word", 0.0) + losses.get("pointer", 0.0))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.trainable(), 1.0)
        self.optimizer.step()
        return losses

    def evaluate(self) -> dict[str, float]:
        self.model.eval()
        samples = make_split("val", self.config.eval_per_family, layout="v2")
        scores = accuracy(samples, answer(self.model, self.processor, samples, batch_size=50))
        self.model.train()
        return scores

    def export(self, folder: Path) -> None:
        self.model.save_pretrained(folder)
        self.processor.save_pretrained(folder)
        if self.log_path.exists():
            shutil.copy(self.log_path, folder / "training_log.txt")

    def run_stage(self, save_every_s: float) -> None:
        name = STAGES[self.stage]
        steps = getattr(self.config, f"{name}_steps")
        base_lr = getattr(self.config, f"{name}_lr")
        running: dict[str, float] = {}
        last_save, start, start_step = time.perf_counter(), time.perf_counter(), self.step
        while self.step < steps:
            for group in self.optimizer.param_groups:
                group["lr"] = self.lr_at(self.step, steps, base_lr)
            losses = self.one_step(name)
            self.step += 1
            for k, v in losses.items():
                value = float(v.detach())
                running[k] = 0.95 * running.get(k, value) + 0.05 * value
            if self.step % 25 == 0:
                rate = (self.step - start_step) / (time.perf_counter() - start)
                stats = " ".join(f"{k} {v:.3f}" for k, v in running.items())
                self.log(f"{name} step {self.step}/{steps} ({rate * 60:.0f} steps/min) {stats}")
            if name == "instruct" and self.step % self.config.eval_every == 0:
                self.log(f"eval {name} step {self.step} val {_format(self.evaluate())}")
            if time.perf_counter() - last_save > save_every_s:
                self.save()
                last_save = time.perf_counter()

    def finish_stage(self) -> None:
        name = STAGES[self.stage]
        if name in ("clip", "dense"):
            self.model.model.vision_tower.load_state_dict(self.clip.vision_model.state_dict())
        if name == "instruct":
            self.log(f"eval {name} final val {_format(self.evaluate())}")
        self.export(self.out_dir / name)
        self.stage, self.step = self.stage + 1, 0
        self.optimizer = None
        if self.stage < len(STAGES):
            self.new_optimizer()
        self.save()
        self.log(f"stage {name} done; exported to {self.out_dir / name}")


def _format(scores: dict[str, float]) -> str:
    return " ".join(f"{k} {100 * v:5.1f}" for k, v in scores.items())


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def _take_lock(out_dir: Path) -> Path:
    """Refuse a second live training process on the same run folder (they would overwrite each other)."""
    lock = out_dir / "train.lock"
    text = lock.read_text().strip() if lock.exists() else ""
    pid = int(text) if text.isdigit() else 0
    if pid != os.getpid() and _alive(pid):
        raise RunFolderError(f"another training process (pid {pid}) is using {out_dir}; wait for it or stop it")
    lock.write_text(str(os.getpid()))
    return lock

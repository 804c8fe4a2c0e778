"""Data-parallel ``tokensieve bench``: 2 CPU processes (gloo) under ``torchrun``, resumed under ``accelerate launch``.

Kept small (a 3-layer tiny LLaVA, one question per family, one or two methods) so each launch takes seconds; most
of the time is the two processes importing torch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tokensieve.bench.runner import RESULTS_FILE, SHARDS_DIR, append_row, merge_shards, read_rows

SRC = Path(__file__).resolve().parents[1] / "src"
BIN = Path(sys.executable).parent
BENCH = ["-m", "tokensieve.cli", "bench", "--device", "cpu", "--limit", "1", "--no-progress", "--batch-size", "8",
         "--latency-batch", "2"]  # fmt: skip


def _launch(launcher: list[str], args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    done = subprocess.run(launcher + BENCH + args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done


def _lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / RESULTS_FILE).read_text().splitlines() if line.strip()]


def _torchrun() -> list[str]:
    exe = BIN / "torchrun"
    if not exe.exists():
        pytest.skip("torchrun is not installed next to this Python")
    return [str(exe), "--nproc-per-node", "2", "--master-port", "29517"]


def _accelerate() -> list[str]:
    exe = BIN / "accelerate"
    if not exe.exists():
        return []
    return [str(exe), "launch", "--cpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
            "--dynamo_backend", "no", "--main_process_port", "29518"]  # fmt: skip


def test_two_ranks_share_the_cells_and_resume(model_dir, tmp_path):
    out = tmp_path / "run"
    first = _launch(_torchrun(), ["--model", str(model_dir), "--methods", "random,pool", "--keep", "1.0,4,2",
                                  "--out", str(out)], tmp_path)  # fmt: skip
    rows = first_rows = _lines(out)
    cells = [r["cell"] for r in rows]
    assert sorted(cells) == sorted(["none@1.0", "random@4", "random@2", "pool@4", "pool@2"])  # each exactly once
    assert {r["rank"] for r in rows} == {0, 1}  # both ranks computed cells
    assert not (out / SHARDS_DIR).exists() and (out / "report.md").exists()
    assert first.stdout.count("| none | - | 1.0 (ref) |") == 1  # only rank 0 prints the table
    assert "5 cells computed, 0 resumed" in first.stdout

    # A previous run's rank 1 finished random@3 and was killed before the merge: its shard is resumed, not redone.
    (out / SHARDS_DIR).mkdir()
    stale = dict(rows[1], cell="random@3", keep=3, rank=1, eval_s=-1.0, retention=None)
    (out / SHARDS_DIR / "rank1.jsonl").write_text(json.dumps(stale) + "\n")
    args = ["--model", str(model_dir), "--methods", "random,pool", "--keep", "1.0,4,2,3", "--out", str(out)]
    _launch(_accelerate() or _torchrun(), args, tmp_path)  # accelerate where installed (dev extra), else torchrun
    rows = _lines(out)
    cells = [r["cell"] for r in rows]
    assert len(cells) == len(set(cells)) == 7
    assert rows[:5] == first_rows  # finished rows are never rewritten
    by_cell = {r["cell"]: r for r in rows}
    assert by_cell["random@3"]["eval_s"] == -1.0  # taken from the shard, not recomputed
    assert by_cell["pool@3"]["status"] == "ok" and not (out / SHARDS_DIR).exists()


def test_merge_fills_retention_from_the_reference_and_never_duplicates(tmp_path):
    def row(cell, method, acc):
        return {"cell": cell, "method": method, "keep": 1.0, "status": "ok", "accuracy": {"a": acc, "mean": acc}}

    append_row(tmp_path / RESULTS_FILE, dict(row("none@1.0", "none", 0.8), retention=100.0))
    (tmp_path / SHARDS_DIR).mkdir()
    for rank, rows in enumerate([[row("x@0.5", "x", 0.4)], [row("y@0.5", "y", 0.6), row("none@1.0", "none", 0.1)]]):
        for r in rows:
            append_row(tmp_path / SHARDS_DIR / f"rank{rank}.jsonl", r)
    assert merge_shards(tmp_path) == ["x@0.5", "y@0.5"]  # the reference already in results.jsonl is not re-added
    rows = {r["cell"]: r for r in read_rows(tmp_path / RESULTS_FILE)}
    assert rows["x@0.5"]["retention"] == pytest.approx(50.0) and rows["y@0.5"]["retention"] == pytest.approx(75.0)
    assert rows["none@1.0"]["accuracy"]["mean"] == 0.8 and not (tmp_path / SHARDS_DIR).exists()
    assert len((tmp_path / RESULTS_FILE).read_text().splitlines()) == 3

"""The run folder on disk: ``results.jsonl`` (one JSON line per finished cell), the shards of a data-parallel run,
and ``run.json`` (what the folder holds). Rows are appended and fsynced, never rewritten; later rows win per cell.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

from .cell import REFERENCE
from .metrics import retention

RESULTS_FILE = "results.jsonl"
RUN_FILE = "run.json"
SHARDS_DIR = "shards"


def cell_key(method: str, keep) -> str:
    """Stable id of a cell; ints (token counts) and floats (fractions) stay distinct (``64`` vs ``0.5``)."""
    return f"{method}@{keep!r}"


def read_rows(path: Path) -> list[dict]:
    """Rows of a results file; a torn last line (killed mid-write) is ignored, later rows win per cell."""
    rows: dict[str, dict] = {}
    if not path.exists():
        return []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and "cell" in row:
                rows[row["cell"]] = row
    return list(rows.values())


def saved_rows(out_dir: Path) -> dict[str, dict]:
    """Every finished cell of a run folder: ``results.jsonl`` and any shard a data-parallel run left behind."""
    out_dir = Path(out_dir)
    rows = {r["cell"]: r for r in read_rows(out_dir / RESULTS_FILE)}
    for shard in sorted((out_dir / SHARDS_DIR).glob("rank*.jsonl")):
        for row in read_rows(shard):
            rows.setdefault(row["cell"], row)
    return rows


def append_row(path: Path, row: dict) -> None:
    """Append one JSON line and push it to disk before returning."""
    _close_torn_line(path)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(row, sort_keys=False) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def _close_torn_line(path: Path) -> None:
    """A line torn by a kill must not swallow the next row."""
    if path.exists() and path.stat().st_size:
        with open(path, "rb+") as handle:
            handle.seek(-1, os.SEEK_END)
            if handle.read(1) != b"\n":
                handle.write(b"\n")


def check_folder(out_dir: Path, fingerprint: dict, config) -> None:
    """Rank 0, under the lock: the folder holds this run (or nothing); record the config; merge stale shards."""
    run_file = out_dir / RUN_FILE
    if run_file.exists():
        previous = json.loads(run_file.read_text())
        if previous.get("fingerprint") != fingerprint:
            raise ValueError(
                f"{out_dir} holds a run of {previous.get('fingerprint')}, not {fingerprint}; use another --out"
            )
    run_file.write_text(json.dumps({"fingerprint": fingerprint, "config": asdict(config)}, indent=2, default=str))
    merge_shards(out_dir)


def with_retention(row: dict, reference: dict | None) -> dict:
    if row.get("status") == "ok" and row.get("retention") is None:
        if row["method"] == REFERENCE:
            row["retention"] = 100.0
        elif reference is not None and reference.get("status") == "ok":
            row["retention"] = retention(row["accuracy"], reference["accuracy"])
    return row


def merge_shards(out_dir: Path) -> list[str]:
    """Append the shard rows that ``results.jsonl`` lacks (retention filled in), then delete the shards."""
    results, shards = out_dir / RESULTS_FILE, sorted((out_dir / SHARDS_DIR).glob("rank*.jsonl"))
    done = {r["cell"]: r for r in read_rows(results)}
    pending = [row for shard in shards for row in read_rows(shard) if row["cell"] not in done]
    reference = done.get(cell_key(REFERENCE, 1.0)) or next((r for r in pending if r["method"] == REFERENCE), None)
    merged = []
    for row in pending:
        if row["cell"] not in done:
            append_row(results, with_retention(row, reference))
            done[row["cell"]] = row
            merged.append(row["cell"])
    for shard in shards:
        shard.unlink()
    if (out_dir / SHARDS_DIR).is_dir() and not any((out_dir / SHARDS_DIR).iterdir()):
        (out_dir / SHARDS_DIR).rmdir()
    return merged

"""kv-bench: resumable JSONL (an interrupted run continues), report tables, CLI parsing."""

from __future__ import annotations

import json

import pytest

from tokensieve.kv import bench
from tokensieve.kv.report import accuracy_table, fidelity_table
from tokensieve.kv.tasks import TASKS, make_sample
from tokensieve.kv.testing import tiny_causal_lm


def test_tasks_have_exact_length_and_answers():
    import random

    rng = random.Random(0)
    for task in TASKS:
        s = make_sample(task, 256, rng, n_distract=4)
        assert len(s.prompt) == 256 and s.prompt[0] == 1 and s.prompt[-3] == 3 and s.prompt[-1] == 4
        assert all(512 <= v < 768 or 256 <= v < 512 for v in s.answer)


def test_bench_resumes_after_interrupt(tmp_path, monkeypatch):
    model = tiny_causal_lm(vocab=768, layers=1)
    out = tmp_path / "b.jsonl"
    args = (["dense", "streaming", "tokenselect"], [48], [128], ["single"], 1, out)
    real = bench.run_cell
    calls = []

    def flaky(*a, **k):
        calls.append(a[1])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(bench, "run_cell", flaky)
    with pytest.raises(KeyboardInterrupt):
        bench.run_grid(model, *args, log=lambda *_: None)
    assert [r["method"] for r in bench.read_rows(out)] == ["dense"]
    with open(out, "a") as f:
        f.write('{"method": "strea')  # a line cut by the interrupt
    monkeypatch.setattr(bench, "run_cell", real)
    calls.clear()
    rows = bench.run_grid(model, *args, log=lambda *_: None)
    assert sorted(r["method"] for r in rows) == ["dense", "streaming", "tokenselect"]
    again = bench.run_grid(model, *args, log=lambda *_: None)
    assert len(again) == 3  # nothing re-run
    row = next(r for r in rows if r["method"] == "tokenselect")
    assert 0 <= row["accuracy"] <= 1 and 0 <= row["topk_recall"] <= 1 and row["kv_bytes_step"] > 0
    assert "tokenselect" in accuracy_table(rows) and "tokenselect" in fidelity_table(rows)
    json.dumps(rows)


def test_cli_parses_kv_bench(monkeypatch):
    from tokensieve.kv import cli

    seen = {}
    monkeypatch.setattr(cli, "kv_bench", lambda a: seen.update(vars(a)))
    cli.main(["kv-bench", "--methods", "dense,tokenselect", "--keeps", "64", "--n", "3"])
    assert seen["methods"] == "dense,tokenselect" and seen["n"] == 3 and seen["cmd"] == "kv-bench"


def test_grid_skips_a_budget_the_method_cannot_run(tmp_path):
    model = tiny_causal_lm(vocab=768, layers=1)
    logged = []
    rows = bench.run_grid(model, ["streaming", "tokenselect"], [16, 48], [128], ["single"], 1, tmp_path / "b.jsonl",
                          log=logged.append)
    cells = sorted((r["method"], r["keep"]) for r in rows)
    assert cells == [("streaming", 16), ("streaming", 48), ("tokenselect", 48)]  # 16 <= n_init + n_local
    assert any("tokenselect" in line and "skipped" in line and "keep > 36" in line for line in logged)

"""The command line: one-line user errors (exit 2) found before any model loads, the run lock, Ctrl-C, show.

Tiny random-weight models only; ``main(argv)`` in process with ``capsys``, and one real subprocess.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

import tokensieve.viz
from tokensieve.bench import cell as bench_cell
from tokensieve.bench import cli as bench_cli
from tokensieve.bench import show as bench_show
from tokensieve.bench.parallel import RunLock
from tokensieve.bench.runner import RESULTS_FILE, read_rows
from tokensieve.cli import main
from tokensieve.testing import random_image

SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if a command gets as far as loading a model."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(bench_cli, "load_model", refuse)
    monkeypatch.setattr(bench_show, "load_model", refuse)


def _run(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exit_:
        return int(exit_.code)


def _one_line_error(capsys, argv: list[str], *words: str) -> str:
    code = _run(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for word in words:
        assert word in err, err
    return err


@pytest.fixture
def image_file(tmp_path) -> Path:
    path = tmp_path / "img.png"
    random_image(5, (56, 56)).save(path)
    return path


BAD_BENCH = [
    (["--keep", "abc"], ["--keep", "'abc' is not a number", "0.11"]),
    (["--keep", "1.5"], ["--keep", "(0, 1]"]),
    (["--limit", "0"], ["--limit", "at least 1"]),
    (["--pairs", "3"], ["--pairs", "at least 5"]),
    (["--methods", "nope"], ["unknown method 'nope'", "divprune"]),
    (["--model", "./no-such-model"], ["--model ./no-such-model", "no such folder"]),
    (["--device", "warp-drive"], ["--device", "cpu"]),
    (["--dtype", "float7"], ["--dtype", "bfloat16"]),
]


@pytest.mark.parametrize(("args", "words"), BAD_BENCH, ids=[" ".join(a) for a, _ in BAD_BENCH])
def test_bench_user_errors_are_one_line(capsys, tmp_path, no_model, args, words):
    _one_line_error(capsys, ["bench", "--out", str(tmp_path / "run"), *args], *words)


def test_bench_out_that_cannot_be_written(capsys, tmp_path, no_model):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    _one_line_error(capsys, ["bench", "--out", str(blocker)], "is a file", "--out")
    _one_line_error(capsys, ["bench", "--out", str(blocker / "run")], "cannot write to --out", "pass --out")


def test_bench_out_on_a_read_only_filesystem(capsys, no_model):
    probe = Path("/sys/tokensieve-probe")
    try:
        probe.mkdir()
    except OSError:  # read-only for every user, root included
        _one_line_error(capsys, ["bench", "--out", str(probe / "run")], "cannot write to --out", "pass --out")
    else:
        probe.rmdir()
        pytest.skip("/sys is writable here: no read-only place to try")


def test_model_folder_without_config_and_unloadable_hub_id(capsys, tmp_path, monkeypatch):
    _one_line_error(capsys, ["bench", "--model", str(tmp_path), "--out", str(tmp_path / "r")], "no config.json")
    import transformers

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files.\nmore text")

    monkeypatch.setattr(transformers.AutoModelForImageTextToText, "from_pretrained", offline)
    _one_line_error(capsys, ["bench", "--model", "nobody/no-such-vlm", "--out", str(tmp_path / "r")],
                    "could not load --model nobody/no-such-vlm", "couldn't connect")  # fmt: skip


def test_show_user_errors_before_the_model_loads(capsys, tmp_path, image_file, no_model):
    _one_line_error(capsys, ["show", str(tmp_path / "missing.png"), "what ?"], "missing.png does not exist")
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    _one_line_error(capsys, ["show", str(text), "what ?"], "not an image")
    _one_line_error(capsys, ["show", str(image_file), "what ?", "--method", "nope"], "unknown method")
    _one_line_error(capsys, ["show", str(image_file), "what ?", "--keep", "-3"], "--keep")
    _one_line_error(capsys, ["show", str(image_file), "what ?", "--out", str(tmp_path)], "is a folder")


def test_horizon_missing_image(capsys, tmp_path):
    _one_line_error(capsys, ["horizon", str(tmp_path / "nope.png"), "what ?"], "nope.png does not exist")


def test_a_user_error_in_a_real_process_is_one_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "tokensieve.cli", "bench", "--keep", "abc"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [done.stderr.strip()] and "Traceback" not in done.stderr


def test_world_size_without_a_launcher_is_one_line(capsys, tmp_path, monkeypatch, no_model):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    _one_line_error(capsys, ["bench", "--out", str(tmp_path / "run")], "WORLD_SIZE=2", "torchrun")


def test_train_tiny_help_works(capsys):
    assert _run(["train-tiny", "--help"]) == 0
    assert "--out-dir" in capsys.readouterr().out


# ---------------------------------------------------------------------------------- lock, resume, Ctrl-C


def _bench_argv(model_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["bench", "--model", str(model_dir), "--device", "cpu", "--limit", "1", "--methods", "random",
            "--keep", "1.0,4,2", "--out", str(out), "--no-progress", "--batch-size", "8", "--latency-batch", "2",
            *extra]  # fmt: skip


def test_a_second_run_on_a_locked_folder_is_refused(capsys, tmp_path, model_dir, no_model):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen(  # another process holds the lock, as a concurrent bench run would
        [sys.executable, "-c", "import sys, time; from tokensieve.bench.parallel import RunLock; "
         "lock = RunLock(sys.argv[1]); lock.acquire(); print('held', flush=True); time.sleep(60)", str(out)],
        env={**os.environ, "PYTHONPATH": str(SRC)}, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        _one_line_error(capsys, _bench_argv(model_dir, out), "another bench run", "pid", "different --out")
    finally:
        holder.kill()
        holder.wait()
    lock = RunLock(out)  # the kernel dropped the dead holder's lock
    lock.acquire()
    lock.release()


def test_ctrl_c_says_what_was_saved_and_how_to_resume(capsys, tmp_path, model_dir, monkeypatch):
    out = tmp_path / "run"
    original = bench_cell.evaluate_cell
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(args[1:3])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(bench_cell, "evaluate_cell", interrupted)
    assert _run(_bench_argv(model_dir, out)) == 130
    err = capsys.readouterr().err
    assert "interrupted: 1 of 3 cells are saved" in err and "resume with" in err and f"--out {out}" in err
    monkeypatch.setattr(bench_cell, "evaluate_cell", original)
    assert _run(_bench_argv(model_dir, out)) == 0  # the lock was released; the run resumes
    printed = capsys.readouterr().out
    assert "2 cells computed, 1 resumed" in printed
    assert _run(_bench_argv(model_dir, out)) == 0  # a third run computes nothing twice
    assert "0 cells computed, 3 resumed" in capsys.readouterr().out
    lines = (out / RESULTS_FILE).read_text().splitlines()
    assert len(lines) == len(read_rows(out / RESULTS_FILE)) == 3


# ------------------------------------------------------------------------------------------------- show


@pytest.mark.parametrize("method", ["none", "divprune"])
def test_show_titles_the_overlay(capsys, tmp_path, model_dir, image_file, monkeypatch, method):
    titles = []
    original = tokensieve.viz.save_overlay

    def spy(image, kept, info, path, title, view="auto"):
        titles.append(title)
        return original(image, kept, info, path, title, view=view)

    monkeypatch.setattr(tokensieve.viz, "save_overlay", spy)
    out = tmp_path / "overlay.png"
    argv = ["show", str(image_file), "what is the color ?", "--method", method, "--keep", "4", "--model",
            str(model_dir), "--device", "cpu", "--out", str(out), "--max-new-tokens", "2"]  # fmt: skip
    assert _run(argv) == 0
    printed = capsys.readouterr().out
    answer = printed.splitlines()[0].removeprefix("answer: ")
    (title,) = titles
    assert title.startswith(method) and "Q: what is the color ?" in title and f"A: {answer or '(empty'}" in title
    assert ("unpruned" in title and "16/16" in title) if method == "none" else ("keep=4" in title and "4/16" in title)
    with Image.open(out) as picture:
        assert picture.width >= 224 and picture.height > picture.width  # the title sits above the square overlay

"""Tests of ``tokensieve bench`` / ``show``: runner + resume, report, plots, picture grid, FLOPs, loaders, viz.

Tiny random-weight models only (accuracy is meaningless here; the mechanics are what is tested), no downloads.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import tokensieve
from tokensieve.bench import cell as bench_cell
from tokensieve.bench.cli import main as bench_main
from tokensieve.bench.cli import parse_keep
from tokensieve.bench.loaders import load_task
from tokensieve.bench.metrics import (
    DecoderShape,
    PairedLatency,
    cache_bytes,
    layer_flops,
    paired_latency,
    prefill_flops,
    retention,
    tokens_per_layer,
    vqa_match,
    yes_no_match,
)
from tokensieve.bench.report import PLOT_FLOPS, PLOT_SPEEDUP, PLOT_TOKENS, REPORT_FILE
from tokensieve.bench.runner import RESULTS_FILE, BenchConfig, read_rows, run_bench
from tokensieve.testing import random_image, tiny_llava, tiny_llava_next, tiny_qwen2_5_vl
from tokensieve.trace import StageRecord, Trace
from tokensieve.viz import overlay, tile_layout

# catp_llm needs >= 4 decoder layers: an error row on 3 layers; fastv prunes from layer 1 of 3 (the paper's layer 2
# of 32, scaled), so a layer-averaged budget of 8 of 16 tokens is met ((16 + 2 * 4) / 3 = 8) and 4 of 16 is out of
# its reach (at best (16 + 2 * 1) / 3 = 6): an unreachable row.
METHODS = ["random", "divprune", "catp_llm", "fastv"]
KEEPS = (1.0, 0.5, 0.25)


@pytest.fixture(scope="module")
def tiny():
    return tiny_llava(layers=3)


def _config(**kw) -> BenchConfig:
    base = dict(methods=METHODS, keeps=KEEPS, batch_size=8, latency_batch=4, n_viz=3, progress=False)
    base.update(kw)
    return BenchConfig(**base)


# ----------------------------------------------------------------------------------------------- metrics


def test_prefill_flops_hand_example():
    # d=4, 2 heads of 2 (q width 4), 1 kv head (kv width 2), m=8, gated: per layer with n tokens
    # projections 2*2*n*4*4 + 2*2*n*4*2 = 96n, scores + weighted sum 2*2*n*n*4 = 16n^2, MLP 3*2*n*4*8 = 192n
    shape = DecoderShape(n_layers=2, hidden=4, heads=2, kv_heads=1, head_dim=2, intermediate=8, gated=True)
    assert layer_flops(10, shape) == (960.0 + 1600.0, 1920.0)
    assert prefill_flops([10, 5], shape) == (960 + 1600 + 1920) + (480 + 400 + 960)
    assert prefill_flops([], shape) == 0.0
    plain = DecoderShape(n_layers=1, hidden=4, heads=2, kv_heads=2, head_dim=2, intermediate=8, gated=False)
    assert layer_flops(1, plain) == (2 * 2 * 4 * 4 + 2 * 2 * 4 * 4 + 2 * 2 * 4, 2 * 2 * 4 * 8)


def test_decoder_shape_reads_the_config(tiny):
    model, _ = tiny
    shape = DecoderShape.from_model(model)
    cfg = model.config.text_config
    assert (shape.n_layers, shape.hidden, shape.intermediate) == (3, cfg.hidden_size, cfg.intermediate_size)
    assert shape.gated and shape.heads * shape.head_dim == cfg.hidden_size


def test_tokens_per_layer_uses_the_trace_counts():
    trace = Trace()
    trace.reset(n_layers=4)
    trace.images[(0, 0)] = {"n_tokens": 8}
    trace.images[(1, 0)] = {"n_tokens": 8}
    trace.stages.append(StageRecord("a", layer=2, kept={(0, 0): torch.arange(3), (1, 0): torch.arange(5)}))
    assert tokens_per_layer(trace, 0, text_tokens=6, n_images_tokens=8, n_layers=4) == [14, 14, 9, 9]
    assert tokens_per_layer(trace, 1, text_tokens=6, n_images_tokens=8, n_layers=4) == [14, 14, 11, 11]
    assert tokens_per_layer(None, 0, text_tokens=6, n_images_tokens=8, n_layers=2) == [14, 14]


def test_paired_latency_alternates_pruned_and_unpruned():
    events = []

    class Context:
        def __enter__(self):
            events.append("enter")

        def __exit__(self, *exc):
            events.append("exit")

    def prefill():
        events.append("run")
        return len(events)

    timing, last = paired_latency(prefill, Context, pairs=5, device=torch.device("cpu"), warmup=1)
    assert events == ["enter", "run", "exit", "run"] * 6  # one untimed pair, then 5 timed pairs
    assert len(timing.pruned_s) == len(timing.unpruned_s) == 5 and last == len(events) - 2
    fixed = PairedLatency(pruned_s=[1.0, 2.0, 1.5, 9.0, 1.0], unpruned_s=[3.0, 3.0, 4.0, 2.0, 3.0])
    assert fixed.pruned == 1.5 and fixed.unpruned == 3.0 and fixed.speedup == 2.0
    assert fixed.unpruned_spread == pytest.approx((4.0 - 2.0) / 3.0)  # > 0.2: such a cell is flagged noisy


def test_retention_and_matchers():
    assert retention({"a": 0.5, "b": 0.9, "mean": 0.7}, {"a": 1.0, "b": 0.9, "mean": 0.95}) == pytest.approx(75.0)
    assert retention({"a": 0.5, "mean": 0.5}, {"a": 0.0, "mean": 0.0}) is None
    assert yes_no_match("Yes, there is a dog.", "yes") and not yes_no_match("No.", "yes")
    assert vqa_match("The cup.", "cup") and vqa_match("left", "left") and not vqa_match("right", "left")


def test_kv_cache_bytes_shrink_under_pruning(tiny):
    model, proc = tiny
    inputs = proc(images=[random_image(0)], text=["<image> what is the color ?"], return_tensors="pt")
    with torch.inference_mode():
        full = cache_bytes(model(**inputs, use_cache=True).cache)
        with tokensieve.sieve(model, "random", keep=4):
            pruned = cache_bytes(model(**inputs, use_cache=True).cache)
    cfg = model.config.text_config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * 4  # k and v, fp32
    length = inputs["input_ids"].shape[1]
    assert full == per_token * length
    assert pruned == per_token * (length - 12)  # 16 visual tokens -> 4


# ------------------------------------------------------------------------------------- runner and report


@pytest.fixture(scope="module")
def bench_run(tiny, tmp_path_factory):
    """An interrupted run, then its resumption: (out dir, lines after the interruption, second result)."""
    model, proc = tiny
    task = load_task("synthetic", limit=2)  # 10 questions
    out = tmp_path_factory.mktemp("run")
    original = bench_cell.evaluate_cell
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(args[1:3])
        if len(calls) == 4:
            raise KeyboardInterrupt  # the user hits Ctrl-C during the 4th cell
        return original(*args, **kwargs)

    bench_cell.evaluate_cell = interrupted
    try:
        with pytest.raises(KeyboardInterrupt):
            run_bench(model, proc, task, out, _config(), model_name="tiny")
    finally:
        bench_cell.evaluate_cell = original
    first_lines = (out / RESULTS_FILE).read_text().splitlines()
    with open(out / RESULTS_FILE, "a") as handle:  # a line torn by a kill
        handle.write('{"cell": "random@0.')

    resumed = []

    def counting(*args, **kwargs):
        resumed.append(args[1:3])
        return original(*args, **kwargs)

    bench_cell.evaluate_cell = counting
    try:
        result = run_bench(model, proc, task, out, _config(), model_name="tiny")
    finally:
        bench_cell.evaluate_cell = original
    return out, first_lines, result, resumed


def test_runner_writes_one_line_per_cell_and_resumes(bench_run):
    out, first_lines, result, resumed = bench_run
    # none@1.0, random@0.5, random@0.25 finished before the interruption (the 4th cell was lost).
    assert [json.loads(line)["cell"] for line in first_lines] == ["none@1.0", "random@0.5", "random@0.25"]
    lines = (out / RESULTS_FILE).read_text().splitlines()
    assert lines[: len(first_lines)] == first_lines  # finished cells are never rewritten
    assert sorted(result.skipped) == sorted(["none@1.0", "random@0.5", "random@0.25"])
    assert [(m, k) for m, k in resumed] == [
        ("divprune", 0.5),
        ("divprune", 0.25),
        ("catp_llm", 0.5),
        ("catp_llm", 0.25),
        ("fastv", 0.5),
        ("fastv", 0.25),
    ]
    rows = {r["cell"]: r for r in read_rows(out / RESULTS_FILE)}
    assert len(rows) == 9
    ref = rows["none@1.0"]
    assert ref["status"] == "ok" and ref["visual_tokens"] == 16 and ref["speedup"] > 0
    half = rows["divprune@0.5"]
    assert half["status"] == "ok" and half["visual_tokens"] == 8
    assert half["flops"] < ref["flops"] and half["kv_bytes"] < ref["kv_bytes"]
    assert set(half["accuracy"]) == {"color", "exist", "count", "position", "read", "mean"}
    assert half["retention"] is None or half["retention"] >= 0
    assert rows["catp_llm@0.25"]["status"] == "error" and "decoder layers" in rows["catp_llm@0.25"]["error"]
    fastv = rows["fastv@0.25"]
    assert fastv["status"] == "unreachable" and "from layer 1" in fastv["error"] and "accuracy" not in fastv
    for row in rows.values():  # every measured cell meets its layer-averaged budget
        if row["status"] == "ok":
            assert row["visual_tokens_layer_avg"] <= row["budget_tokens"] + 0.5
            assert row["latency_pairs"] >= 5 and isinstance(row["latency_noisy"], bool)
    # A third run has nothing left to do.
    again = run_bench(*tiny_llava(layers=3), load_task("synthetic", limit=2), out, _config(), model_name="tiny",
                      write_report=False)  # fmt: skip
    assert again.computed == [] and len(again.skipped) == 9


def test_resume_refuses_a_different_run(tiny, bench_run):
    out = bench_run[0]
    with pytest.raises(ValueError, match="another --out"):
        run_bench(*tiny, load_task("synthetic", limit=1), out, _config(), model_name="tiny")


def test_report_has_the_table_plots_and_picture_grid(bench_run):
    out, _, result, _ = bench_run
    report = (out / REPORT_FILE).read_text()
    assert result.report == out / REPORT_FILE
    header = "| method | stage | keep | budget tokens | layer-avg tokens | final tokens | mean % | retention % | FLOPs"
    assert header in report
    assert "color %" in report and "read %" in report
    for cell in (
        "| none | - | 1.0 (ref) |",
        "| divprune | projector | 0.5 | 8.00 | 8.00 | 8.00 |",
        "| random | projector | 0.25 |",
        "| catp_llm | llm | 0.25 | - | - | - | error",
        "| fastv | llm | 0.25 | - | - | - | unreachable",
    ):
        assert cell in report
    assert "## Errors" in report and "## Unreachable budgets" in report
    grids = sorted(out.glob("kept_tokens_*.png"))
    assert [p.name for p in grids] == ["kept_tokens_projector.png"]  # fastv and catp_llm have no ok cell at 0.25
    for path in [out / PLOT_TOKENS, out / PLOT_FLOPS, out / PLOT_SPEEDUP, *grids]:
        assert path.exists() and path.stat().st_size > 5_000, path
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("L"))
        assert pixels.std() > 5, path  # not a blank canvas


def test_in_llm_methods_meet_the_layer_averaged_budget(tmp_path):
    model, proc = tiny_llava(layers=8)
    config = _config(methods=["fastv", "pdrop"], keeps=(1.0, 0.5))
    result = run_bench(model, proc, load_task("synthetic", limit=1), tmp_path, config, model_name="tiny8",
                       write_report=False)  # fmt: skip
    rows = {r["cell"]: r for r in result.rows}
    for name in ("fastv@0.5", "pdrop@0.5"):
        row = rows[name]
        assert row["status"] == "ok" and row["kwargs"] == {"average_budget": True}, row.get("error")
        assert row["budget_tokens"] == 8 and 7.0 <= row["visual_tokens_layer_avg"] <= 8.0
        assert row["visual_tokens"] < 8  # fewer than the budget after the layer, all of them before it
        assert row["flops"] < rows["none@1.0"]["flops"]
    # fastv (layer 2 of 32 scaled to 8 layers: 1) keeps 16 tokens in layer 0, s after: (16 + 7 s) / 8 <= 8, s = 6
    assert rows["fastv@0.5"]["visual_tokens"] == 6 and rows["fastv@0.5"]["stage_layers"] == [1]


# ---------------------------------------------------------------------------------------------- loaders


def _save_images(folder, n):
    names = []
    for i in range(n):
        name = f"img{i}.png"
        random_image(i, (40, 30)).save(folder / name)
        names.append(name)
    return names


def test_pope_loader_maps_a_local_json_file(tmp_path):
    names = _save_images(tmp_path, 6)
    rows = [
        {"question_id": i, "question": f"Is there a cat in the image {i}?", "answer": "Yes" if i % 2 else "no",
         "image": names[i], "category": ["adversarial", "popular", "random"][i % 3], "image_source": "coco"}
        for i in range(6)
    ]  # fmt: skip
    data = tmp_path / "pope.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    task = load_task("pope", limit=1, data=str(data), cache_dir=str(tmp_path / "cache"))
    assert [s.family for s in task.samples] == ["adversarial", "popular", "random"]
    assert [s.answer for s in task.samples] == ["no", "yes", "no"]
    assert task.samples[1].question == "Is there a cat in the image 1?"
    assert task.samples[0].image.size == (40, 30) and task.samples[0].image.mode == "RGB"
    assert task.match("Yes.", "yes") and task.families == ("adversarial", "popular", "random")
    assert len(load_task("pope", data=str(data), cache_dir=str(tmp_path / "cache")).samples) == 6


def test_gqa_loader_maps_a_local_parquet_file(tmp_path):
    datasets = pytest.importorskip("datasets")
    images = [random_image(10 + i, (32, 24)) for i in range(5)]
    table = {
        "id": [str(i) for i in range(5)],
        "imageId": [f"n{i}" for i in range(5)],
        "question": ["Is the cup on the left?", "What color is the car?", "Who wears the hat?", "Is it red?",
                     "Which is bigger, the dog or the cat?"],
        "answer": ["yes", "red", "man", "no", "dog"],
        "types": [{"structural": t, "semantic": "attr", "detailed": "x"}
                  for t in ("verify", "query", "query", "verify", "choose")],
        "image": images,
    }  # fmt: skip
    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "imageId": datasets.Value("string"),
            "question": datasets.Value("string"),
            "answer": datasets.Value("string"),
            "types": {k: datasets.Value("string") for k in ("structural", "semantic", "detailed")},
            "image": datasets.Image(),
        }
    )
    data = tmp_path / "gqa.parquet"
    datasets.Dataset.from_dict(table, features=features).to_parquet(str(data))
    task = load_task("gqa", limit=1, data=str(data), cache_dir=str(tmp_path / "cache"))
    assert [(s.family, s.answer) for s in task.samples] == [("verify", "yes"), ("query", "red"), ("choose", "dog")]
    assert task.samples[1].image.size == (32, 24)
    assert np.array_equal(np.asarray(task.samples[1].image), np.asarray(images[1]))
    assert task.match("The red one.", "red") and not task.match("blue", "red")


# ------------------------------------------------------------------------------------------- viz and show


def test_tile_layout_follows_the_aspect_ratio():
    assert tile_layout(2, 2.0) == (1, 2) and tile_layout(2, 0.5) == (2, 1) and tile_layout(4, 1.2) == (2, 2)


@pytest.mark.parametrize("build", [tiny_llava_next, tiny_qwen2_5_vl])
def test_overlay_darkens_dropped_patches_on_next_and_qwen(build):
    model, proc = build()
    image = random_image(3, (84, 56))
    if build is tiny_qwen2_5_vl:
        text = "<|vision_start|> <|image_pad|> <|vision_end|> what is the color ?"
    else:
        text = "<image> what is the color ?"
    inputs = proc(images=[image], text=[text], return_tensors="pt")
    with tokensieve.sieve(model, "random", keep=0.5) as s, torch.inference_mode():
        model(**inputs)
    info, kept = s.trace.images[(0, 0)], s.trace.kept(0, 0)
    full = np.asarray(overlay(image, None, info), dtype=float)
    half = np.asarray(overlay(image, kept, info), dtype=float)
    assert full.shape == half.shape
    darker = (half.sum(-1) < full.sum(-1) - 1).mean()
    assert 0.15 < darker < 0.85  # roughly the dropped half is darkened, the rest untouched


def test_bench_cli_standalone(tmp_path, tiny, capsys):
    model, proc = tiny
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    proc.save_pretrained(folder)
    out = tmp_path / "run"
    argv = ["bench", "--model", str(folder), "--device", "cpu", "--limit", "1", "--methods", "random,pool",
            "--keep", "1.0,4", "--out", str(out), "--no-progress"]  # fmt: skip
    assert bench_main(argv) == 0
    printed = capsys.readouterr().out
    assert "| random | projector | 4 |" in printed and "| pool | projector | 4 |" in printed
    assert "| none | - | 1.0 (ref) |" in printed
    assert len(read_rows(out / RESULTS_FILE)) == 3
    assert parse_keep("64") == 64 and parse_keep("0.11") == 0.11 and isinstance(parse_keep("1.0"), float)


def test_ratio_budgets_become_one_count_for_every_method(tiny):
    from tokensieve.bench.cell import equal_count_keep
    from tokensieve.methods.base import make_method

    model = tiny[0]  # 16 tokens per image, fixed by the family
    assert make_method("divprune", keep=0.22).budget(16) == 4  # DivPrune's own rounding: round(3.52)
    assert make_method("random", keep=0.22).budget(16) == 3  # floor
    assert equal_count_keep(model, 0.22) == 3 and equal_count_keep(model, 4) == 4
    assert equal_count_keep(model, 1.0) == 1.0
    assert make_method("divprune", keep=equal_count_keep(model, 0.22)).budget(16) == 3


def test_stage_budgets_run_in_llm_methods_at_their_stage_count(tmp_path, tiny):
    config = _config(methods=["fastv"], keeps=(1.0, 0.25), average_budget=False)
    result = run_bench(*tiny, load_task("synthetic", limit=1), tmp_path / "stage", config, model_name="tiny",
                       write_report=False)  # fmt: skip
    row = {r["cell"]: r for r in result.rows}["fastv@0.25"]
    assert row["status"] == "ok" and row["visual_tokens"] == 4  # the stage count, kept from layer 1 on
    assert row["visual_tokens_layer_avg"] > row["budget_tokens"]  # so its layer average is above the budget

"""lmms-eval integration: model-args parsing, prompts, batched sieved generation, the offline task, and (marker
``integration``) the ``lmms-eval`` command on the embedded model against ``tokensieve bench``."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tokensieve.bench.loaders import Task, build_prompt, load_task
from tokensieve.bench.metrics import exact_match
from tokensieve.embedded.synthetic import FAMILIES, make_split
from tokensieve.integrations.lmms.args import parse_model_args
from tokensieve.integrations.lmms.engine import Prompt, SievedVLM, cut_at_stop, generation_kwargs
from tokensieve.integrations.lmms.prompts import build_prompt as lmms_prompt
from tokensieve.integrations.lmms.task import task_rows, write_task
from tokensieve.methods import MethodError
from tokensieve.methods.base import make_method
from tokensieve.testing import random_image, tiny_qwen2_5_vl

HAS_LMMS = importlib.util.find_spec("lmms_eval") is not None


def _messages(question: str, images: int = 1) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}] * images + [{"type": "text", "text": question}]}]


# ------------------------------------------------------------------------------------------------ model args


def test_model_args_keep_count_fraction_and_hyperparameters():
    args = parse_model_args({"pretrained": "embedded", "method": "zoo", "keep": "64", "seed": 3})
    assert args.keep == 64 and isinstance(args.keep, int) and args.hyperparameters == {"seed": 3}
    assert parse_model_args({"pretrained": "p", "method": "divprune", "keep": 0.11}).keep == 0.11
    assert parse_model_args({"pretrained": "p", "method": "divprune", "keep": "1.0"}).keep == 1.0
    plain = parse_model_args({"pretrained": "p", "batch_size": 4, "device": "cpu"})
    assert not plain.prunes and plain.load["batch_size"] == 4 and plain.load["device"] == "cpu"
    assert args.sieve_kwargs() == {"method": "zoo", "keep": 64, "seed": 3}


def test_model_args_errors_name_the_fix():
    with pytest.raises(ValueError, match="pretrained"):
        parse_model_args({"method": "zoo"})
    with pytest.raises(ValueError, match="unpruned"):
        parse_model_args({"pretrained": "p", "method": "none", "keep": 64})
    with pytest.raises(MethodError, match="no hyperparameter"):
        parse_model_args({"pretrained": "p", "method": "divprune", "keep": 8, "bogus": 1})
    with pytest.raises(Exception, match="keep"):
        parse_model_args({"pretrained": "p", "method": "divprune", "keep": 1.5})
    with pytest.raises(Exception, match="nosuchmethod"):
        parse_model_args({"pretrained": "p", "method": "nosuchmethod"})


def test_generation_kwargs_and_stop_strings():
    _, processor = _embedded()
    greedy, until = generation_kwargs({"max_new_tokens": 3, "temperature": 0, "until": "\n\n"}, 128, processor)
    assert greedy["max_new_tokens"] == 3 and greedy["do_sample"] is False and until == ["\n\n"]
    assert "temperature" not in greedy
    sampled, _ = generation_kwargs({"temperature": 0.7, "top_p": 0.9, "num_beams": 1}, 16, processor)
    assert sampled["do_sample"] and sampled["temperature"] == 0.7 and sampled["top_p"] == 0.9
    assert sampled["max_new_tokens"] == 16
    assert cut_at_stop("red\n\nmore", ["\n\n"]) == "red"


# ------------------------------------------------------------------------------------------------ prompts

_EMBEDDED: dict = {}


def _embedded():
    if not _EMBEDDED:
        engine = SievedVLM(parse_model_args({"pretrained": "embedded", "device": "cpu"}))
        _EMBEDDED["pair"] = (engine.model, engine.processor)
    return _EMBEDDED["pair"]


@pytest.mark.parametrize("which", ["embedded", "qwen"])
def test_prompt_is_the_bench_prompt(which):
    processor = _embedded()[1] if which == "embedded" else tiny_qwen2_5_vl()[1]
    sample = make_split("test", 1)[2]
    task = Task(name="synthetic", samples=[sample], match=exact_match, max_new_tokens=2)
    assert lmms_prompt(processor, _messages(sample.question)) == build_prompt(processor, sample, task)


# ------------------------------------------------------------------------------------------------ engine


def _engine(**spec) -> SievedVLM:
    model, processor = _embedded()
    return SievedVLM(parse_model_args({"pretrained": "embedded", **spec}), model=model, processor=processor)


def test_engine_matches_bench_and_is_batch_independent():
    samples = make_split("test", 2)
    prompts = [Prompt([s.image], _messages(s.question)) for s in samples]
    gen = {"max_new_tokens": 2, "until": ["\n\n"], "temperature": 0}
    engine = _engine(method="divprune", keep=0.11)
    batched = engine.generate(prompts, gen)
    single = [engine.generate([p], gen)[0] for p in prompts[:4]]
    assert [a.text for a in single] == [a.text for a in batched[:4]]
    assert [a.stats for a in single] == [a.stats for a in batched[:4]]
    budget = make_method("divprune", keep=0.11).budget(144)  # DivPrune's own rounding: int(round(0.11 * 144))
    assert all(a.stats["visual_tokens"] == budget and a.stats["image_tokens"] == 144 for a in batched)
    assert not engine.model._forward_hooks and not engine.model._forward_pre_hooks  # sieve left nothing behind

    from tokensieve.embedded.evaluate import accuracy, answer
    from tokensieve.sieve import sieve

    model, processor = _embedded()
    with sieve(model, "divprune", keep=0.11):
        reference = answer(model, processor, samples, batch_size=5)
    assert [a.text for a in batched] == reference
    assert accuracy(samples, [a.text for a in batched])["mean"] == accuracy(samples, reference)["mean"]


def test_engine_layer_average_for_an_llm_stage_method():
    sample = make_split("test", 1)[0]
    answer = _engine(method="fastv", keep=16).generate([Prompt([sample.image], _messages(sample.question))], {})[0]
    n_layers = _embedded()[0].config.text_config.num_hidden_layers
    k = make_method("fastv", keep=16).llm_layers(n_layers)[0]  # the paper's layer 2 of 32, scaled to this depth
    expected = (k * 144 + (n_layers - k) * 16) / n_layers
    assert answer.stats["visual_tokens"] == 16
    assert answer.stats["visual_tokens_layer_avg"] == pytest.approx(expected, abs=1e-3)
    plain = _engine().generate([Prompt([sample.image], _messages(sample.question))], {"max_new_tokens": 2})[0]
    assert plain.stats["visual_tokens"] == plain.stats["visual_tokens_layer_avg"] == 144


def test_engine_loads_a_saved_qwen2_5_vl_without_torchvision(tmp_path):
    model, processor = tiny_qwen2_5_vl(layers=2)
    processor.tokenizer.chat_template = (  # words of the tiny vocabulary only ("answer:" would be <unk>)
        "{% for m in messages %}{% for c in m['content'] %}{% if c['type'] == 'image' %}"
        "<|vision_start|> <|image_pad|> <|vision_end|> {% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %}"
    )
    model.save_pretrained(tmp_path)
    processor.tokenizer.save_pretrained(tmp_path)  # a checkpoint's files; AutoProcessor needs torchvision for
    processor.image_processor.save_pretrained(tmp_path)  # Qwen's video processor, so the fallback builds one
    engine = SievedVLM(parse_model_args({"pretrained": str(tmp_path), "method": "divprune", "keep": 3}))
    images = [random_image(1, (56, 56)), random_image(2, (84, 56))]
    prompts = [Prompt([image], _messages("what is the color ?")) for image in images]
    answers = engine.generate(prompts, {"max_new_tokens": 2})
    assert [a.stats["kept_per_image"] for a in answers] == [[3], [3]]
    assert [a.stats["image_tokens"] for a in answers] == [4, 6]
    again = engine.generate(prompts[1:], {"max_new_tokens": 2})[0]
    assert again.text == answers[1].text and again.stats == answers[1].stats


# ------------------------------------------------------------------------------------------------ task


def test_task_rows_are_the_bench_questions(tmp_path):
    rows = task_rows("test", 3)
    samples = load_task("synthetic", limit=3).samples
    assert [(r["question"], r["answer"], r["family"]) for r in rows] == [
        (s.question, s.answer, s.family) for s in samples
    ]
    pytest.importorskip("datasets")
    folder = write_task(tmp_path, limit=2)
    yaml = (folder / "tokensieve_synthetic.yaml").read_text()
    assert str(folder / "tokensieve_synthetic_test.parquet") in yaml and "max_new_tokens: 2" in yaml
    import datasets

    data = datasets.load_dataset("parquet", data_files={"test": yaml.split("test: ")[1].split("\n")[0]})["test"]
    assert len(data) == 2 * len(FAMILIES) and data[0]["image"].size == samples[0].image.size


# ------------------------------------------------------------------------------------------------ lmms-eval CLI

LIMIT = 4  # questions per family in the CLI test
CELLS = [("none", None, True), ("divprune", 0.11, False), ("fastv", 0.11, False)]  # (method, keep, simple)


def _lmms_eval_command() -> list[str]:
    found = Path(sys.executable).with_name("lmms-eval")
    return [str(found)] if found.exists() else [shutil.which("lmms-eval") or "lmms-eval"]


def _run_lmms_eval(tmp: Path, method: str, keep, simple: bool) -> tuple[float, list[dict]]:
    model_args = "pretrained=embedded,device=cpu" + ("" if keep is None else f",method={method},keep={keep}")
    out = tmp / f"run_{method}"
    command = _lmms_eval_command() + [
        "--model", "tokensieve", "--model_args", model_args, "--tasks", "tokensieve_synthetic",
        "--include_path", str(tmp / "tasks"), "--batch_size", "8", "--output_path", str(out),
        "--log_samples", "--verbosity", "DEBUG",  # DEBUG: lmms-eval re-raises errors (else it exits 0)
    ]  # fmt: skip
    if simple:
        command.append("--force_simple")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_HOME": str(tmp / "hf_home"), "OMP_NUM_THREADS": "1"}  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = sorted(out.rglob("*_results.json"))
    samples = sorted(out.rglob("*_samples_tokensieve_synthetic.jsonl"))
    assert results and samples, f"no results under {out}: {done.stderr[-2000:]}"
    score = json.loads(results[-1].read_text())["results"]["tokensieve_synthetic"]["exact_match,none"]
    logged = [json.loads(line) for line in samples[-1].read_text().splitlines() if line.strip()]
    return score, sorted(logged, key=lambda row: row["doc_id"])


@pytest.mark.integration
@pytest.mark.skipif(not HAS_LMMS, reason="lmms-eval is not importable here; .ci/integration builds its venv")
def test_lmms_eval_command_matches_tokensieve_bench(tmp_path):
    from tokensieve.bench.cell import equal_count_keep
    from tokensieve.bench.runner import BenchConfig, run_bench

    write_task(tmp_path / "tasks", limit=LIMIT)
    model, processor = _embedded()
    # Stage budgets (what the lmms-eval model runs with keep=...), not the bench's layer-averaged default.
    config = BenchConfig(
        methods=[m for m, k, _ in CELLS if k is not None], keeps=[1.0, 0.11], batch_size=8,
        latency_batch=1, n_viz=0, progress=False, average_budget=False,
    )  # fmt: skip
    rows = run_bench(model, processor, load_task("synthetic", limit=LIMIT), tmp_path / "bench", config,
                     write_report=False).rows  # fmt: skip
    bench = {row["method"]: row for row in rows}
    samples = make_split("test", LIMIT)
    for method, _keep, simple in CELLS:
        # the bench gives every method one token count on this fixed-size family (floor(0.11 * 144) = 15)
        count = None if _keep is None else equal_count_keep(model, _keep)
        score, logged = _run_lmms_eval(tmp_path, method, count, simple)
        row = bench[method]
        assert row["status"] == "ok", row
        assert [r["doc_id"] for r in logged] == list(range(len(samples)))
        per_family: dict[str, list[float]] = {}
        for record, sample in zip(logged, samples, strict=True):
            per_family.setdefault(sample.family, []).append(record["exact_match"])
        lmms_families = {f: sum(v) / len(v) for f, v in per_family.items()}
        assert lmms_families == pytest.approx({f: row["accuracy"][f] for f in FAMILIES}), method
        assert score == pytest.approx(row["accuracy"]["mean"]), method
        counts = [record["token_counts"][0] for record in logged]
        assert sum(c["visual_tokens"] for c in counts) / len(counts) == pytest.approx(row["visual_tokens"])
        average = sum(c["visual_tokens_layer_avg"] for c in counts) / len(counts)
        assert average == pytest.approx(row["visual_tokens_layer_avg"], abs=1e-3)
    assert torch.is_grad_enabled()  # nothing above left inference mode switched on

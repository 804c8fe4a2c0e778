"""Tests of the embedded model's v2 pieces: scene layout, captions, chat template, unknown-word warning,
the quick-start loader, and the resumable training recipe (on a tiny configuration)."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from tokensieve.bench.usage import synthetic_layout
from tokensieve.embedded import SAMPLE_ANSWER, load
from tokensieve.embedded import sample as shipped_sample
from tokensieve.embedded import train as train_v2
from tokensieve.embedded.build import (
    CHAT_TEMPLATE,
    EMBEDDED_DIR,
    OutOfVocabularyWarning,
    build_processor,
    build_tokenizer,
)
from tokensieve.embedded.clip_stage import caption, hard_negative
from tokensieve.embedded.evaluate import answer
from tokensieve.embedded.synthetic import (
    FAMILIES,
    GRID,
    V1,
    V2,
    V2_VOCABULARY_WORDS,
    make_incontext,
    make_split,
    make_training_example,
    prompt_for,
)


def _messages(sample) -> list[dict]:
    messages = []
    images = sample.image if isinstance(sample.image, list) else [sample.image]
    for (question, reply), _ in zip(sample.context, images, strict=False):
        messages.append({"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]})
        messages.append({"role": "assistant", "content": [{"type": "text", "text": reply}]})
    messages.append({"role": "user", "content": [{"type": "image"}, {"type": "text", "text": sample.question}]})
    return messages


def test_chat_template_writes_the_training_prompt():
    processor = build_processor()
    for sample in make_split("val", 1) + make_incontext(3):
        text = processor.apply_chat_template(_messages(sample), add_generation_prompt=True)
        assert text == prompt_for(sample)
    assert processor.tokenizer.chat_template == CHAT_TEMPLATE


def test_tokenizer_normalises_case_and_question_marks():
    tokenizer = build_tokenizer()
    plain = tokenizer("what color is the circle ?")["input_ids"]
    assert tokenizer("What color is the Circle?")["input_ids"] == plain
    assert tokenizer.unk_token_id not in plain


def test_processor_warns_on_unknown_words():
    processor = build_processor()
    image = make_split("val", 1)[0].image
    with pytest.warns(OutOfVocabularyWarning, match="colour"):
        processor(images=[image], text=["<image> what colour is the circle ? answer:"], return_tensors="pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error", OutOfVocabularyWarning)
        processor(images=[image], text=["<image> What color is the circle? answer:"], return_tensors="pt")


def test_v2_objects_span_many_tokens_and_v1_is_unchanged():
    v2 = make_split("test", 12, layout="v2")
    v1 = make_split("test", 12, layout="v1")
    colour_tokens = [len(s.relevant_tokens) for s in v2 if s.family == "color"]
    assert np.mean(colour_tokens) >= 8 > np.mean([len(s.relevant_tokens) for s in v1 if s.family == "color"])
    assert {s.family for s in v2} == set(FAMILIES)
    assert all(s.image.size == v1[0].image.size for s in v2)
    assert [np.asarray(s.image).tobytes() for s in make_split("test", 2, layout=V2)] == [
        np.asarray(s.image).tobytes() for s in make_split("test", 2, layout="v2")
    ]
    assert make_split("test", 1, layout=V1)[0].question == v1[0].question


def test_default_layout_is_the_shipped_models(tmp_path, monkeypatch):
    from tokensieve.embedded import scenes

    (tmp_path / "config.json").write_text(json.dumps({"embedded_layout": "v2"}))
    monkeypatch.setattr(scenes, "SHIPPED_MODEL_DIR", tmp_path)
    assert scenes.get_layout() is V2
    assert [s.question for s in make_split("test", 2)] == [s.question for s in make_split("test", 2, layout="v2")]
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava"}))  # predates the field: v1
    assert scenes.get_layout() is V1
    assert scenes.layout_of_folder(tmp_path / "missing") == "v1"
    assert synthetic_layout(str(tmp_path)) is None and synthetic_layout("embedded") is None  # then: the shipped
    (tmp_path / "config.json").write_text(json.dumps({"embedded_layout": "v2"}))
    assert synthetic_layout(str(tmp_path)) == "v2"
    with pytest.raises(ValueError, match="unknown scene layout"):
        scenes.get_layout("v3")


def test_captions_name_every_object_and_hard_negatives_differ():
    tokenizer = build_tokenizer(V2_VOCABULARY_WORDS)
    rng = np.random.default_rng(0)
    for _ in range(20):
        scene = make_training_example(rng, max_turns=1, layout=V2).scene
        text = caption(scene)
        assert len(text.split(" . ")) == len(scene.objects)
        assert hard_negative(scene, rng) != text
        assert tokenizer.unk_token_id not in tokenizer(text)["input_ids"]


def test_train_tiny_help_and_refuses_the_shipped_folder(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_v2.main(["--help"])
    assert exit_info.value.code == 0
    assert "--ship" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        train_v2.main(["--out-dir", str(EMBEDDED_DIR)])
    assert exit_info.value.code == 2
    assert "shipped weights" in capsys.readouterr().err


TINY = dict(
    vision_hidden=32, vision_layers=1, text_hidden=32, text_layers=2, heads=2, instruct_pointer_layer=1,
    clip_steps=2, clip_batch=2,
    dense_steps=2, dense_batch=2,
    align_steps=2, align_batch=2, instruct_steps=2, instruct_batch=2, eval_every=1000, eval_per_family=1,
    warmup_steps=1,
)  # fmt: skip


def test_recipe_runs_every_stage_and_resumes_exactly(tmp_path: Path):
    torch.set_num_threads(1)
    straight = tmp_path / "straight"
    train_v2.train(train_v2.V2Config(**TINY), straight)
    for stage in train_v2.STAGES:
        assert (straight / stage / "model.safetensors").exists()
    final = train_v2.Run(train_v2.V2Config(**TINY), straight)
    assert final.resume() and final.stage == len(train_v2.STAGES)

    # Same run, stopped after the first CLIP step (as a Ctrl-C would), then resumed by a new process.
    stopped = tmp_path / "stopped"
    run = train_v2.Run(train_v2.V2Config(**TINY), stopped)
    run.new_optimizer()
    run.one_step("clip")
    run.step = 1
    run.save()
    train_v2.train(train_v2.V2Config(**TINY), stopped)
    a = train_v2.Run(train_v2.V2Config(**TINY), straight)
    b = train_v2.Run(train_v2.V2Config(**TINY), stopped)
    a.resume(), b.resume()
    for (name, x), (_, y) in zip(a.model.state_dict().items(), b.model.state_dict().items(), strict=True):
        assert torch.equal(x, y), name
    with pytest.raises(train_v2.CheckpointMismatchError, match="align_lr"):
        train_v2.Run(train_v2.V2Config(**{**TINY, "align_lr": 0.5}), stopped).resume()
    (stopped / "train.lock").write_text(str(os.getppid()))  # a live process holds the folder
    with pytest.raises(train_v2.RunFolderError, match="another training process"):
        train_v2.train(train_v2.V2Config(**TINY), stopped)
    (stopped / "train.lock").write_text("999999999")  # a stale lock is taken over
    train_v2.train(train_v2.V2Config(**TINY), stopped)
    assert not (stopped / "train.lock").exists()


DEFAULT_INSTRUCT_LR = train_v2.V2Config().instruct_lr


def test_stages_not_begun_may_change_their_steps_on_resume(tmp_path: Path):
    run = train_v2.Run(train_v2.V2Config(**TINY), tmp_path)
    run.new_optimizer()
    run.step = 1  # inside the CLIP stage
    run.save()
    later = {**TINY, "align_steps": TINY["align_steps"] + 5, "instruct_lr": 0.01}
    resumed = train_v2.Run(train_v2.V2Config(**later), tmp_path)
    assert resumed.resume()
    assert resumed.changed_on_resume == {"align_steps": (2, 7), "instruct_lr": (DEFAULT_INSTRUCT_LR, 0.01)}
    with pytest.raises(train_v2.CheckpointMismatchError, match="clip_steps"):
        train_v2.Run(train_v2.V2Config(**{**TINY, "clip_steps": TINY["clip_steps"] + 5}), tmp_path).resume()
    run.stage, run.step = train_v2.STAGES.index("align"), 0  # align about to begin (as finish_stage leaves it)
    run.new_optimizer()
    run.save()
    assert train_v2.Run(train_v2.V2Config(**later), tmp_path).resume()
    train_v2.train(train_v2.V2Config(**later), tmp_path)  # the log names the recipe the later stages ran with
    assert "changed at this resume: align_steps 2 -> 7, instruct_lr" in (tmp_path / "training_log.txt").read_text()


def test_a_checkpoint_of_a_recipe_with_other_stages_is_refused(tmp_path: Path):
    run = train_v2.Run(train_v2.V2Config(**TINY), tmp_path)
    run.new_optimizer()
    run.save()
    state = torch.load(run.state_path, weights_only=False)
    state["stages"] = ("clip", "align", "instruct")  # the first v2 recipe's, without the dense stage
    torch.save(state, run.state_path)
    with pytest.raises(train_v2.CheckpointMismatchError, match="other stages"):
        train_v2.Run(train_v2.V2Config(**TINY), tmp_path).resume()


def test_quick_start_answers_the_sample():
    import tokensieve

    model, processor = load()
    image, question = shipped_sample()
    assert image.size == (GRID * 14, GRID * 14)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=[image], text=[prompt], return_tensors="pt")
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=3)
    new = output[0, inputs["input_ids"].shape[1] :]
    assert processor.decode(new, skip_special_tokens=True).strip() == SAMPLE_ANSWER
    with tokensieve.sieve(model, "divprune", keep=0.25), torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=3)
    assert processor.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip() == "red"


def test_evaluation_uses_the_layout_of_the_checkpoint():
    from tokensieve.embedded.check import layout_of

    model, processor = load()
    assert layout_of(model) in ("v1", "v2")
    samples = make_split("test", 1, layout=layout_of(model))
    assert len(answer(model, processor, samples)) == len(FAMILIES)


@pytest.mark.parametrize("sink_weight", [1.0, 4.0])
def test_spread_pointers_cover_every_token_of_the_matching_objects_equally(sink_weight: float):
    from tokensieve.embedded.batches import BatchBuilder
    from tokensieve.embedded.stages import instruct_batch

    tokenizer = build_tokenizer(V2_VOCABULARY_WORDS)
    spread = BatchBuilder(tokenizer, GRID * GRID, spread_pointers=True, sink_weight=sink_weight)
    rng = np.random.default_rng(3)
    example = make_training_example(rng, max_turns=8, layout=V2)
    ids, _, pointers = spread.row_with_pointers([example])
    image_start = ids.index(spread.image_id)
    assert pointers, "every v2 example has questions naming a colour or shape"
    by_query = {query: keys for query, keys, _ in pointers}
    checked = 0
    for turn, (question, _) in enumerate(example.turns):
        objects, with_start = example.pointer_objects[turn]
        query = _answer_position(ids, tokenizer, turn)
        if query not in by_query:
            continue
        keys = by_query[query]
        total = sum(keys.values())
        denominator = len(objects) + sink_weight * with_start
        for index in objects:
            tokens = [image_start + t for t in example.object_tokens[index]]
            assert set(tokens) <= set(keys)
            share = sum(keys[t] / total for t in tokens)
            assert share == pytest.approx(1 / denominator, abs=0.02), question
        assert (0 in keys) == with_start
        if with_start:
            assert keys[0] / total == pytest.approx(sink_weight / denominator, abs=0.02), question
        checked += 1
    assert checked
    with pytest.raises(ValueError, match="sink_weight"):
        BatchBuilder(tokenizer, GRID * GRID, sink_weight=0.0)
    batch = instruct_batch(spread, np.random.default_rng(4), 4, 0.0, with_pointers=True)
    assert torch.allclose(batch["pointer_target"].sum(-1), torch.ones(len(batch["pointer_row"])))
    plain = instruct_batch(BatchBuilder(tokenizer, GRID * GRID), np.random.default_rng(4), 4, 0.0)
    assert torch.equal(plain["input_ids"], batch["input_ids"]), "pointers do not change the data stream"


def _answer_position(ids: list[int], tokenizer, turn: int) -> int:
    marks = [i for i, t in enumerate(ids) if t == tokenizer.convert_tokens_to_ids("answer:")]
    return marks[turn]


def test_pointer_losses_train_the_instruct_stage_and_old_checkpoints_resume(tmp_path: Path):
    run = train_v2.Run(train_v2.V2Config(**TINY), tmp_path)
    run.stage = train_v2.STAGES.index("instruct")
    run.new_optimizer()
    losses = run.one_step("instruct")
    assert {"loss", "word", "pointer"} <= set(losses) and all(torch.isfinite(v) for v in losses.values())
    run.stage = train_v2.STAGES.index("align")
    run.save()
    state = torch.load(run.state_path, weights_only=False)
    for name in ("instruct_pointer_weight", "instruct_pointer_layer", "instruct_pointer_heads"):
        del state["config"][name]  # a checkpoint written before these settings existed
    torch.save(state, run.state_path)
    assert train_v2.Run(train_v2.V2Config(**TINY), tmp_path).resume()


def test_family_weights_set_the_primary_question_mix():
    from tokensieve.embedded.synthetic import _weighted_family

    rng = np.random.default_rng(5)
    draws = [_weighted_family(rng, {"count": 3.0}) for _ in range(2000)]
    assert draws.count("count") / len(draws) == pytest.approx(3 / 7, abs=0.04)
    assert "count" not in {_weighted_family(rng, {"count": 0.0}) for _ in range(300)}
    for bad in ({"colour": 1.0}, {"count": -1.0}, dict.fromkeys(FAMILIES, 0.0)):
        with pytest.raises(ValueError, match="family_weights"):
            _weighted_family(rng, bad)
    only_count = dict.fromkeys(FAMILIES, 0.0) | {"count": 1.0}
    example = make_training_example(np.random.default_rng(6), layout=V2, family_weights=only_count)
    assert any(question.startswith("how many") for question, _ in example.turns)


def test_a_bad_counting_weight_is_refused_before_training():
    V2Config = train_v2.V2Config

    with pytest.raises(ValueError, match="family_weights"):
        V2Config(instruct_count_weight=-1.0)
    assert V2Config(instruct_count_weight=1.0).family_weights is None
    assert V2Config().family_weights == {"count": V2Config().instruct_count_weight}

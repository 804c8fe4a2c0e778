"""The accuracy-driven length curriculum of scripts/kv_train.py, and the induction sequences it can mix in."""

from __future__ import annotations

import random

import pytest

from tokensieve.kv.curriculum import Curriculum, make_schedule
from tokensieve.kv.tasks import FILLER, TASKS, fits, make_sample, repeat_sequence

GATE = ["single", "multikey", "multivalue", "vartrack"]


def test_make_schedule_doubles_up_to_stop():
    assert make_schedule(64, 4096) == [64, 128, 256, 512, 1024, 2048, 4096]
    assert make_schedule(100, 300) == [100, 200, 300]
    assert make_schedule(512, 512) == [512]
    with pytest.raises(ValueError):
        make_schedule(1024, 512)


def test_mix_keeps_shorter_rungs_in_replay():
    cur = Curriculum(make_schedule(64, 512))
    assert cur.mix(0.5) == ([64], [1.0])
    cur.level = 2
    lengths, weights = cur.mix(0.4)
    assert lengths == [64, 128, 256]
    assert weights == pytest.approx([0.2, 0.2, 0.6])


def test_update_advances_only_when_every_gated_task_passes():
    cur = Curriculum(make_schedule(64, 256))
    acc = {"single": 1.0, "multivalue": 0.97, "vartrack": 0.90}
    assert not cur.update(10, acc, GATE, 0.95)
    assert cur.level == 0
    assert not cur.update(20, acc, ["single", "multikey", "multivalue"], 1.0)  # multivalue 0.97 < 1.0
    assert cur.update(30, acc, ["single", "multikey", "multivalue"], 0.95)  # multikey absent: did not fit
    assert cur.level == 1 and cur.length == 128
    assert not cur.update(40, {}, GATE, 0.95)  # nothing measured is never a pass
    assert [h[3] for h in cur.history] == [False, False, True, False]


def test_passing_the_top_rung_finishes_and_state_round_trips():
    cur = Curriculum([128, 256])
    full = dict.fromkeys(TASKS, 1.0)
    assert cur.update(1, full, GATE, 0.95) and cur.update(2, full, GATE, 0.95)
    assert cur.done and cur.length == 256
    assert not cur.update(3, full, GATE, 0.95)  # no rung past the top
    back = Curriculum.from_dict(cur.to_dict())
    assert back == cur and back.done


def test_fits_agrees_with_make_sample():
    rng = random.Random(0)
    for task in TASKS:
        for length in (32, 56, 60, 64, 68, 128):
            if fits(task, length, 8):
                assert len(make_sample(task, length, rng, n_distract=8).prompt) == length
            else:
                with pytest.raises(ValueError):
                    make_sample(task, length, rng, n_distract=8)
    assert not fits("multikey", 64, 8) and fits("multikey", 128, 8)


def test_repeat_sequence_labels_the_copied_span():
    rng = random.Random(3)
    for length in (64, 256, 1024):
        for _ in range(20):
            tokens, labels = repeat_sequence(length, rng)
            assert len(tokens) == len(labels) == length
            on = [i for i, y in enumerate(labels) if y != -100]
            assert on == list(range(on[0], on[-1] + 1)) and len(on) >= 3
            span = len(on) + 1
            second = on[0]
            copy = tokens[second : second + span]
            firsts = [i for i in range(1, second - span + 1) if tokens[i : i + span] == copy]
            assert firsts, "the labelled span repeats an earlier one"
            assert all(labels[i] == tokens[i + 1] for i in on)
            assert any(t >= FILLER[1] for t in copy) or span < 8  # the span draws from keys and values too


def test_a_new_ladder_on_resume_continues_at_the_saved_length():
    cur = Curriculum(make_schedule(128, 1024), level=1)  # at 256
    cur.update(5, {"single": 0.5}, GATE, 0.95)
    moved = Curriculum.from_dict(cur.to_dict(), make_schedule(64, 1024))
    assert moved.length == 256 and moved.level == 2 and moved.history == cur.history
    assert moved.mix(0.5)[0] == [64, 128, 256]
    assert Curriculum.from_dict(cur.to_dict(), make_schedule(128, 1024)) == cur
    done = Curriculum([128, 256], level=2)
    assert Curriculum.from_dict(done.to_dict(), [128, 256, 512]).length == 512

"""Training helpers of the embedded KV model: attention supervision (kv.train_attention), batches, growing."""

from __future__ import annotations

import math
import random

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tokensieve.kv.tasks import BOS, NEEDLE, PAD, VOCAB, A, Q
from tokensieve.kv.train_attention import (
    AttentionSupervisor,
    Rows,
    chain_targets,
    pointer_loss,
    sequence_targets,
    value_slots,
)
from tokensieve.kv.train_batch import batch
from tokensieve.kv.train_grow import grow_into, layer_map

KEY, VALUE, OTHER_KEY, OTHER_VALUE, FILL = 300, 600, 301, 601, 20
# BOS f NEEDLE k v f NEEDLE k' v' Q k A v   (the question's key row and its A row are labelled with v)
TOKENS = [BOS, FILL, NEEDLE, KEY, VALUE, FILL, NEEDLE, OTHER_KEY, OTHER_VALUE, Q, KEY, A, VALUE]
LABELS = [-100] * 10 + [VALUE, VALUE, -100]


def test_value_slots_and_targets_of_a_hand_built_sequence():
    assert value_slots(TOKENS) == {VALUE: [4], OTHER_VALUE: [8]}
    prev, chain, lookup = sequence_targets(TOKENS, LABELS)
    assert prev == [3, 4, 7, 8, 10, 11]  # needle key/value slots and labelled rows attend to their previous token
    assert lookup == [(10, [4]), (11, [4])]  # both labelled rows point at the asked needle's value slot
    assert chain == []  # no key repeats


def test_chain_points_each_repeated_key_at_its_previous_needle():
    v1, v2, v3 = 600, 610, 620  # multivalue: one key, three values, answered in order
    tokens = [BOS, NEEDLE, KEY, v1, FILL, NEEDLE, OTHER_KEY, OTHER_VALUE, NEEDLE, KEY, v2, NEEDLE, KEY, v3,
              Q, KEY, A, v1, v2, v3]
    labels = [-100] * 15 + [v1, v1, v2, v3, -100]
    prev, chain, lookup = sequence_targets(tokens, labels)
    assert chain == [(10, [3]), (13, [10])]
    assert lookup == [(15, [3]), (16, [3]), (17, [10]), (18, [13])]


def test_chain_modes_point_first_slots_at_bos_and_later_ones_at_every_earlier_slot():
    v1, v2, v3 = 600, 610, 620
    tokens = [BOS, NEEDLE, KEY, v1, NEEDLE, OTHER_KEY, OTHER_VALUE, NEEDLE, KEY, v2, NEEDLE, KEY, v3, Q, KEY, A]
    assert chain_targets(tokens) == [(9, [3]), (12, [9])]
    assert chain_targets(tokens, "previous-sink") == [(3, [0]), (6, [0]), (9, [3]), (12, [9])]
    assert chain_targets(tokens, "all-sink") == [(3, [0]), (6, [0]), (9, [3]), (12, [3, 9])]
    with pytest.raises(ValueError, match="modes: previous"):
        chain_targets(tokens, "latest")
    sup = AttentionSupervisor(n_layers=3, chain="all-sink")
    sup.set_batch(torch.tensor([tokens]), torch.full((1, len(tokens)), -100))
    assert sup.rows[1].row.tolist() == [3, 6, 9, 12]
    assert sup.rows[1].target[3].nonzero().flatten().tolist() == [3, 9]


def test_needles_after_the_question_are_not_targets():
    tokens = [BOS, Q, KEY, A, VALUE, NEEDLE, KEY, VALUE]
    labels = [-100, -100, VALUE, VALUE, -100, -100, -100, -100]
    assert value_slots(tokens) == {}
    assert sequence_targets(tokens, labels) == ([2, 3], [], [])


def test_pointer_loss_is_minus_log_of_the_causal_attention_mass_on_targets():
    torch.manual_seed(0)
    query, key = torch.randn(1, 2, 4, 3), torch.randn(1, 1, 4, 3)  # 2 query heads share one kv head
    target = torch.tensor([[True, False, True, False]])
    rows = Rows(torch.tensor([0]), torch.tensor([2]), target)
    got = pointer_loss(query, key, rows, head=1, scaling=0.5)
    scores = [float(query[0, 1, 2] @ key[0, 0, t]) * 0.5 for t in range(3)]  # row 2 sees positions 0..2
    probs = [math.exp(s) / sum(math.exp(x) for x in scores) for s in scores]
    assert math.isclose(float(got), -math.log(probs[0] + probs[2]), rel_tol=1e-5)


def _tiny_llama(layers: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=2, num_key_value_heads=2, head_dim=16, pad_token_id=PAD,
                      attn_implementation="sdpa")
    return LlamaForCausalLM(cfg).eval()


def test_supervision_leaves_the_forward_unchanged_and_uninstalls_to_sdpa():
    model = _tiny_llama(layers=3)
    ids, labels = torch.tensor([TOKENS]), torch.tensor([LABELS])
    with torch.no_grad():
        dense = model(ids).logits
    sup = AttentionSupervisor(n_layers=3)
    sup.install(model)
    sup.set_batch(ids, labels)
    logits = model(ids).logits
    assert torch.allclose(logits, dense, atol=1e-6)
    assert len(sup.losses) == 2  # layer 0 (prev) and the last layer (lookup); no repeated key: no chain rows
    loss = sup.loss()
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 0
    assert model.model.layers[2].self_attn.q_proj.weight.grad.abs().sum() > 0
    assert sup.rows == {} and sup.losses == []
    AttentionSupervisor.uninstall(model)
    assert model.config._attn_implementation == "sdpa"


def test_chain_rows_go_to_layer_one_of_a_three_layer_model():
    tokens = [BOS, NEEDLE, KEY, VALUE, NEEDLE, KEY, OTHER_VALUE, Q, KEY, A, VALUE, OTHER_VALUE]
    labels = [-100] * 8 + [VALUE, VALUE, OTHER_VALUE, -100]
    for layers, supervised in ((2, [0, 1]), (3, [0, 1, 2])):
        sup = AttentionSupervisor(n_layers=layers)
        sup.set_batch(torch.tensor([tokens]), torch.tensor([labels]))
        assert sorted(k for k, v in sup.rows.items() if v is not None) == supervised
    assert sup.rows[1].row.tolist() == [6] and sup.rows[1].target[0].nonzero().flatten().tolist() == [3]


def test_no_loss_is_recorded_without_grad():
    model = _tiny_llama()
    sup = AttentionSupervisor(n_layers=2)
    sup.install(model)
    sup.set_batch(torch.tensor([TOKENS]), torch.tensor([LABELS]))
    with torch.no_grad():
        model(torch.tensor([TOKENS]))
    assert sup.losses == [] and float(sup.loss()) == 0.0
    AttentionSupervisor.uninstall(model)


def test_a_few_supervised_steps_sharpen_the_prev_token_head():
    model = _tiny_llama().train()
    sup = AttentionSupervisor(n_layers=2)
    sup.install(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids, labels = batch(random.Random(0), 64, 512, 4, [1, 0, 0, 0], key_label=True)
    first = None
    for _ in range(40):
        sup.set_batch(ids, labels)
        model.model(ids)
        prev_loss = sup.losses[0]
        loss = sup.loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = float(prev_loss) if first is None else first
    assert float(prev_loss) < 0.5 * first, (first, float(prev_loss))
    AttentionSupervisor.uninstall(model)


def test_batch_pads_right_and_masks_padding():
    ids, labels = batch(random.Random(1), 128, 512, 6, [1, 1, 1, 1], key_label=True)
    assert ids.shape == labels.shape and ids.shape[0] == 4 and ids.shape[1] >= 128
    assert (ids[:, 0] == BOS).all()
    assert (labels[ids == PAD] == -100).all()
    assert ((labels != -100).sum(1) > 0).all()  # every sequence carries answer labels


def test_layer_map_keeps_bottom_and_top():
    assert layer_map(2, 3) == {0: 0, 1: 2}
    assert layer_map(3, 5) == {0: 0, 1: 1, 2: 4}
    assert layer_map(2, 2) == {0: 0, 1: 1}
    with pytest.raises(ValueError, match="cannot grow"):
        layer_map(3, 2)


def test_grown_model_computes_what_the_shallower_one_did():
    small, deep = _tiny_llama(layers=2), _tiny_llama(layers=3)
    torch.manual_seed(1)
    for p in small.parameters():  # not the seed-0 weights deep was built from
        p.data.normal_(0, 0.05)
    assert grow_into(deep, small.state_dict()) == [1]
    ids = torch.tensor([TOKENS])
    with torch.no_grad():
        assert torch.allclose(deep(ids).logits, small(ids).logits, atol=1e-6)
    assert torch.equal(deep.model.layers[2].self_attn.q_proj.weight, small.model.layers[1].self_attn.q_proj.weight)
    with pytest.raises(ValueError, match="does not fit"):
        grow_into(_tiny_llama(layers=3), {**small.state_dict(), "extra.weight": torch.zeros(1)})


def test_group_keys_makes_consecutive_groups_of_at_most_three():
    from tokensieve.kv.tasks import group_keys

    others = [[NEEDLE, 300 + i, 600 + i] for i in range(7)]
    group_keys(others, random.Random(0), share=1.0)
    assert [k for _, k, _ in others] == [300, 300, 300, 303, 303, 303, 306]
    untouched = [[NEEDLE, 300 + i, 600 + i] for i in range(7)]
    group_keys(untouched, random.Random(0), share=0.0)
    assert [k for _, k, _ in untouched] == list(range(300, 307))


def test_grouped_distractors_are_asked_in_full_and_feed_the_chain():
    from tokensieve.kv.tasks import training_sequence

    tokens, labels = training_sequence(512, random.Random(1), extra=16, task="multikey", group=1.0)
    first_q = tokens.index(Q)
    tail, tail_labels = tokens[first_q:], labels[first_q:]
    starts = [i for i, t in enumerate(tail) if t == Q]
    asked = {}
    for a, b in zip(starts, [*starts[1:], len(tail)], strict=True):
        key, values = tail[a + 1], tail[a + 3 : b]
        assert tail_labels[a + 2 : b] == values + [-100]  # A -> v1, v1 -> v2, ..., last value unlabelled
        asked[key] = values
    needles = [(tokens[p + 1], tokens[p + 2]) for p in range(first_q) if tokens[p] == NEEDLE]
    for key, values in asked.items():
        assert [v for k, v in needles if k == key] == values  # every value of the group, in order of appearance
    assert any(len(v) == 3 for v in asked.values())
    assert len(sequence_targets(tokens, labels)[1]) >= 2  # the groups give the chain head rows

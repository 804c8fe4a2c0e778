"""The dense per-patch objective of the v2 vision-tower pretraining (tokensieve.embedded.dense)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch

from tokensieve.embedded.dense import DENSE_HEADS, DenseHeads, dense_losses, dense_targets
from tokensieve.embedded.scenes import COLORS, GRID, SHAPES
from tokensieve.embedded.synthetic import V2, make_training_example


def test_every_token_of_an_object_carries_the_whole_object():
    rng = np.random.default_rng(5)
    for _ in range(20):
        example = make_training_example(rng, max_turns=1, layout=V2)
        targets = dense_targets(example.scene, example.object_tokens)
        covered = set()
        for index, tokens in example.object_tokens.items():
            obj = example.scene.objects[index]
            assert len(tokens) >= 2  # v2 objects span several tokens (small triangles 3)
            assert set(targets["shape"][tokens]) == {1 + SHAPES.index(obj.shape)}
            assert set(targets["color"][tokens]) == {1 + COLORS.index(obj.color)}
            digit = 0 if obj.digit is None else 1 + int(obj.digit)
            assert set(targets["digit"][tokens]) == {digit}  # on every token, not only the glyph's
            assert set(targets["cell"][tokens]) == {1 + obj.cell[0] * V2.cells + obj.cell[1]}
            covered.update(tokens)
        background = np.setdiff1d(np.arange(GRID * GRID), sorted(covered))
        assert all((targets[name][background] == 0).all() for name in targets)


def test_dense_losses_shapes_and_a_perfect_head():
    heads = DenseHeads(hidden=8, cells=9, feature_layer=-2)
    assert heads.classes == {**DENSE_HEADS, "cell": 10}
    targets = {name: torch.randint(0, k, (2, 144)) for name, k in heads.classes.items()}
    out = dense_losses(heads, _vision_outputs(torch.randn(2, 144, 8)), targets)
    assert out["dense"].ndim == 0 and out["dense"] > 0
    assert set(out) == {"dense", *(f"dense_{name}" for name in heads.classes)}
    # Features that one-hot encode every target let a hand-set head reach accuracy 1 and a small loss.
    width = sum(heads.classes.values())
    features = torch.cat([torch.nn.functional.one_hot(targets[n], k) for n, k in heads.classes.items()], -1).float()
    heads = DenseHeads(hidden=width, cells=9, feature_layer=-2)
    with torch.no_grad():
        heads.norm.weight.fill_(1.0)
        heads.linear.weight.copy_(50 * torch.eye(width))
        heads.linear.bias.zero_()
    out = dense_losses(heads, _vision_outputs(features), targets)
    assert all(out[f"dense_{name}"] == 1.0 for name in heads.classes)
    assert out["dense"] < 0.05


def _vision_outputs(patches: torch.Tensor) -> SimpleNamespace:
    """Hidden states whose layer -2 is a CLS token followed by ``patches`` (the last layer is never read)."""
    with_cls = torch.cat([torch.full_like(patches[:, :1], 1e3), patches], dim=1)
    return SimpleNamespace(hidden_states=(torch.zeros_like(with_cls), with_cls, torch.full_like(with_cls, -1e3)))

"""Pictures: kept-token grids at most 8 columns wide with informative panel titles, per-stage accuracy panels
of at most 8 series, and the horizon maps on the 2-D token grid."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tokensieve.bench.plots import MAX_SERIES, panel_title, plot_accuracy, stage_groups
from tokensieve.horizon import describe_horizon, information_horizon, plot_information, token_grid
from tokensieve.testing import random_image
from tokensieve.viz import Panel, picture_grid


def _info(n_side: int = 4) -> dict:
    rc = torch.stack(torch.meshgrid(torch.arange(n_side), torch.arange(n_side), indexing="ij"), -1).reshape(-1, 2)
    return {"n_tokens": n_side * n_side, "grid_rc": rc, "grid_hw": (n_side, n_side)}


def test_picture_grid_wraps_at_eight_columns(tmp_path):
    images = [random_image(i, (56, 56)) for i in range(2)]
    info = _info()
    many = [[Panel(f"m{j}", "black", list(range(j + 1)), info) for j in range(12)] for _ in images]
    wide = picture_grid(images, many, tmp_path / "wide.png", row_labels=["a", "b"], max_columns=8)
    few = picture_grid(images, [row[:3] for row in many], tmp_path / "few.png", row_labels=["a", "b"])
    with Image.open(wide) as a, Image.open(few) as b:
        # 100 dpi, 2 inches per column: 13 panels per image (original + 12) wrap into 2 rows of at most 8, so the
        # wide grid has 4 rows against the small one's 2.
        assert a.width <= 8 * 200 + 10 and a.height > 1.8 * b.height
        assert b.width <= 4 * 200 + 10


def _llm_row(**kw) -> dict:
    row = {"method": "fastv", "stage": "llm", "stage_layers": [6], "viz_layer_avg": [14.0, 14.5],
           "viz_answers": ["red", "blue"], "viz_correct": [True, False], "visual_tokens_layer_avg": 14.2}  # fmt: skip
    row.update(kw)
    return row


def test_panel_titles_say_method_stage_tokens_answer_and_right_or_wrong():
    title, color = panel_title(_llm_row(), 0)
    assert "fastv" in title and "from layer 6" in title and "14.0 tokens" in title and '"red" right' in title
    assert color == "darkgreen"
    title, color = panel_title(_llm_row(), 1)
    assert '"blue" wrong' in title and color == "firebrick"
    title, _ = panel_title(_llm_row(method="pdrop", stage_layers=[8, 16, 24]), 0)
    assert "from layer 8; shown: layer 24+" in title
    title, _ = panel_title(_llm_row(method="divprune", stage="projector", stage_layers=[0]), 0)
    assert "divprune (projector)" in title and "from layer" not in title


def test_accuracy_panels_have_at_most_eight_series(tmp_path):
    rows = [{"method": "none", "stage": "-", "keep": 1.0, "status": "ok", "accuracy": {"mean": 0.9},
             "visual_tokens_layer_avg": 16.0, "flops": 100.0, "speedup": 1.0}]  # fmt: skip
    for i in range(11):
        for keep in (0.5, 0.25):
            rows.append({"method": f"p{i:02d}", "stage": "projector", "keep": keep, "status": "ok",
                         "accuracy": {"mean": keep + i / 100}, "visual_tokens_layer_avg": 16 * keep,
                         "flops": 100 * keep, "speedup": 1 / keep})  # fmt: skip
    rows.append(dict(rows[-1], method="fastv", stage="llm"))
    rows.append(dict(rows[-1], method="random", stage="projector"))
    groups = stage_groups(rows)
    assert [label for label, _ in groups] == ["projector (1/2)", "projector (2/2)", "llm"]
    assert all(len(methods) <= MAX_SERIES for _, methods in groups)
    assert sorted(m for _, methods in groups for m in methods) == sorted({r["method"] for r in rows} - {"none"})
    for x in ("tokens", "flops", "speedup"):
        path = plot_accuracy(rows, tmp_path / f"{x}.png", x=x)
        with Image.open(path) as image:
            assert np.asarray(image.convert("L")).std() > 5


def test_horizon_maps_use_the_token_grid_and_say_when_there_is_none(tmp_path):
    info = _info(3)
    values = torch.arange(9, dtype=torch.float32)
    info["grid_rc"] = info["grid_rc"].flip(0)  # token 0 sits at the bottom right
    grid = token_grid(values, info)
    assert grid.shape == (3, 3) and grid[2, 2] == 0 and grid[0, 0] == 8
    loud = torch.ones(3, 9)
    horizon = information_horizon(loud, threshold=0.5)
    assert describe_horizon(horizon, range(3), 0.5).startswith("no horizon within 3 layers")
    assert describe_horizon(information_horizon(torch.zeros(3, 9)), range(3), 1e-3) == "layer 0"
    path = plot_information(loud, tmp_path / "h.png", horizon=horizon, layout=info, image=random_image(1))
    assert path.stat().st_size > 5_000


@pytest.mark.parametrize("n_layers", [3, 12])
def test_horizon_plot_for_shallow_and_deep_decoders(tmp_path, n_layers):
    decay = torch.linspace(1, 0, n_layers)[:, None] ** 3
    info = torch.randn(n_layers, 16, generator=torch.Generator().manual_seed(0)) * decay * 0.01
    path = plot_information(info, tmp_path / "h.png", horizon=information_horizon(info), layout=_info())
    with Image.open(path) as image:
        assert np.asarray(image.convert("L")).std() > 5

"""The report's pictures: accuracy against layer-averaged tokens (or FLOPs, or speed-up), one panel per stage
with at most :data:`MAX_SERIES` methods, and the kept-token grids, one per stage, at most 8 columns wide."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..budget import Keep
from ..viz import finish_figure

REFERENCE = "none"
BASELINE = "random"  # drawn grey in every panel: the baseline every method should beat
MAX_SERIES = 8
STAGE_ORDER = ("vision", "projector", "llm")
X_FIELDS = {
    "tokens": ("visual_tokens_layer_avg", "visual tokens per sample (average over decoder layers)"),
    "flops": ("flops", "decoder prefill FLOPs per sample (% of unpruned)"),
    "speedup": ("speedup", "prefill speed-up (x, median of paired timings)"),
}


def stage_groups(rows: Sequence[dict], max_series: int = MAX_SERIES) -> list[tuple[str, list[str]]]:
    """``(panel title, methods)`` per stage, a stage with more than ``max_series`` methods split in parts."""
    methods: dict[str, list[str]] = {}
    for row in rows:
        if row["method"] != REFERENCE and row.get("status") == "ok":
            methods.setdefault(row.get("stage", "?"), [])
            if row["method"] not in methods[row["stage"]]:
                methods[row["stage"]].append(row["method"])
    groups = []
    for stage in sorted(methods, key=lambda s: (STAGE_ORDER.index(s) if s in STAGE_ORDER else 9, s)):
        names = sorted(methods[stage])
        size = -(-len(names) // -(-len(names) // max_series))  # equal parts, none above max_series
        parts = [names[i : i + size] for i in range(0, len(names), size)]
        for i, part in enumerate(parts):
            label = f"{stage} ({i + 1}/{len(parts)})" if len(parts) > 1 else stage
            groups.append((label, part))
    return groups


def _unmeasured_stages(rows: Sequence[dict]) -> dict[str, str]:
    """Stages whose every cell is unreachable or an error, with a note saying so."""
    measured = {r.get("stage") for r in rows if r.get("status") == "ok"}
    notes: dict[str, dict[str, int]] = {}
    for row in rows:
        stage = row.get("stage", "?")
        if row["method"] != REFERENCE and stage not in measured:
            counts = notes.setdefault(stage, {"unreachable": 0, "error": 0})
            counts[row.get("status", "error") if row.get("status") == "unreachable" else "error"] += 1
    return {
        stage: f"no measured cell:\n{c['unreachable']} unreachable budgets,\n{c['error']} errors\n(see report.md)"
        for stage, c in notes.items()
    }


def _points(rows: Sequence[dict], method: str, x: str, reference: dict | None) -> list[tuple[float, float]]:
    field = X_FIELDS[x][0]
    points = []
    for row in rows:
        if row["method"] == method and row.get("status") == "ok" and row.get(field) is not None:
            value = float(row[field])
            if x == "flops" and reference is not None:
                value = 100 * value / reference["flops"]
            points.append((value, 100 * row["accuracy"]["mean"]))
    return sorted(points)


def plot_accuracy(rows: Sequence[dict], path: str | Path, x: str = "tokens", title: str = "") -> Path:
    """Mean accuracy per method against ``x`` (``tokens``, ``flops`` or ``speedup``): markers at measured cells
    only, a panel per stage, the unpruned model as a star and a dashed line, ``random`` grey in every panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reference = next((r for r in rows if r["method"] == REFERENCE and r.get("status") == "ok"), None)
    groups: list = stage_groups(rows, MAX_SERIES - 1)  # room for the grey baseline
    groups += [(stage, note) for stage, note in _unmeasured_stages(rows).items()]
    groups = groups or [("(no cells)", [])]
    fig, axes = plt.subplots(1, len(groups), figsize=(4.6 * len(groups), 4.2), squeeze=False, sharey=True)
    colors, markers = matplotlib.colormaps["tab10"], "osD^v<>P"
    for ax, (label, methods) in zip(axes[0], groups, strict=True):
        if isinstance(methods, str):  # a stage without a measured cell: say why instead of drawing nothing
            ax.text(0.5, 0.5, methods, ha="center", va="center", fontsize=9, transform=ax.transAxes, wrap=True)
            ax.set_title(f"stage: {label}", fontsize=10)
            ax.set_xticks([])
            continue
        baseline = _points(rows, BASELINE, x, reference)
        if baseline and BASELINE not in methods:
            ax.plot(*zip(*baseline, strict=True), color="0.6", ls=":", marker=".", label=f"{BASELINE} (baseline)")
        for i, method in enumerate(methods):
            points = _points(rows, method, x, reference)
            ax.plot(*zip(*points, strict=True), color=colors(i % 10), marker=markers[i % len(markers)], lw=1.2,
                    ms=5, label=method)  # fmt: skip
        if reference is not None:
            ref_y = 100 * reference["accuracy"]["mean"]
            ref_x = {"tokens": reference["visual_tokens_layer_avg"], "flops": 100.0, "speedup": 1.0}[x]
            ax.axhline(ref_y, color="black", ls="--", lw=0.8)
            ax.plot([ref_x], [ref_y], marker="*", color="black", ms=11, ls="none", label="unpruned")
        ax.set_title(f"stage: {label}", fontsize=10)
        ax.set_xlabel(X_FIELDS[x][1], fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    axes[0][0].set_ylabel("mean accuracy (%)")
    axes[0][0].set_ylim(-3, 103)  # markers at 0% or 100% stay visible
    return finish_figure(fig, path, title)


def panel_title(row: dict, index: int) -> tuple[str, str]:
    """Title and colour of one kept-token panel: method, stage (``from layer K`` in the LLM), layer-averaged
    tokens, the answer and whether it is right."""
    stage = row.get("stage", "?")
    layers = row.get("stage_layers") or []
    where = stage
    if stage == "llm" and len(layers) == 1:
        where = f"llm, from layer {layers[0]}"
    elif stage == "llm" and layers:  # a schedule: the overlay shows what the last stage kept
        where = f"llm, from layer {layers[0]}; shown: layer {layers[-1]}+"
    average = (row.get("viz_layer_avg") or [row.get("visual_tokens_layer_avg", 0.0)] * (index + 1))[index]
    answers, correct = row.get("viz_answers") or [], row.get("viz_correct") or []
    answer = answers[index] if index < len(answers) else "?"
    ok = correct[index] if index < len(correct) else None
    mark = {True: "right", False: "wrong", None: ""}[ok]
    text = f"{row['method']} ({where})\n{average:.1f} tokens (layer avg)\n\"{answer[:18]}\" {mark}"
    return text, {True: "darkgreen", False: "firebrick", None: "black"}[ok]


def write_grids(rows: Sequence[dict], viz, keep: Keep, out_dir: Path, stem: str, max_columns: int = 8) -> list[Path]:
    """One kept-token grid per stage (parts of at most ``max_columns - 1`` methods): rows = images, the first
    column the original image with its question and gold answer."""
    from ..viz import Panel, picture_grid

    chosen = [r for r in rows if r.get("status") == "ok" and r["keep"] == keep and r["method"] != REFERENCE]
    chosen = [r for r in chosen if len(r.get("viz_kept") or []) >= len(viz.images)]
    paths = []
    for label, methods in stage_groups(chosen, max_series=max_columns - 1):
        by_method = {r["method"]: r for r in chosen}
        panels = []
        for i in range(len(viz.images)):
            panels.append([Panel(*panel_title(by_method[m], i), by_method[m]["viz_kept"][i], viz.infos[i])
                           for m in methods])  # fmt: skip
        name = label.replace(" (", "-").replace("/", "of").replace(")", "")
        path = out_dir / f"{stem}_{name}.png"
        picture_grid(viz.images, panels, path, row_labels=viz.labels, max_columns=max_columns,
                     title=f"kept visual tokens, stage {label}, keep={keep!r}\n(dropped patches darkened)")  # fmt: skip
        paths.append(path)
    return paths


@dataclass
class VizData:
    """Images of the picture grid, their labels and token layouts (``trace.images`` entries)."""

    images: list
    labels: list[str]
    infos: list[dict]
    family: str = ""


def collect_viz(prepared, family: str = "") -> VizData:
    """Token layouts of the grid images (``prepared``: a :class:`~tokensieve.bench.cell.Prepared`), from one
    prefill under a keep-everything sieve."""
    from ..sieve import sieve
    from .cell import last_image

    indices = prepared.latency.indices[: prepared.n_viz]
    with sieve(prepared.model, "random", keep=1.0) as active:
        prepared.prefill()
    samples = [prepared.task.samples[i] for i in indices]
    images = [s.image[-1] if isinstance(s.image, list) else s.image for s in samples]
    labels = [f"[{s.family}] {s.question} -> {s.answer}" for s in samples]
    infos = [active.trace.images[(b, last_image(active.trace, b))] for b in range(len(indices))]
    return VizData(images=images, labels=labels, infos=infos, family=family)

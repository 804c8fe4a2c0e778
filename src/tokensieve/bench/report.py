"""The run folder's report: markdown tables, accuracy plots and the kept-token picture grid."""

from __future__ import annotations

import datetime as _dt
import math
from collections.abc import Sequence
from pathlib import Path

from ..budget import Keep

REPORT_FILE = "report.md"
PLOT_TOKENS = "accuracy_vs_tokens.png"
PLOT_SPEEDUP = "accuracy_vs_speedup.png"
PICTURE_GRID = "kept_tokens.png"
REFERENCE = "none"


def format_keep(keep: Keep) -> str:
    """``0.11`` for fractions, ``64`` for token counts, ``1.0 (ref)`` for the reference."""
    if isinstance(keep, float):
        return "1.0 (ref)" if keep == 1.0 else f"{keep:g}"
    return str(keep)


def _sig(value: float | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if value == 0:
        return "0"
    decimals = max(0, digits - 1 - int(math.floor(math.log10(abs(value)))))
    return f"{value:.{decimals}f}"


def _flops_unit(rows: Sequence[dict]) -> tuple[str, float]:
    peak = max((r.get("flops") or 0.0 for r in rows), default=0.0)
    for name, scale in (("TFLOPs", 1e12), ("GFLOPs", 1e9), ("MFLOPs", 1e6)):
        if peak >= scale:
            return name, scale
    return "FLOPs", 1.0


def _sort_key(row: dict) -> tuple:
    keep = row["keep"]
    reference = row["method"] == REFERENCE
    return (not reference, isinstance(keep, int), -float(keep), row["method"])


def families_of(rows: Sequence[dict], order: Sequence[str] = ()) -> list[str]:
    """Family columns: ``order`` first, then any other family found in the rows."""
    seen = dict.fromkeys(order)
    for row in rows:
        for family in row.get("accuracy", {}):
            if family != "mean":
                seen.setdefault(family)
    present = {f for row in rows for f in row.get("accuracy", {})}
    return [f for f in seen if f in present]


def results_table(rows: Sequence[dict], families: Sequence[str] = ()) -> str:
    """Markdown table, one row per method x keep (reference first, then by budget, then by method)."""
    families = families_of(rows, families)
    unit, scale = _flops_unit(rows)
    header = ["method", "keep", "tokens", "layer-avg tokens", "mean %", "retention %", "speed-up", unit, "KV MB"]
    header += [f"{f} %" for f in families]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in sorted(rows, key=_sort_key):
        cells = [row["method"], format_keep(row["keep"])]
        if row.get("status") != "ok":
            cells += ["-", "-", "error", "-", "-", "-", "-"] + ["-"] * len(families)
        else:
            accuracy = row["accuracy"]
            cells += [
                _sig(row["visual_tokens"]),
                _sig(row["visual_tokens_layer_avg"]),
                f"{100 * accuracy['mean']:.1f}",
                "-" if row.get("retention") is None else f"{row['retention']:.1f}",
                "-" if row.get("speedup") is None else f"{row['speedup']:.2f}x",
                _sig(row["flops"] / scale),
                _sig(row["kv_bytes"] / 2**20),
            ]
            cells += [f"{100 * accuracy[f]:.1f}" if f in accuracy else "-" for f in families]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def errors_table(rows: Sequence[dict]) -> str:
    errors = [r for r in sorted(rows, key=_sort_key) if r.get("status") != "ok"]
    if not errors:
        return ""
    lines = ["| method | keep | error |", "|---|---|---|"]
    for row in errors:
        message = str(row.get("error", "")).replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {row['method']} | {format_keep(row['keep'])} | {message} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------- plots


def _method_series(rows: Sequence[dict], x_field: str) -> tuple[dict | None, dict[str, list[tuple[float, float]]]]:
    ok = [r for r in rows if r.get("status") == "ok"]
    reference = next((r for r in ok if r["method"] == REFERENCE), None)
    series: dict[str, list[tuple[float, float]]] = {}
    for row in ok:
        if row["method"] == REFERENCE or row.get(x_field) is None:
            continue
        series.setdefault(row["method"], []).append((float(row[x_field]), 100 * row["accuracy"]["mean"]))
    return reference, series


def _styles(n: int):
    import matplotlib

    cmap = matplotlib.colormaps["tab20"]
    markers = "osD^v<>pPX*h"
    return [(cmap(i % 20), markers[i % len(markers)]) for i in range(n)]


def plot_accuracy(rows: Sequence[dict], path: str | Path, x: str = "tokens", title: str = "") -> Path:
    """Mean accuracy per method against layer-averaged visual tokens (``x="tokens"``) or speed-up."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x_field = "visual_tokens_layer_avg" if x == "tokens" else "speedup"
    reference, series = _method_series(rows, x_field)
    fig, ax = plt.subplots(figsize=(8, 5))
    for (method, points), (color, marker) in zip(sorted(series.items()), _styles(len(series)), strict=True):
        if reference is not None:  # every curve starts at the unpruned model
            ref_x = reference["visual_tokens_layer_avg"] if x == "tokens" else 1.0
            points = points + [(float(ref_x), 100 * reference["accuracy"]["mean"])]
        points = sorted(points)
        ax.plot([p[0] for p in points], [p[1] for p in points], marker=marker, color=color, label=method, lw=1.2,
                ms=4)  # fmt: skip
    if reference is not None:
        ref_y = 100 * reference["accuracy"]["mean"]
        ax.axhline(ref_y, color="black", ls="--", lw=0.8)
        ref_x = reference["visual_tokens_layer_avg"] if x == "tokens" else 1.0
        ax.plot([ref_x], [ref_y], marker="*", color="black", ms=12, ls="none", label="unpruned")
    ys = [y for line in ax.get_lines() for y in line.get_ydata()]
    if ys:  # fixed padding: matplotlib's autoscale turns a flat line (e.g. all 0 %) into a 1e-17 axis
        low, high = float(min(ys)), float(max(ys))
        pad = max(2.0, 0.1 * (high - low))
        ax.set_ylim(max(0.0, low - pad), max(min(100.0, high + pad), low + pad))
    ax.set_xlabel("visual tokens per sample (layer average)" if x == "tokens" else "prefill speed-up (x)")
    ax.set_ylabel("mean accuracy (%)")
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def choose_viz_keep(rows: Sequence[dict], wanted: Keep | None = None, target: float = 0.11) -> Keep | None:
    """The budget shown in the picture grid: ``wanted`` if it has rows, else the one closest to ``target``."""
    ok = [r for r in rows if r.get("status") == "ok" and r["method"] != REFERENCE and r.get("viz_kept")]
    keeps = list(dict.fromkeys(r["keep"] for r in ok))
    if not keeps:
        return None
    if wanted is not None and wanted in keeps:
        return wanted

    def fraction(keep: Keep) -> float:
        if isinstance(keep, float):
            return keep
        tokens = next((r["image_tokens"] for r in ok if r.get("image_tokens")), 1.0)
        return keep / tokens

    return min(keeps, key=lambda k: abs(fraction(k) - target))


# ------------------------------------------------------------------------------------------------ report


def write_report(
    out_dir: str | Path,
    rows: Sequence[dict],
    task=None,
    viz=None,
    viz_keep: Keep | None = None,
    meta: dict | None = None,
) -> Path:
    """Write ``report.md``, both accuracy plots and (given ``viz``) the picture grid into ``out_dir``."""
    from ..viz import picture_grid

    out_dir = Path(out_dir)
    meta = dict(meta or {})
    families = list(getattr(task, "families", ()) or meta.get("families", ()))
    title = f"{meta.get('model', '')} on {meta.get('task', '')}".strip()
    plot_accuracy(rows, out_dir / PLOT_TOKENS, x="tokens", title=title)
    plot_accuracy(rows, out_dir / PLOT_SPEEDUP, x="speedup", title=title)
    grid_keep = choose_viz_keep(rows, viz_keep)
    grid_written = False
    if viz is not None and grid_keep is not None:
        columns = {}
        for row in sorted(rows, key=_sort_key):
            if row.get("status") == "ok" and row["keep"] == grid_keep and row["method"] != REFERENCE:
                kept = row.get("viz_kept") or []
                if len(kept) >= len(viz.images):
                    columns[row["method"]] = [(kept[i], viz.infos[i]) for i in range(len(viz.images))]
        if columns:
            picture_grid(
                viz.images,
                columns,
                out_dir / PICTURE_GRID,
                row_labels=viz.labels,
                title=f"kept visual tokens at keep={format_keep(grid_keep)} (dropped patches darkened)",
            )
            grid_written = True

    ok = [r for r in rows if r.get("status") == "ok"]
    reference = next((r for r in ok if r["method"] == REFERENCE), None)
    n_errors = sum(r.get("status") != "ok" for r in rows)
    lines = [
        "# tokensieve bench",
        "",
        f"- model: `{meta.get('model', '?')}`",
        f"- task: {meta.get('task', '?')} ({meta.get('source', '')}), {meta.get('n_samples', '?')} questions, "
        f"families: {', '.join(families) or '-'}",
        f"- cells: {len(rows)} ({len(ok)} ok, {n_errors} errors); written "
        f"{_dt.datetime.now().isoformat(timespec='seconds')}",
    ]
    if reference is not None:
        lines.append(
            f"- unpruned reference: mean {100 * reference['accuracy']['mean']:.1f}%, "
            f"{_sig(reference['image_tokens'])} visual tokens per sample, prefill "
            f"{1000 * reference['latency_s']:.1f} ms (median, latency batch)"
        )
    lines += [
        "",
        "## Results",
        "",
        results_table(rows, families),
        "",
        "Columns: *tokens* = visual tokens per sample after the last stage; *layer-avg tokens* = their average over "
        "decoder layers (in-LLM methods keep all tokens before their layer); *retention* = mean over families of "
        "accuracy / unpruned accuracy; *speed-up* = unpruned median prefill latency / this cell's, on the same "
        "fixed batch in the same process; FLOPs = analytic LLM prefill FLOPs per sample "
        "(per layer 4nd^2 + 2n^2d + 3ndm with the real per-layer token counts); *KV MB* = key/value cache bytes "
        "per sample after prefill, measured on the cache tensors.",
    ]
    errors = errors_table(rows)
    if errors:
        lines += ["", "## Errors", "", errors]
    lines += ["", "## Plots", "", f"![accuracy vs tokens]({PLOT_TOKENS})", ""]
    lines += [f"![accuracy vs speed-up]({PLOT_SPEEDUP})"]
    if grid_written:
        lines += ["", f"## Kept tokens at keep={format_keep(grid_keep)}", "", f"![kept tokens]({PICTURE_GRID})"]
    path = out_dir / REPORT_FILE
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path

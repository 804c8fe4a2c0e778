"""The run folder's report: markdown tables, accuracy plots and the kept-token grids (:mod:`.plots`)."""

from __future__ import annotations

import datetime as _dt
import math
from collections.abc import Sequence
from pathlib import Path

from ..budget import Keep

REPORT_FILE = "report.md"
PLOT_TOKENS = "accuracy_vs_tokens.png"
PLOT_SPEEDUP = "accuracy_vs_speedup.png"
PLOT_FLOPS = "accuracy_vs_flops.png"
GRID_STEM = "kept_tokens"  # one grid per stage: kept_tokens_<stage>.png
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


def _speedup(row: dict) -> str:
    if row.get("speedup") is None:
        return "-"
    flag = " (noisy)" if row.get("latency_noisy") else ""
    return f"{row['speedup']:.2f}x{flag}"


def results_table(rows: Sequence[dict], families: Sequence[str] = ()) -> str:
    """Markdown table, one row per method x keep (reference first, then by budget, then by method)."""
    families = families_of(rows, families)
    reference = next((r for r in rows if r["method"] == REFERENCE and r.get("status") == "ok"), None)
    header = ["method", "stage", "keep", "budget tokens", "layer-avg tokens", "final tokens", "mean %",
              "retention %", "FLOPs %", "speed-up", "KV MB"]  # fmt: skip
    header += [f"{f} %" for f in families]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in sorted(rows, key=_sort_key):
        cells = [row["method"], row.get("stage", "-"), format_keep(row["keep"])]
        if row.get("status") != "ok":
            cells += ["-", "-", "-", row.get("status", "error")] + ["-"] * (len(header) - 7)
        else:
            accuracy = row["accuracy"]
            flops = 100 * row["flops"] / reference["flops"] if reference and reference.get("flops") else None
            cells += [
                _sig(row.get("budget_tokens")),
                _sig(row["visual_tokens_layer_avg"]),
                _sig(row["visual_tokens"]),
                f"{100 * accuracy['mean']:.1f}",
                "-" if row.get("retention") is None else f"{row['retention']:.1f}",
                "-" if flops is None else f"{flops:.1f}",
                _speedup(row),
                _sig(row["kv_bytes"] / 2**20),
            ]
            cells += [f"{100 * accuracy[f]:.1f}" if f in accuracy else "-" for f in families]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def errors_table(rows: Sequence[dict], status: str = "error") -> str:
    """Cells of one non-ok ``status`` (``"error"`` or ``"unreachable"``) with their messages."""
    errors = [r for r in sorted(rows, key=_sort_key) if r.get("status", "error") == status]
    if not errors:
        return ""
    lines = [f"| method | keep | {'why' if status == 'unreachable' else 'error'} |", "|---|---|---|"]
    for row in errors:
        message = str(row.get("error", "")).replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {row['method']} | {format_keep(row['keep'])} | {message} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------- plots


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


def _summary(rows: Sequence[dict], meta: dict, families: Sequence[str]) -> list[str]:
    ok = [r for r in rows if r.get("status") == "ok"]
    reference = next((r for r in ok if r["method"] == REFERENCE), None)
    counts = {s: sum(r.get("status") == s for r in rows) for s in ("error", "unreachable")}
    noisy = sum(bool(r.get("latency_noisy")) for r in ok)
    lines = [
        "# tokensieve bench",
        "",
        f"- model: `{meta.get('model', '?')}`",
        f"- task: {meta.get('task', '?')} ({meta.get('source', '')}), {meta.get('n_samples', '?')} questions, "
        f"families: {', '.join(families) or '-'}",
        f"- cells: {len(rows)} ({len(ok)} ok, {counts['unreachable']} unreachable budgets, {counts['error']} "
        f"errors, {noisy} with noisy timings); written {_dt.datetime.now().isoformat(timespec='seconds')}",
    ]
    if reference is not None:
        lines.append(
            f"- unpruned reference: mean {100 * reference['accuracy']['mean']:.1f}%, "
            f"{_sig(reference['image_tokens'])} visual tokens per sample, prefill "
            f"{1000 * reference['latency_s']:.1f} ms (median, latency batch)"
        )
    return lines


COLUMNS = (
    "Columns: *budget tokens* = visual tokens per sample the budget allows; *layer-avg tokens* = visual tokens "
    "averaged over the decoder layers (what the compute sees; in-LLM methods run with `average_budget=True`, so "
    "they keep every token before their layer and fewer after it, to the same average); *final tokens* = after the "
    "last stage; *retention* = mean over families of accuracy / unpruned accuracy; *FLOPs %* = decoder prefill "
    "FLOPs per sample (attention and MLP per layer, from the config and the real per-layer counts) against the "
    "unpruned model; *speed-up* = median unpruned / median pruned prefill time over at least 5 pairs, timed "
    "alternately in one loop on the same batch (*noisy*: the unpruned timings of that cell spread more than 20%); "
    "*KV MB* = key/value cache bytes per sample after prefill. *unreachable*: the method cannot meet that "
    "layer-averaged budget on this model (it prunes too deep), so it was not run above it."
)


def write_report(
    out_dir: str | Path,
    rows: Sequence[dict],
    task=None,
    viz=None,
    viz_keep: Keep | None = None,
    meta: dict | None = None,
) -> Path:
    """Write ``report.md``, the accuracy plots and (given ``viz``) the kept-token grids into ``out_dir``."""
    from .plots import plot_accuracy, write_grids

    out_dir = Path(out_dir)
    meta = dict(meta or {})
    families = list(getattr(task, "families", ()) or meta.get("families", ()))
    title = f"{meta.get('model', '')} on {meta.get('task', '')}".strip()
    for name, x in ((PLOT_TOKENS, "tokens"), (PLOT_FLOPS, "flops"), (PLOT_SPEEDUP, "speedup")):
        plot_accuracy(rows, out_dir / name, x=x, title=title)
    grid_keep = choose_viz_keep(rows, viz_keep)
    grids = [] if viz is None or grid_keep is None else write_grids(rows, viz, grid_keep, out_dir, GRID_STEM)
    lines = _summary(rows, meta, families) + ["", "## Results", "", results_table(rows, families), "", COLUMNS]
    for status, heading in (("unreachable", "Unreachable budgets"), ("error", "Errors")):
        table = errors_table(rows, status)
        if table:
            lines += ["", f"## {heading}", "", table]
    lines += ["", "## Plots", ""]
    lines += [f"![accuracy vs {x}]({name})\n" for name, x in ((PLOT_TOKENS, "layer-averaged tokens"),
              (PLOT_FLOPS, "FLOPs"), (PLOT_SPEEDUP, "speed-up"))]  # fmt: skip
    if grids:
        lines += [f"## Kept tokens at keep={format_keep(grid_keep)}", ""]
        lines += [f"![kept tokens]({p.name})\n" for p in grids]
    path = out_dir / REPORT_FILE
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path

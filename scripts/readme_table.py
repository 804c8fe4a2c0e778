"""Print the README's accuracy table (22% and 11% budgets) from a `tokensieve bench` run folder.

Usage: ``python scripts/readme_table.py RUN_DIR [--keep 0.22 0.11]``. Reads ``RUN_DIR/results.jsonl`` (one line per
finished cell, as the runner writes it); per method: mean accuracy, retention and layer-averaged visual tokens at
each budget, then at the last budget the decoder FLOPs against the unpruned model, the paired prefill speed-up and
the per-family accuracies. Errors and unreachable budgets are shown as such, not dropped.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tokensieve.bench.report import families_of
from tokensieve.bench.runner import RESULTS_FILE, read_rows


def load(run_dir: Path) -> dict[tuple[str, float], dict]:
    return {(row["method"], float(row["keep"])): row for row in read_rows(run_dir / RESULTS_FILE)}


def _budget_cells(cell: dict | None) -> list[str]:
    if cell is None:
        return ["not run", "-"]
    if cell["status"] != "ok":
        return [cell["status"], "-"]
    mean, kept = 100 * cell["accuracy"]["mean"], cell["visual_tokens_layer_avg"]
    retention = "-" if cell.get("retention") is None else f"{cell['retention']:.0f}%"
    return [f"{mean:.1f} ({retention})", f"{kept:.1f}"]


def _last_cells(cell: dict | None, reference: dict, families: list[str]) -> list[str]:
    if cell is None or cell["status"] != "ok":
        status = "-" if cell is None else cell["status"]
        why = "" if cell is None else " ".join(str(cell.get("error", "")).split())
        why = why.split(":")[0] if cell is not None and status == "unreachable" else why[:90]
        return [status, "-", why or "-"]
    flops = f"{100 * cell['flops'] / reference['flops']:.0f}%"
    speedup = f"{cell['speedup']:.2f}x" + (" (noisy)" if cell.get("latency_noisy") else "")
    return [flops, speedup, " / ".join(f"{100 * cell['accuracy'][f]:.0f}" for f in families)]


def table(cells: dict[tuple[str, float], dict], keeps: list[float]) -> str:
    reference = cells[("none", 1.0)]
    families = families_of(list(cells.values()))
    last = f"{keeps[-1]:.0%}"
    header = ["method", "stage"]
    for keep in keeps:
        header += [f"{keep:.0%}: mean (retention)", f"{keep:.0%}: layer-avg tokens"]
    header += [f"{last}: FLOPs", f"{last}: speed-up", f"{last}: " + " / ".join(families)]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    acc = reference["accuracy"]
    ref_cells = [f"{100 * acc['mean']:.1f} (100%)", f"{reference['visual_tokens_layer_avg']:.0f}"] * len(keeps)
    ref_cells += ["100%", "1.00x", " / ".join(f"{100 * acc[f]:.0f}" for f in families)]
    lines.append("| unpruned | - | " + " | ".join(ref_cells) + " |")
    for method in sorted({m for m, _ in cells if m != "none"}):
        stage = next(c.get("stage", "-") for (m, _), c in cells.items() if m == method)
        row = [f"`{method}`", stage]
        for keep in keeps:
            row += _budget_cells(cells.get((method, keep)))
        row += _last_cells(cells.get((method, keeps[-1])), reference, families)
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--keep", type=float, nargs="+", default=[0.22, 0.11])
    args = parser.parse_args()
    print(table(load(args.run_dir), args.keep))


if __name__ == "__main__":
    main()

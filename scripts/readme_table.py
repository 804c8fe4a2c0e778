"""Print the README's accuracy table (22% and 11% budgets) from a `tokensieve bench` run folder.

Usage: ``python scripts/readme_table.py RUN_DIR [--keep 0.22 0.11]``. Reads ``RUN_DIR/results.jsonl`` (one line per
finished cell, as the runner writes it); per method: mean accuracy, retention and layer-averaged visual tokens at
each budget, and the per-family accuracies at the last one. Errors are shown as errors, not dropped.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tokensieve.bench.runner import RESULTS_FILE, read_rows

FAMILIES = ("color", "exist", "count", "position", "read")


def load(run_dir: Path) -> dict[tuple[str, float], dict]:
    return {(row["method"], float(row["keep"])): row for row in read_rows(run_dir / RESULTS_FILE)}


def table(cells: dict[tuple[str, float], dict], keeps: list[float]) -> str:
    header = ["method", "stage"]
    for keep in keeps:
        header += [f"{keep:.0%}: mean (retention)", f"{keep:.0%}: layer-avg tokens"]
    header.append(f"{keeps[-1]:.0%}: " + " / ".join(FAMILIES))
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    reference = cells[("none", 1.0)]
    acc = reference["accuracy"]
    ref_cells = [f"{100 * acc['mean']:.1f} (100%)", f"{reference['visual_tokens_layer_avg']:.0f}"] * len(keeps)
    lines.append(
        "| unpruned | - | " + " | ".join(ref_cells) + " | " + " / ".join(f"{100 * acc[f]:.0f}" for f in FAMILIES) + " |"
    )
    methods = sorted({m for m, _ in cells if m != "none"})
    for method in methods:
        row = [f"`{method}`", next(c["stage"] for (m, _), c in cells.items() if m == method)]
        last = None
        for keep in keeps:
            cell = cells.get((method, keep))
            last = cell
            if cell is None:
                row += ["not run", "-"]
            elif cell["status"] != "ok":
                row += ["error", "-"]
            else:
                mean = 100 * cell["accuracy"]["mean"]
                row += [f"{mean:.1f} ({cell['retention']:.0f}%)", f"{cell['visual_tokens_layer_avg']:.0f}"]
        if last is not None and last["status"] == "ok":
            row.append(" / ".join(f"{100 * last['accuracy'][f]:.0f}" for f in FAMILIES))
        elif last is not None:
            row.append("error: " + str(last.get("error", "")).split("\n")[0][:90])
        else:
            row.append("-")
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

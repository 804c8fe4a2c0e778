"""kv-bench report: markdown tables (accuracy, fidelity, speed) and an accuracy-vs-budget plot."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path


def _fmt(x: float | None, pct: bool = False) -> str:
    if x is None:
        return "–"
    return f"{100 * x:.0f}" if pct else f"{x:.3f}"


def accuracy_table(rows: list[dict]) -> str:
    """Rows: method; columns: (length, keep); cells: accuracy % averaged over tasks (dense: its own column)."""
    acc = defaultdict(list)
    for r in rows:
        if "accuracy" in r:
            acc[(r["method"], r["length"], "dense" if r["method"] == "dense" else r["keep"])].append(r["accuracy"])
    lengths = sorted({k[1] for k in acc})
    keeps = sorted({k[2] for k in acc if k[2] != "dense"})
    methods = sorted({k[0] for k in acc}, key=lambda m: (m != "dense", m))
    cols = [(n, k) for n in lengths for k in keeps]
    head = "| method | " + " | ".join(f"L={n} k={k}" for n, k in cols) + " | dense |"
    lines = [head, "|" + "---|" * (len(cols) + 2)]
    for m in methods:
        cells = []
        for n, k in cols:
            v = acc.get((m, n, k))
            cells.append(_fmt(sum(v) / len(v), pct=True) if v else "–")
        dense = [acc[("dense", n, "dense")] for n in lengths if ("dense", n, "dense") in acc]
        d = "/".join(_fmt(sum(v) / len(v), pct=True) for v in dense) if m == "dense" else ""
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {d} |")
    return "\n".join(lines)


def task_table(rows: list[dict]) -> str:
    """Rows: (task, method); columns: (length, keep); cells: accuracy % (dense: its own column per length)."""
    acc = {(r["task"], r["method"], r["length"], r["keep"]): r["accuracy"] for r in rows if "accuracy" in r}
    lengths = sorted({k[2] for k in acc})
    keeps = sorted({k[3] for k in acc if k[1] != "dense"})
    tasks = sorted({k[0] for k in acc})
    methods = sorted({k[1] for k in acc if k[1] != "dense"})
    cols = [(n, k) for n in lengths for k in keeps]
    lines = ["| task | method | " + " | ".join(f"L={n} k={k}" for n, k in cols) + " |", "|" + "---|" * (len(cols) + 2)]
    for t in tasks:
        dense = [_fmt(acc.get((t, "dense", n, n)), pct=True) for n in lengths]
        lines.append(f"| {t} | dense | " + " | ".join(dense[lengths.index(n)] for n, _ in cols) + " |")
        for m in methods:
            lines.append(f"| {t} | {m} | " + " | ".join(_fmt(acc.get((t, m, n, k)), pct=True) for n, k in cols) + " |")
    return "\n".join(lines)


def model_table(meta: dict) -> str:
    """Dense accuracy of the embedded model per task (rows) and length (columns), as measured into meta.json."""
    acc = meta.get("dense_accuracy", {})
    keys = [k.split("@") for k in acc]
    tasks = list(dict.fromkeys(t for t, _ in keys))
    lengths = sorted({int(n) for _, n in keys})
    lines = ["| task | " + " | ".join(f"L={n}" for n in lengths) + " |", "|" + "---|" * (len(lengths) + 1)]
    for t in tasks:
        lines.append(f"| {t} | " + " | ".join(_fmt(acc.get(f"{t}@{n}"), pct=True) for n in lengths) + " |")
    return "\n".join(lines)


def fidelity_table(rows: list[dict]) -> str:
    agg = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if "attn_err" in r and r["method"] != "dense":
            for f in ("attn_err", "topk_recall", "mass"):
                agg[(r["method"], r["length"], r["keep"])][f].append(r[f])
            agg[(r["method"], r["length"], r["keep"])]["bytes"].append(r["kv_bytes_step"] / r["dense_kv_bytes_step"])
    lines = ["| method | L | keep | attn-output rel. error | recall of exact top-k | dense mass captured | "
             "KV bytes read / dense |", "|---|---|---|---|---|---|---|"]
    for (m, n, k), d in sorted(agg.items()):
        mean = {f: sum(v) / len(v) for f, v in d.items()}
        lines.append(f"| {m} | {n} | {k} | {_fmt(mean['attn_err'])} | {_fmt(mean['topk_recall'])} | "
                     f"{_fmt(mean['mass'])} | {_fmt(mean['bytes'])} |")
    return "\n".join(lines)


def speed_table(rows: list[dict]) -> str:
    lines = []
    dec = [r for r in rows if r.get("bench") == "decode_attention"]
    if dec:
        lines += ["| method | N | keep | dense ms | method ms | speed-up | selection / dense attention |",
                  "|---|---|---|---|---|---|---|"]
        for r in dec:
            lines.append(f"| {r['method']} | {r['n']} | {r['keep']} | {r['dense_ms']:.1f} | {r['method_ms']:.1f} | "
                         f"{r['speedup']:.2f}x | {100 * r['select_frac_of_dense']:.0f}% |")
    idx = [r for r in rows if r.get("bench") == "indexer"]
    if idx:
        lines += ["", "| indexer N | B | m | keys | flat ms | HISA ms | speed-up | IoU |", "|---" * 8 + "|"]
        for r in idx:
            keys = "iid" if not r["rho"] else f"AR(1) rho={r['rho']}"
            lines.append(f"| {r['n']} | {r['block']} | {r['m']} | {keys} | {r['flat_ms']:.1f} | {r['hisa_ms']:.1f} | "
                         f"{r['speedup']:.2f}x | {r['iou']:.3f} |")
    lat = [r for r in rows if r.get("bench") == "model_latency"]
    if lat:
        lines += ["", "| method | N | keep | prefill ms (dense) | decode ms/token (dense) |", "|---|---|---|---|---|"]
        for r in lat:
            lines.append(f"| {r['method']} | {r['n']} | {r['keep']} | {r['prefill_ms']:.0f} "
                         f"({r['dense_prefill_ms']:.0f}) | {r['decode_ms']:.1f} ({r['dense_decode_ms']:.1f}) |")
    return "\n".join(lines)


def _panel(ax, rows: list[dict], title: str) -> None:
    by = defaultdict(lambda: defaultdict(list))
    for r in rows:
        by[r["method"]][r["keep"]].append(r["accuracy"])
    for m, d in sorted(by.items()):
        if m == "dense":
            v = [x for vs in d.values() for x in vs]
            ax.axhline(sum(v) / len(v), ls="--", color="k", label="dense")
            continue
        ks = sorted(d)
        ax.plot(ks, [sum(d[k]) / len(d[k]) for k in ks], marker="o", ls=":" if "kvpress" in m else "-", label=m)
    ax.set(xscale="log", ylim=(-0.05, 1.05), xlabel="keep (KV tokens attended / kept)", ylabel="accuracy",
           title=title)


def plot(rows: list[dict], path: str | Path) -> None:
    """Accuracy vs keep: one panel per (task, length), plus a top row averaged over tasks; dense dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if "accuracy" in r]
    lengths = sorted({r["length"] for r in rows})
    tasks = ["all tasks", *sorted({r["task"] for r in rows})]
    w, h = max(1, len(lengths)), len(tasks)
    fig, axes = plt.subplots(h, w, figsize=(5 * w, 3.6 * h), squeeze=False)
    for i, t in enumerate(tasks):
        for j, n in enumerate(lengths):
            sel = [r for r in rows if r["length"] == n and (i == 0 or r["task"] == t)]
            _panel(axes[i][j], sel, f"{t}, L = {n}")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def write_report(rows: list[dict], speed_rows: list[dict], path: str | Path, meta: dict | None = None) -> str:
    parts = ["# kv-bench report", ""]
    if meta:
        cfg = meta.get("config", {})
        parts += [f"Embedded model: Llama, {cfg.get('num_hidden_layers')} layers, hidden {cfg.get('hidden_size')}, "
                  f"{cfg.get('num_attention_heads')} heads ({cfg.get('num_key_value_heads')} KV), trained "
                  f"{meta.get('steps')} steps in {meta.get('train_minutes')} min on one CPU thread. Dense exact "
                  f"match (%, n={meta.get('eval_n')} per cell, seed {meta.get('eval_seed', 1234)}):", "",
                  model_table(meta), ""]
        if meta.get("note"):
            parts += [f"**Model note:** {meta['note']}", ""]
    n = "/".join(str(x) for x in sorted({r["n"] for r in rows if "accuracy" in r}))
    parts += [f"## Accuracy (%, exact match of the greedy answer, mean over tasks; n={n} paired samples per cell)",
              "", accuracy_table(rows), "", "### Per task", "", task_table(rows), "",
              "## Fidelity (teacher-forced answer steps, last query, mean over layers)", "", fidelity_table(rows), ""]
    if speed_rows:
        parts += ["## Speed (this CPU, paired with dense, medians)", "", speed_table(speed_rows), ""]
    else:  # the timings live in their own run (python -m tokensieve.kv.speed), not in this grid
        parts += ["## Speed", "", "Not part of this run: `python -m tokensieve.kv.speed` (docs/kv/speed.md).", ""]
    text = "\n".join(parts)
    Path(path).write_text(text)
    return text

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


def plot(rows: list[dict], path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({r["length"] for r in rows if "accuracy" in r})
    fig, axes = plt.subplots(1, max(1, len(lengths)), figsize=(5 * max(1, len(lengths)), 4), squeeze=False)
    for ax, n in zip(axes[0], lengths, strict=False):
        by = defaultdict(lambda: defaultdict(list))
        for r in rows:
            if r.get("length") == n and "accuracy" in r:
                by[r["method"]][r["keep"]].append(r["accuracy"])
        for m, d in sorted(by.items()):
            if m == "dense":
                v = [x for vs in d.values() for x in vs]
                ax.axhline(sum(v) / len(v), ls="--", color="k", label="dense")
                continue
            ks = sorted(d)
            ax.plot(ks, [sum(d[k]) / len(d[k]) for k in ks], marker="o", ls=":" if "kvpress" in m else "-", label=m)
        ax.set(xscale="log", xlabel="keep (KV tokens attended / kept)", ylabel="accuracy", title=f"L = {n}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write_report(rows: list[dict], speed_rows: list[dict], path: str | Path, meta: dict | None = None) -> str:
    parts = ["# kv-bench report", ""]
    if meta:
        parts += [f"Embedded model: {meta.get('steps')} steps, {meta.get('train_minutes')} min; dense accuracy "
                  f"{meta.get('dense_accuracy')}", ""]
    parts += ["## Accuracy (%, exact match, mean over tasks)", "", accuracy_table(rows), "",
              "## Fidelity (teacher-forced answer steps, last query, mean over layers)", "", fidelity_table(rows), ""]
    if speed_rows:
        parts += ["## Speed (this CPU, paired with dense, medians)", "", speed_table(speed_rows), ""]
    text = "\n".join(parts)
    Path(path).write_text(text)
    return text

"""The ``tokensieve`` command line."""

from __future__ import annotations

import argparse


def _methods_table(markdown: bool = False) -> str:
    from .methods.base import list_methods, method_class

    rows = []
    for name in list_methods():
        cls = method_class(name)
        needs = ", ".join(sorted(cls.needs)) or "-"
        paper = cls.paper + (f" (arXiv {cls.arxiv})" if cls.arxiv else "")
        note = "" if cls.fidelity == "faithful" else " [!] " + cls.fidelity
        rows.append((name, cls.stage, cls.default_positions, needs, paper + note))
    header = ("method", "stage", "positions", "signals", "paper")
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header[:4], widths, strict=True)) + "  " + header[4]]
    for row in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(row[:4], widths, strict=True)) + "  " + row[4])
    return "\n".join(lines)


def _cmd_methods(args: argparse.Namespace) -> int:
    print(_methods_table(markdown=args.markdown))
    return 0


def _cmd_train_tiny(args: argparse.Namespace) -> int:
    from .embedded import train

    train.main([a for a in args.rest if a != "--"])
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tokensieve",
        description="Training-free visual-token pruning for HuggingFace VLMs: ZOO-Prune and its peers, one API.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("methods", help="list every registered method with its stage, signals and paper")
    p.add_argument("--markdown", action="store_true", help="print a markdown table")
    p.set_defaults(func=_cmd_methods)

    p = sub.add_parser(
        "train-tiny",
        help="train the embedded small VLM from scratch (arguments go to the training script; see --help there)",
        add_help=False,
    )
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=_cmd_train_tiny)

    try:
        from .bench.cli import add_bench_parser, add_show_parser
    except ImportError:  # the benchmark extras are optional at import time
        pass
    else:
        add_bench_parser(sub)
        add_show_parser(sub)
    try:
        from .horizon import add_horizon_parser
    except ImportError:
        pass
    else:
        add_horizon_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())

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
    from .bench.usage import OneLineParser

    parser = OneLineParser(
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

    from .bench.cli import add_bench_parser
    from .bench.show import add_show_parser
    from .horizon import add_horizon_parser

    sub.add_parser("kv-bench", help="KV-cache selection: methods x budgets x context lengths (see kv-bench --help)")
    sub.add_parser("kv-calibrate-fasa", help="write FASA's dominant-frequency calibration file beside a causal LM")
    add_bench_parser(sub)
    add_show_parser(sub)
    add_horizon_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; a user error prints one line (problem and fix) and returns 2."""
    import sys

    from .bench.cli import USER_ERRORS
    from .bench.usage import report

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv[:1] in (["kv-bench"], ["kv-calibrate-fasa"]):  # the KV family's commands have their own parser
        from .kv.cli import main as kv_main

        kv_main(argv)
        return 0
    if argv[:1] == ["train-tiny"]:  # everything after it, --help included, belongs to the training script
        args = argparse.Namespace(func=_cmd_train_tiny, rest=argv[1:])
    else:
        args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as error:
        return report(parser.prog, error)


if __name__ == "__main__":
    raise SystemExit(main())

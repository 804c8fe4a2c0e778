"""``python -m tokensieve.integrations.lmms task --out DIR``: write the offline lmms-eval task."""

from __future__ import annotations

import argparse

from .task import TASK_NAME, write_task


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tokensieve.integrations.lmms")
    commands = parser.add_subparsers(dest="command", required=True)
    task = commands.add_parser("task", help=f"write the {TASK_NAME} task (YAML, utils.py, parquet) under --out")
    task.add_argument("--out", required=True, help="folder to pass to lmms-eval as --include_path")
    task.add_argument("--split", default="test", choices=("val", "test"))
    task.add_argument("--limit", type=int, default=40, help="questions per family (bench default: 40)")
    task.add_argument("--name", default=TASK_NAME, help="task name (default %(default)s)")
    args = parser.parse_args(argv)
    folder = write_task(args.out, split=args.split, limit=args.limit, task=args.name)
    print(f"wrote {folder}  (lmms-eval --tasks {args.name} --include_path {folder.parent})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

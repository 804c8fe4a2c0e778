"""``kv-bench`` and ``kv-calibrate-fasa``: ``PYTHONPATH=src python -m tokensieve.kv.cli kv-bench ...``."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def _bench_parser(sub) -> None:
    p = sub.add_parser("kv-bench", help="methods x budgets x context lengths on the embedded retrieval LM")
    p.add_argument("--model", default=None, help="model dir (default: the embedded KV model)")
    p.add_argument("--methods", default="dense,oracle,tokenselect,tokenselect_div,fasa,tsa,streaming")
    p.add_argument("--keeps", default="64,128,256")
    p.add_argument("--lengths", default="1024,2048")
    p.add_argument("--tasks", default="single,multikey,multivalue,vartrack")
    p.add_argument("--n", type=int, default=20)
    p.add_argument("--fidelity-n", type=int, default=None,
                   help="fidelity statistics on the first N samples of each cell (default: all n)")
    p.add_argument("--out", default="results/kv/bench.jsonl")
    p.add_argument("--report", default="results/kv/report.md")
    p.add_argument("--plot", default="results/kv/accuracy.png")
    p.add_argument("--speed", action="store_true", help="also run the CPU timing benchmarks")
    p.add_argument("--speed-lengths", default="4096,16384")
    p.add_argument("--speed-keep", type=int, default=512)
    p.add_argument("--kvpress-python", default=None, help="python of a kvpress env (transformers < 5.3)")
    p.add_argument("--presses", default="snapkv,streaming_llm,knorm,expected_attention")
    p.add_argument("--threads", type=int, default=2)


def _speed(args, out: Path) -> list[dict]:
    from .bench import append_row, read_rows
    from .speed import decode_attention, indexer, model_latency

    done = {json.dumps({k: r[k] for k in ("bench", "method", "n", "keep", "rho") if k in r}) for r in read_rows(out)}
    jobs = [("decode_attention", m, n) for n in _ints(args.speed_lengths) for m in
            ("tokenselect", "tokenselect_bf16", "fasa", "oracle", "streaming")]
    jobs += [("indexer", "hisa", n) for n in (32768,)] + [("model_latency", "tokenselect", 4096)]
    for bench, m, n in jobs:
        for rho in ((0.0, 0.999) if bench == "indexer" else (None,)):
            key = {"bench": bench, "method": m, "n": n, "keep": 2048 if bench == "indexer" else args.speed_keep}
            if rho is not None:
                key["rho"] = rho
            if json.dumps(key) in done:
                continue
            if bench == "decode_attention":
                row = decode_attention(m, n, args.speed_keep)
            elif bench == "indexer":
                row = {"method": "hisa", **indexer(n, rho=rho)}
            else:
                row = model_latency(m, n, args.speed_keep)
            append_row(out, row)
            print(row, flush=True)
    return read_rows(out)


def kv_bench(args) -> None:
    import torch

    from .bench import read_rows, run_grid
    from .embedded import embedded_meta, embedded_model_dir, load_embedded
    from .report import plot, write_report

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    model_dir = args.model or str(embedded_model_dir())
    model = load_embedded(model_dir)
    methods, keeps, lengths, tasks = args.methods.split(","), _ints(args.keeps), _ints(args.lengths), args.tasks
    run_grid(model, methods, keeps, lengths, tasks.split(","), args.n, out, fidelity_n=args.fidelity_n)
    if args.kvpress_python:
        runner = Path(__file__).with_name("kvpress_runner.py")
        subprocess.run([args.kvpress_python, str(runner), model_dir, str(out), "--presses", args.presses,
                        "--keeps", args.keeps, "--lengths", args.lengths, "--tasks", tasks, "--n", str(args.n)],
                       check=True)
    speed_rows = _speed(args, out.with_name("speed.jsonl")) if args.speed else read_rows(out.with_name("speed.jsonl"))
    rows = read_rows(out)
    print(write_report(rows, speed_rows, args.report, embedded_meta(model_dir)))
    plot(rows, args.plot)


def calibrate_fasa(args) -> None:
    from transformers import AutoModelForCausalLM

    from .fasa_calib import write_calibration

    model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    path = write_calibration(model, args.model, pairing=args.pairing, budget=args.budget, n_seqs=args.n_seqs,
                             length=args.length, seed=args.seed)
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="tokensieve")
    sub = ap.add_subparsers(dest="cmd", required=True)
    _bench_parser(sub)
    c = sub.add_parser("kv-calibrate-fasa", help="FASA dominant-frequency calibration file beside the model")
    c.add_argument("--model", required=True)
    c.add_argument("--pairing", default="rotate_half", choices=("rotate_half", "adjacent"))
    c.add_argument("--budget", type=int, default=256)
    c.add_argument("--n-seqs", type=int, default=4)
    c.add_argument("--length", type=int, default=1024)
    c.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    (kv_bench if args.cmd == "kv-bench" else calibrate_fasa)(args)


if __name__ == "__main__":
    main(sys.argv[1:])

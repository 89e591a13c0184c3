"""The `bvl` command line: parity, demo and benchmarks.

Input errors (a bad checkpoint, an unknown model name, a bad option) print one line without a traceback and
exit 2; a check that runs but fails (parity out of tolerance, a benchmark below target) exits 1.
"""

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

DEMO_MODEL = "gemma3-270m"


def _write_json(path: str | None, payload: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=2) + "\n")


def cmd_parity(args: argparse.Namespace) -> int:
    from big_vision_lite.parity import run_parity

    report = run_parity(args.model, args.dtype, seq_len=args.seq_len, tolerance=args.tolerance)
    print(report.table())
    _write_json(args.json, report.to_json())
    return 0 if report.ok else 1


def cmd_demo(args: argparse.Namespace) -> int:
    print(f"== Golden-value parity: {DEMO_MODEL} (real Google weights) against transformers (PyTorch) ==")
    return cmd_parity(argparse.Namespace(model=DEMO_MODEL, dtype="float32", seq_len=None, tolerance=None, json=None))


def cmd_bench_forward(args: argparse.Namespace) -> int:
    from big_vision_lite.bench.forward import format_forward_table, run_forward_bench

    result = run_forward_bench(args.model, seq_len=args.seq_len, dtype=args.dtype)
    print(format_forward_table(result))
    _write_json(args.json, result)
    return 0 if result["ok"] else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bvl", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    dtypes = ["float32", "bfloat16"]

    p = sub.add_parser("parity", help="compare every layer and greedy ids with transformers")
    p.add_argument("model", help="an HF folder or a packaged model name (gemma3-270m, smollm2-135m)")
    p.add_argument("--dtype", choices=dtypes, default="float32")
    p.add_argument("--json", help="write the report as JSON to this file")
    p.add_argument("--seq-len", type=int, help="tokens per row (default: longer than any sliding window)")
    p.add_argument("--tolerance", type=float, help="max relative error (default: by dtype and model size)")
    p.set_defaults(func=cmd_parity)

    p = sub.add_parser("demo", help=f"the main job: parity of {DEMO_MODEL} against PyTorch")
    p.set_defaults(func=cmd_demo)

    bench = sub.add_parser("bench", help="benchmarks: ours and the PyTorch peer in one run")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    p = bench_sub.add_parser("forward", help="jitted prefill forward vs transformers eager and sdpa")
    p.add_argument("model")
    p.add_argument("--dtype", choices=dtypes, default="float32")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--json", help="write the results as JSON to this file")
    p.set_defaults(func=cmd_bench_forward)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "seq_len", None) is not None and args.seq_len < 1:
        print(f"bvl: error: --seq-len must be >= 1, got {args.seq_len}", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, ImportError) as e:  # input errors: one line, no traceback
        print(f"bvl: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

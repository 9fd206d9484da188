"""Command line: `anygpt-engine bench` (see anygpt_engine.bench)."""

from __future__ import annotations

import argparse
import sys


def _bench(args) -> int:
    from anygpt_engine import bench

    report = bench.benchmark(model=args.model, weights=args.weights, batch_size=args.batch_size,
                             prompt_len=args.prompt_len, new_tokens=args.new_tokens, dtype=args.dtype,
                             device=args.device, compare=args.compare, seed=args.seed,
                             progress=not args.no_progress)
    print(bench.format_table(report))
    if args.json:
        bench.write_json(report, args.json)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="anygpt-engine", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench", help="decode benchmark (default: tiny on CPU, anygpt-7b bf16 on a GPU)")
    b.add_argument("--model", default="auto", help="preset (tiny, anygpt-7b) or HF checkpoint directory")
    b.add_argument("--weights", default=None, help="checkpoint directory whose weights the preset loads")
    b.add_argument("--batch-size", type=int, default=1)
    b.add_argument("--prompt-len", type=int, default=128)
    b.add_argument("--new-tokens", type=int, default=None, help="default 128 on a GPU, 32 on a CPU")
    b.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    b.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    b.add_argument("--compare", default=None, choices=["hf"], help="also run transformers' generate")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--json", default=None, metavar="PATH", help="also write the report as JSON")
    b.add_argument("--no-progress", action="store_true")
    b.set_defaults(func=_bench)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError, RuntimeError) as err:
        print(f"anygpt-engine {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

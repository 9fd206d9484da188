"""Command line: `anygpt-engine bench` (see anygpt_engine.bench) and `anygpt-engine profile`."""

from __future__ import annotations

import argparse
import sys


def _bench(args) -> int:
    from anygpt_engine import bench

    report = bench.benchmark(model=args.model, weights=args.weights, batch_size=args.batch_size,
                             prompt_len=args.prompt_len, new_tokens=args.new_tokens, dtype=args.dtype,
                             device=args.device, compare=args.compare, seed=args.seed,
                             progress=not args.no_progress, modality=args.modality)
    print(bench.format_table(report))
    if args.json:
        bench.write_json(report, args.json)
    return 0


def _profile(args) -> int:
    from anygpt_engine import bench, profiling
    from anygpt_engine.engine import Engine

    nvtx_on = profiling.enable(True)
    engine = Engine(args.model if args.model != "auto" else ("anygpt-7b" if bench.default_device().type == "cuda"
                                                             else "tiny"),
                    device=args.device, cuda_graphs=False if args.eager else None, max_batch_size=args.batch_size)
    prompts = bench._prompts(engine, args.batch_size, args.prompt_len, seed=0)
    bench.run_engine(engine, bench._prompts(engine, args.batch_size, args.prompt_len, seed=1), 4, progress=False)
    cuda = engine.device.type == "cuda"
    if cuda:
        import torch

        torch.cuda.synchronize()
        torch.cuda.profiler.start()  # for nsys --capture-range=cudaProfilerApi
    result = bench.run_engine(engine, prompts, args.new_tokens, progress=False)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()
    print(f"profiled {engine!r}: batch {args.batch_size}, prompt {args.prompt_len}, {args.new_tokens} new tokens, "
          f"{'CUDA graphs' if engine.graphs else 'eager'}, NVTX {'on' if nvtx_on else 'unavailable'}; "
          f"ttft {result['ttft_s'] * 1e3:.1f} ms, decode step p50 "
          f"{sorted(result['step_s'])[len(result['step_s']) // 2] * 1e3:.2f} ms")
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
    b.add_argument("--compare", action="append", choices=["hf", "reference"],
                   help="also run transformers' generate (hf) and/or the torch-reference ops (reference); repeatable")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--modality", default=None, choices=["image", "speech", "music", "audio"],
                   help="end prompts with <soX>: decode inside that span (the LM head reads only its rows)")
    b.add_argument("--json", default=None, metavar="PATH", help="also write the report as JSON")
    b.add_argument("--no-progress", action="store_true")
    b.set_defaults(func=_bench)

    p = sub.add_parser("profile", help="short fixed workload with NVTX ranges, for nsys and ncu (docs/profiling.md)")
    p.add_argument("--model", default="auto", help="preset or checkpoint directory (default as for bench)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--device", default=None)
    p.add_argument("--eager", action="store_true",
                   help="no CUDA graphs: every op gets its own NVTX range (graph replays show one range)")
    p.set_defaults(func=_profile)
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

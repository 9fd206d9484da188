"""Tensor-parallel decode: tokens/s at TP 1, 2, 4, 8 and the all-reduce time per layer, each size
launched with torchrun (`-m anygpt_engine bench --tensor-parallel-size N --json ...`).

On GPUs a size runs when that many GPUs exist (NCCL); on a CPU sizes up to --cpu-ranks run with
gloo (the CPU numbers measure the machinery, not a speedup: the ranks share the cores). Every
size that could not run is listed with the reason. The table ends with TP=N / TP=1 decode tok/s.

    python benchmarks/bench_tensor_parallel.py [--model auto|tiny|anygpt-7b|DIR] [--batch-size 1]
                                               [--prompt-len 128] [--new-tokens N] [--sizes 1 2 4 8]
                                               [--cpu-ranks 2] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_size(size: int, args, out: Path) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(size), "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), "-m", "anygpt_engine", "bench", "--tensor-parallel-size", str(size),
           "--model", args.model, "--batch-size", str(args.batch_size), "--prompt-len", str(args.prompt_len),
           "--no-progress", "--json", str(out)]
    if args.new_tokens:
        cmd += ["--new-tokens", str(args.new_tokens)]
    env = dict(os.environ, GLOO_SOCKET_IFNAME=os.environ.get("GLOO_SOCKET_IFNAME", "lo"))
    if size == 1:  # the plain engine, no process group
        cmd = [sys.executable, "-m", "anygpt_engine"] + cmd[cmd.index("bench"):]
        cmd.remove("--tensor-parallel-size"), cmd.remove("1")
        env.setdefault("OMP_NUM_THREADS", "1")  # as torchrun sets for its ranks: the same threads per rank
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=args.timeout)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"rc {proc.returncode}"}
    return json.loads(out.read_text())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="auto")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=None)
    p.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--cpu-ranks", type=int, default=2, help="largest size to run on a CPU")
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    gpus = torch.cuda.device_count()
    rows, skipped = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            if gpus and size > gpus:
                skipped[size] = f"needs {size} GPUs, this machine has {gpus}"
            elif not gpus and size > args.cpu_ranks:
                skipped[size] = f"no GPU; CPU runs stop at --cpu-ranks {args.cpu_ranks}"
            else:
                rows[size] = run_size(size, args, Path(tmp) / f"tp{size}.json")
    base = rows.get(1, {}).get("decode_tok_s")
    print(f"{'TP':>3} {'decode tok/s':>13} {'step ms p50':>12} {'all-reduce us':>14} {'AR ms/step':>11} "
          f"{'AR % step':>10} {'vs TP=1':>8}")
    for size, r in rows.items():
        if "error" in r:
            print(f"{size:>3} failed: {r['error']}")
            continue
        ar = r.get("all_reduce_us")
        print(f"{size:>3} {r['decode_tok_s']:>13.1f} {r['step_ms_p50']:>12.3f} "
              f"{ar if ar is not None else float('nan'):>14.1f} {r.get('all_reduce_ms_per_step', float('nan')):>11.3f} "
              f"{100 * r.get('all_reduce_fraction_of_step', float('nan')):>9.1f}% "
              f"{r['decode_tok_s'] / base if base else float('nan'):>7.2f}x")
    for size, why in skipped.items():
        print(f"{size:>3} not measured: {why}")
    if rows:
        any_row = next(iter(r for r in rows.values() if "error" not in r), {})
        print(f"model {any_row.get('model')} on {any_row.get('gpu') or any_row.get('device')}, "
              f"{any_row.get('dtype')}, batch {args.batch_size}; all-reduce of [batch, hidden], 2 per layer + 1")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "skipped": skipped}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Serving targets, measured: what the HTTP server adds to TPOT, and overload behaviour.

1. The same workload (`--num-prompts` random prompts, `--max-concurrency` 16 streams, fixed
   input/output lengths, greedy) three ways, interleaved `--repeats` times (medians reported):
   `anygpt-engine bench serve --in-process engine` (a bare Engine stepped by a plain loop: the
   in-process engine), `--in-process async` (an AsyncEngine and the client in one process), and
   `anygpt-engine bench serve` against `anygpt-engine serve` on 127.0.0.1. Reported:
   mean/median/p99 TPOT of each and the HTTP overhead, http_mean_tpot / engine_mean_tpot - 1
   (target <= 5% with anygpt-7b on a GPU). The server stays up (its model loaded) while the
   in-process runs load their own copy.
2. Overload: `--overload-prompts` (1,000) requests at request rate inf against the server started
   with --max-waiting 64: every request must complete or get a 503 (nothing else), and afterwards
   /metrics must show no KV block held and no request running or waiting.

    python benchmarks/bench_serving.py                       # tiny on a CPU, anygpt-7b on a GPU
    python benchmarks/bench_serving.py --model tiny --num-prompts 64 --output-len 32 --json out.json
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from serving_app import ServerProcess, free_port  # noqa: E402


def bench_serve(args: list[str], out: Path, timeout: float) -> dict:
    cmd = [sys.executable, "-m", "anygpt_engine.cli", "bench", "serve", *args, "--json", str(out), "--disable-tqdm"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    if run.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{run.stderr[-3000:]}")
    print(run.stdout, flush=True)
    return json.loads(out.read_text())


def engine_metrics(base: str) -> dict:
    text = urllib.request.urlopen(base + "/metrics", timeout=30).read().decode()
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^(anygpt_\w+) (\S+)$", text, re.M)}


def main() -> int:
    gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="anygpt-7b" if gpu else "tiny")
    p.add_argument("--num-prompts", type=int, default=128 if gpu else 64)
    p.add_argument("--max-concurrency", type=int, default=16)
    p.add_argument("--input-len", type=int, default=256 if gpu else 64)
    p.add_argument("--output-len", type=int, default=128 if gpu else 32)
    p.add_argument("--repeats", type=int, default=1 if gpu else 3, help="interleaved runs of the three; medians")
    p.add_argument("--overload-prompts", type=int, default=1000)
    p.add_argument("--overload-output-len", type=int, default=32 if gpu else 8)
    p.add_argument("--max-waiting", type=int, default=64)
    p.add_argument("--cpu-threads", type=int, default=None if gpu else 1,
                   help="torch threads of the engine on a CPU (1 on a busy machine)")
    p.add_argument("--out-dir", default=None, help="where the bench serve JSON files go (default: a temp dir)")
    p.add_argument("--json", default=None, metavar="PATH")
    args = p.parse_args()

    import tempfile

    out_dir = Path(args.out_dir or tempfile.mkdtemp(prefix="bench_serving_"))
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.cpu_threads is not None:
        os.environ["OMP_NUM_THREADS"] = str(args.cpu_threads)
    workload = ["--model", args.model, "--num-prompts", str(args.num_prompts), "--max-concurrency",
                str(args.max_concurrency), "--random-input-len", str(args.input_len), "--random-output-len",
                str(args.output_len), "--warmup", str(args.max_concurrency)]
    limit = 3600.0

    port = free_port()
    serve = ["-m", "anygpt_engine.cli", "serve", "--model", args.model, "--port", str(port), "--max-waiting",
             str(args.max_waiting)]
    if args.cpu_threads is not None:
        serve += ["--cpu-threads", str(args.cpu_threads)]
    server = ServerProcess(serve, port, out_dir / "server.log", timeout=900)
    runs = {"engine": [], "async_engine": [], "http": []}
    try:
        for r in range(args.repeats):  # interleaved, so a slow spell of a shared machine hits all three
            runs["engine"].append(bench_serve([*workload, "--in-process", "engine"], out_dir / f"engine{r}.json",
                                              limit))
            runs["async_engine"].append(bench_serve([*workload, "--in-process", "async"],
                                                    out_dir / f"async_engine{r}.json", limit))
            runs["http"].append(bench_serve([*workload, "--base-url", server.base], out_dir / f"http{r}.json", limit))
        overload = bench_serve(["--model", args.model, "--base-url", server.base, "--num-prompts",
                                str(args.overload_prompts), "--request-rate", "inf", "--random-input-len",
                                str(args.input_len), "--random-output-len", str(args.overload_output_len),
                                "--warmup", "0"], out_dir / "overload.json", limit)
        for _ in range(600):
            after = engine_metrics(server.base)
            if after["anygpt_requests_running"] == 0 and after["anygpt_requests_waiting"] == 0:
                break
            time.sleep(0.1)
    finally:
        server.stop()

    keys = ("mean_tpot_ms", "median_tpot_ms", "p99_tpot_ms", "mean_ttft_ms", "output_throughput")
    summary = {name: {k: statistics.median(run[k] for run in results) for k in keys} for name, results in runs.items()}
    direct, in_process, http = summary["engine"], summary["async_engine"], summary["http"]
    other_errors = {k: v for k, v in overload["errors"].items() if k != "503"}
    report = {
        "device": torch.cuda.get_device_name() if gpu else "cpu",
        "model": args.model, "max_concurrency": args.max_concurrency, "num_prompts": args.num_prompts,
        "input_len": args.input_len, "output_len": args.output_len,
        "repeats": args.repeats, **summary,
        "per_run_mean_tpot_ms": {name: [run["mean_tpot_ms"] for run in results] for name, results in runs.items()},
        "tpot_overhead": http["mean_tpot_ms"] / direct["mean_tpot_ms"] - 1,
        "median_tpot_overhead": http["median_tpot_ms"] / direct["median_tpot_ms"] - 1,
        "async_tpot_overhead": in_process["mean_tpot_ms"] / direct["mean_tpot_ms"] - 1,
        "overload": {"requests": args.overload_prompts, "completed": overload["completed"],
                     "rejected_503": overload["errors"].get("503", 0), "other_errors": other_errors,
                     "kv_blocks_used_after": after["anygpt_kv_blocks_used"],
                     "running_after": after["anygpt_requests_running"],
                     "waiting_after": after["anygpt_requests_waiting"]},
    }
    o = report["overload"]
    o["ok"] = (o["completed"] + o["rejected_503"] == o["requests"] and not other_errors
               and o["kv_blocks_used_after"] == 0 and o["running_after"] == 0 and o["waiting_after"] == 0)
    print(f"device {report['device']}, model {args.model}, {args.max_concurrency} streams, "
          f"{args.input_len} in / {args.output_len} out, medians of {args.repeats} interleaved runs")
    print(f"{'':12}{'mean TPOT ms':>14}{'median':>10}{'p99':>10}{'TTFT ms':>10}{'out tok/s':>11}")
    for name in ("engine", "async_engine", "http"):
        r = report[name]
        print(f"{name:12}{r['mean_tpot_ms']:>14.2f}{r['median_tpot_ms']:>10.2f}{r['p99_tpot_ms']:>10.2f}"
              f"{r['mean_ttft_ms']:>10.1f}{r['output_throughput']:>11.1f}")
    print(f"HTTP server vs the bare engine: {100 * report['tpot_overhead']:+.1f}% mean TPOT "
          f"({100 * report['median_tpot_overhead']:+.1f}% median; target <= 5% on a GPU with anygpt-7b); "
          f"AsyncEngine in-process: {100 * report['async_tpot_overhead']:+.1f}%")
    print(f"overload: {o['requests']} requests at rate inf, --max-waiting {args.max_waiting}: {o['completed']} "
          f"completed, {o['rejected_503']} got 503, other errors {other_errors or 'none'}; after: "
          f"{o['kv_blocks_used_after']:.0f} KV blocks used, {o['running_after']:.0f} running, "
          f"{o['waiting_after']:.0f} waiting -> {'OK' if o['ok'] else 'FAILED'}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0 if o["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

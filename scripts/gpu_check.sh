#!/usr/bin/env bash
# One-shot GPU check for a machine without network (the H100/H200 image in shared/ENV_NOTES.md):
# builds the extension, runs the GPU-marked tests (and compute-sanitizer on small cases), the
# kernel benchmarks and `anygpt-engine bench` at batch 1 and 16 with --compare hf, then writes
# JSON plus summary.md into OUT_DIR and prints the summary last. Budget: under 6 minutes.
#
#   bash scripts/gpu_check.sh OUT_DIR
set -uo pipefail
out=${1:?usage: scripts/gpu_check.sh OUT_DIR}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/local/cuda/bin"
status=0
step() {  # step NAME TIMEOUT_S CMD...: runs CMD with a time limit, logging to OUT_DIR/NAME.log
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc $((SECONDS - start))s" | tee -a "$out/steps.txt"
  [ $rc -eq 0 ] || status=1
  return $rc
}

{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
  git rev-parse --short HEAD; date -u +%FT%TZ; } >"$out/machine.txt" 2>&1

step build 240 pip install --no-build-isolation --no-deps -e . || { cat "$out/build.log" | tail -30; exit 1; }
step pytest_gpu 150 python -m pytest -m gpu -q -p no:cacheprovider --junitxml="$out/pytest_gpu.xml"
# compute-sanitizer on the small CUDA cases of every kernel family.
step sanitizer 120 compute-sanitizer --tool memcheck --error-exitcode 1 \
  python -m pytest -q -p no:cacheprovider -m gpu tests/test_rms_norm.py tests/test_attention.py \
  tests/test_rvq.py tests/test_maskgit.py tests/test_sampling_kernels.py -k "small or shape1 or sanitizer"
for bench in benchmarks/bench_*.py; do
  name=$(basename "$bench" .py)
  step "$name" 90 python "$bench" --json "$out/$name.json"
done
step bench_b1 150 anygpt-engine bench --batch-size 1 --compare hf --compare reference --no-progress \
  --json "$out/bench_b1.json"
step bench_b16 150 anygpt-engine bench --batch-size 16 --compare reference --no-progress --json "$out/bench_b16.json"

python - "$out" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
lines = ["# GPU check", "", "```", (out / "machine.txt").read_text().strip(), "```", "",
         "| step | result |", "|---|---|"]
lines += [f"| {l.split()[0]} | {' '.join(l.split()[1:])} |" for l in (out / "steps.txt").read_text().splitlines()]
keys = ["gpu", "batch_size", "ttft_ms", "decode_tok_s", "step_ms_p50", "step_ms_p99", "achieved_gb_s",
        "fraction_of_copy_bandwidth", "end_to_end_tok_s", "hf_end_to_end_tok_s", "speedup_vs_hf",
        "greedy_tokens_equal_to_hf", "reference_decode_tok_s", "speedup_vs_reference",
        "greedy_tokens_equal_to_reference", "graph_capture_s", "graph_buckets_used", "sm_clock_mhz", "power_w"]
for name in ("bench_b1", "bench_b16"):
    f = out / f"{name}.json"
    if f.exists():
        r = json.loads(f.read_text())
        lines += ["", f"## {name}", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {r[k]:.4g} |" if isinstance(r.get(k), float) else f"| {k} | {r.get(k)} |" for k in keys]
f = out / "bench_rms_norm.json"
if f.exists():
    lines += ["", "## rms_norm", "", "| shape | fused | face | us | GB/s | vs torch |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['shape']} | {r['fused']} | {r['face']} | {r['median_s'] * 1e6:.2f} | {r['gb_s']:.0f} | "
              f"{r['speedup_vs_torch']:.2f}x |" for r in json.loads(f.read_text())]
for f in sorted(out.glob("bench_*.json")):
    if f.stem in ("bench_b1", "bench_b16", "bench_rms_norm"):
        continue
    data = json.loads(f.read_text())
    rows = data if isinstance(data, list) else data.get("rows", [data])
    lines += ["", f"## {f.stem}", "", "```"]
    lines += [json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()
                          if k not in ("gpu", "git_sha")}) for r in rows[:60]]
    lines += ["```"]
tail = [l for l in (out / "pytest_gpu.log").read_text().splitlines() if l.strip()][-1:] if (out / "pytest_gpu.log").exists() else []
lines += ["", "pytest -m gpu: " + (tail[0] if tail else "no output")]
(out / "summary.md").write_text("\n".join(lines) + "\n")
PY
cat "$out/summary.md"
exit $status

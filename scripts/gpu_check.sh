#!/usr/bin/env bash
# GPU check for a machine without network (the H100/H200 image in shared/ENV_NOTES.md). Each
# mode builds the extension first, runs its steps under time limits within one budget
# (GPU_CHECK_BUDGET_S, default 570 s: the device tool's 600 s per call, less the summary), writes
# logs, JSON and OUT_DIR/summary.md, and prints the summary last. core takes about 8 minutes, kernels up to 10
# (first-time Triton compiles of the tile sweeps and of the tests' shapes included).
#
# The tests run are those marked gpu (they need CUDA) and gpu_path (they run on the GPU when one
# is present, on the CPU otherwise: the attention, LM head and RVQ decode tests, Triton's TMA on
# real hardware): `-m gpu` alone would leave those to the CPU. tests/test_gpu_check_script.py
# checks that every file holding such tests is run by some mode.
#
#   bash scripts/gpu_check.sh OUT_DIR          # core: engine + backbone kernels + anygpt-engine bench
#   bash scripts/gpu_check.sh OUT_DIR kernels  # the op families' GPU tests, sanitizer and benchmarks
#   bash scripts/gpu_check.sh OUT_DIR attention-rvq  # only what the attention and RVQ targets need
#                                              # (their GPU tests, sanitizer, tuned benchmarks): ~9 min
#   bash scripts/gpu_check.sh OUT_DIR decode   # GEMV kernels, launches, bf16/int8/fp8/int4 decode: ~10 min
#   bash scripts/gpu_check.sh OUT_DIR beam     # beam search: its GPU test, then bench_beam.py at
#                                              # anygpt-7b (5 beams, greedy and beam-sample): ~5 min
#   bash scripts/gpu_check.sh OUT_DIR speech   # text -> speech end to end at anygpt-7b (bench_speech.py): ~4 min
#   bash scripts/gpu_check.sh OUT_DIR image    # SEED: its GPU test, then bench_image.py at the published size
#                                              # (encode / codes -> embedding, batch 1 and 32, float16): ~4 min
#   bash scripts/gpu_check.sh OUT_DIR serving  # the serving targets (needs wheels/serving, see
#                                              # scripts/serving_wheels.sh): ~6 min
set -uo pipefail
out=${1:?usage: scripts/gpu_check.sh OUT_DIR [core|kernels|attention-rvq|decode|beam|speech|image|serving]}
mode=${2:-core}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/local/cuda/bin"
status=0
# The device tool stops a call at 600 s, and what it stops writes no summary: the steps share
# this budget (each gets the less of its own limit and what is left; none starts with under 5 s).
budget=${GPU_CHECK_BUDGET_S:-570}
step() {  # step NAME TIMEOUT_S CMD...: runs CMD with a time limit, logging to OUT_DIR/NAME.log
  local name=$1 limit=$2; shift 2
  local left=$((budget - SECONDS))
  if [ $left -lt 5 ]; then
    echo "$name skipped: the ${budget}s budget is spent" | tee -a "$out/steps.txt"
    status=1
    return 1
  fi
  [ "$limit" -gt $left ] && limit=$left
  local start=$SECONDS
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc $((SECONDS - start))s" | tee -a "$out/steps.txt"
  [ $rc -eq 0 ] || status=1
  return $rc
}
# --durations: the slowest tests in each log, so the next run knows where its minutes go
pytest_gpu=(python -m pytest -q -p no:cacheprovider --durations=15 -m "gpu or gpu_path")
sanitize=(compute-sanitizer --tool memcheck --error-exitcode 1 python -m pytest -q -p no:cacheprovider -m gpu)

{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
  git rev-parse --short HEAD; date -u +%FT%TZ; echo "mode $mode"; } >"$out/machine.txt" 2>&1

step build 150 pip install --no-build-isolation --no-deps -e . || { tail -30 "$out/build.log"; exit 1; }
case "$mode" in
  core)
    step pytest_core 300 "${pytest_gpu[@]}" tests/test_rms_norm.py tests/test_gpu_engine.py tests/test_gpu_runtime.py \
      tests/test_attention.py tests/test_attention_cuda_abi.py tests/test_lm_head.py
    step sanitize_rms_norm 60 "${sanitize[@]}" tests/test_rms_norm.py -k "(cuda and shape1) or misaligned"
    step sanitize_attention 45 "${sanitize[@]}" tests/test_attention_cuda_abi.py
    step bench_b1 75 anygpt-engine bench --batch-size 1 --compare hf --no-progress --json "$out/bench_b1.json"
    step bench_b16 60 anygpt-engine bench --batch-size 16 --compare reference --no-progress \
      --json "$out/bench_b16.json"
    ;;
  kernels)
    step pytest_kernels 180 "${pytest_gpu[@]}" tests/test_sampling_kernels.py tests/test_rvq.py tests/test_maskgit.py \
      tests/test_soundstorm.py tests/test_soundstorm_fast.py
    step sanitize_maskgit 60 "${sanitize[@]}" tests/test_maskgit.py -k cuda
    step sanitize_sampling 40 "${sanitize[@]}" tests/test_sampling_kernels.py -k "greedy_exact and cuda"
    step sanitize_soundstorm 30 "${sanitize[@]}" tests/test_soundstorm_fast.py -k small
    # The attention and RVQ benchmarks first sweep their tile candidates and record this GPU's
    # fastest in anygpt_engine/tuning/*.json (copied to OUT_DIR/tuning/ to be committed).
    for bench in benchmarks/bench_*.py; do
      name=$(basename "$bench" .py)
      limit=40 extra=()
      case "$name" in
        bench_beam|bench_speech|bench_serving|bench_gemv|bench_image) continue ;;  # each in its own mode
        bench_tensor_parallel) [ "$(nvidia-smi -L 2>/dev/null | wc -l)" -gt 1 ] || continue ;;  # TP=1 is core's bench
        bench_soundstorm) limit=80 ;;
        bench_attention) limit=150 extra=(--write-tuning) ;;
        bench_rvq) limit=120 extra=(--write-tuning --sizes 2000 32000) ;;
      esac
      step "$name" "$limit" python "$bench" --json "$out/$name.json" "${extra[@]}"
    done
    mkdir -p "$out/tuning" && cp anygpt_engine/tuning/*.json "$out/tuning/"
    ;;
  attention-rvq)
    step pytest_attention_rvq 330 "${pytest_gpu[@]}" tests/test_attention.py tests/test_attention_cuda_abi.py \
      tests/test_rvq.py
    step sanitize_attention 45 "${sanitize[@]}" tests/test_attention_cuda_abi.py
    step bench_attention 150 python benchmarks/bench_attention.py --json "$out/bench_attention.json" --write-tuning
    step bench_rvq 120 python benchmarks/bench_rvq.py --json "$out/bench_rvq.json" --write-tuning --sizes 2000 32000
    mkdir -p "$out/tuning" && cp anygpt_engine/tuning/*.json "$out/tuning/"
    ;;
  decode)
    # The decode-floor targets: GEMV kernels (tile, split-K and warps-per-row sweeps and the cuBLAS
    # crossover recorded in tuning/gemv.json), launches per layer, and batch-1 decode in bf16 and
    # each weight-only quantization (each against 16-bit in the same run): ~10 min.
    step pytest_decode 240 "${pytest_gpu[@]}" tests/test_gemv.py tests/test_launches.py tests/test_quantized_engine.py
    step sanitize_gemv 90 "${sanitize[@]}" tests/test_gemv.py -k cuda
    step bench_gemv 240 python benchmarks/bench_gemv.py --write-tuning --json "$out/bench_gemv.json"
    mkdir -p "$out/tuning" && cp anygpt_engine/tuning/*.json "$out/tuning/"
    for quant in int8 fp8 int4; do
      step "bench_b1_$quant" 80 anygpt-engine bench --batch-size 1 --quantization "$quant" --no-progress \
        --json "$out/bench_b1_$quant.json"
    done
    ;;
  beam)
    step pytest_beam 120 "${pytest_gpu[@]}" tests/test_beam_search.py
    step bench_beam 240 python benchmarks/bench_beam.py --json "$out/bench_beam.json"
    step bench_beam_sample 240 python benchmarks/bench_beam.py --sample --json "$out/bench_beam_sample.json"
    ;;
  speech)
    # Text -> speech end to end at anygpt-7b (random weights): time to first audio (streaming), audio
    # after the last token, level-1 encode of 10 s, against HF eager generate + plain-PyTorch
    # SoundStorm in the same run (HF's 500 tokens at ~10 tok/s take most of it): ~4 min.
    step pytest_speech 120 python -m pytest -q -p no:cacheprovider tests/test_speechtokenizer.py \
      tests/test_speech_pipeline.py tests/test_encodec.py
    step bench_speech 300 python benchmarks/bench_speech.py --json "$out/bench_speech.json"
    ;;
  image)
    # The SEED image tokenizer: its float16-vs-float32 GPU test (tiny configuration), then encode and
    # codes -> embedding at AnyGPT's sizes (random weights: EVA ViT-g 39 blocks, Q-Former, 8192 x 32
    # codebook) in float16, against AnyGPT's plain-torch arithmetic in the same run.
    step pytest_image 120 "${pytest_gpu[@]}" tests/test_seed_image.py
    step bench_image 300 python benchmarks/bench_image.py --json "$out/bench_image.json"
    ;;
  serving)
    # The serving targets (benchmarks/bench_serving.py: HTTP TPOT overhead at 16 streams and the
    # 1,000-request overload run, anygpt-7b), about 6 minutes. fastapi, uvicorn, python-multipart,
    # prometheus_client and aiohttp are not on the GPU image: carry wheels/serving, made where PyPI
    # is reachable by scripts/serving_wheels.sh.
    step serving_deps 90 pip install --no-index --find-links wheels/serving fastapi uvicorn python-multipart \
      prometheus_client aiohttp || { tail -20 "$out/serving_deps.log"; exit 1; }
    step bench_serving 420 python benchmarks/bench_serving.py --json "$out/bench_serving.json" \
      --out-dir "$out/bench_serving"
    ;;
  *) echo "unknown mode $mode (core, kernels, attention-rvq, decode, beam, speech, image or serving)"; exit 2 ;;
esac

python - "$out" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
lines = ["# GPU check", "", "```", (out / "machine.txt").read_text().strip(), "```", "",
         "| step | result |", "|---|---|"]
lines += [f"| {l.split()[0]} | {' '.join(l.split()[1:])} |" for l in (out / "steps.txt").read_text().splitlines()]
keys = ["gpu", "batch_size", "ttft_ms", "decode_tok_s", "step_ms_p50", "step_ms_p99", "achieved_gb_s",
        "fraction_of_copy_bandwidth", "end_to_end_tok_s", "hf_end_to_end_tok_s", "speedup_vs_hf",
        "greedy_tokens_equal_to_hf", "reference_decode_tok_s", "speedup_vs_reference",
        "greedy_tokens_equal_to_reference", "graph_capture_s", "graph_buckets_used", "sm_clock_mhz", "power_w",
        "cuda_kernels_built", "faces"]
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
for log in sorted(out.glob("pytest_*.log")) + sorted(out.glob("sanitize_*.log")):
    tail = [l for l in log.read_text().splitlines() if l.strip()][-1:]
    lines += [f"{log.stem}: " + (tail[0] if tail else "no output")]
(out / "summary.md").write_text("\n".join(lines) + "\n")
PY
cat "$out/summary.md"
exit $status

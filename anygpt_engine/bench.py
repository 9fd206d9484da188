"""`anygpt-engine bench`: end-to-end decode benchmark of the engine. With --compare hf it also
runs transformers' generate on the same weights and shapes, and with --compare reference the
engine with every op on its torch reference face, both in the same process.

Reported: time to first token (prefill of the whole batch plus the first sample), decode
tokens/s, ms per decode step p50/p99, bytes read per decode step (weights; KV cache), the
achieved GB/s and its fraction of this device's copy bandwidth measured in the same run,
the faces each op ran (CUDA C++, Triton or torch, as the dispatch chose them from the engine's
construction, its warm-up and graph captures included, to the end of the timed run) and whether
the extension has its CUDA kernels, and on a GPU its name, clocks, power and memory from NVML.

With --quantization MODE the engine runs weight-only quantized, and the unquantized engine on
the same weights runs the same prompts in the same process: its decode speed, the fraction of
greedy tokens that agree (free-running, and teacher-forced along the 16-bit output), and the
logits error on the first prompt.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from anygpt_engine.engine import Engine, default_device, resolve_dtype
from anygpt_engine.ops import backend as ops_backend
from anygpt_engine.ops._extension import cuda_kernels_missing
from anygpt_engine.quantization import quantized_bytes
from anygpt_engine.sampling import SamplingParams


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def git_sha() -> str:
    """Short sha of the checkout, with "+dirty" when tracked files have uncommitted changes."""
    root = Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5, check=True).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


_L2_FLUSH_BYTES = 256 << 20  # several times any current GPU's L2 (H100: 50 MB, H200: 60 MB)
_l2_flush_buffer: dict = {}


def flush_l2() -> None:
    """Evicts the GPU's L2 cache by writing a buffer larger than it (one memset kernel)."""
    device = torch.cuda.current_device()
    buffer = _l2_flush_buffer.get(device)
    if buffer is None:
        buffer = _l2_flush_buffer[device] = torch.empty(_L2_FLUSH_BYTES, dtype=torch.uint8, device=device)
    buffer.zero_()


def median_seconds(fn, repeats: int, warmup: int = 1, flush: bool = True) -> float:
    """Median time of fn() in seconds. On a GPU it is device time between CUDA events, the
    kernels' own time as Nsight shows it: a spin kernel queued before the start event covers
    twice the host time of one call, so the host's argument checks and launches overlap it
    instead of landing inside the events (peers with cheap or costly host paths compare on
    their kernels). With `flush` (the default) L2 is evicted before each repeat, outside the
    events, so operands smaller than L2 are read from HBM as in a real step rather than from
    the previous repeat's cache lines. A call that syncs is still timed whole. On a CPU:
    perf_counter. Shared by the benchmarks/ scripts."""
    cuda = torch.cuda.is_available()
    for _ in range(warmup):  # compiles and caches; not timed
        fn()
    spin_cycles = 0
    if cuda:
        torch.cuda.synchronize()
        begin = time.perf_counter()
        fn()
        host = time.perf_counter() - begin
        torch.cuda.synchronize()
        # Cycles for twice the host time at up to 2 GHz (a slower clock only spins longer),
        # capped at 50 ms: a call that slow on the host is not a kernel benchmark.
        spin_cycles = int(min(max(2 * host, 50e-6), 0.05) * 2e9)
    samples = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            if flush:
                flush_l2()
            torch.cuda._sleep(spin_cycles)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / 1e3)
        else:
            begin = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - begin)
    return statistics.median(samples)


def median_wall_ms(fn, device: torch.device, repeats: int, warmup: int = 1):
    """Median wall time of fn() in ms, host included (synchronized around each call), and fn's
    last result: for pipelines timed as their users see them."""
    result = None
    for _ in range(warmup):
        result = fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        result = fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), result


def copy_bandwidth(device: torch.device) -> float:
    """Measured device copy bandwidth in bytes/s, counting read + write."""
    n = (1 << 28) if device.type == "cuda" else (1 << 25)  # 1 GiB / 128 MiB of float32
    src = torch.ones(n, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    _sync(device)
    times = []
    for _ in range(10 if device.type == "cuda" else 3):
        start = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        times.append(time.perf_counter() - start)
    return 2 * src.numel() * src.element_size() / min(times)


def nvml_info(device: torch.device) -> dict:
    """GPU name, clocks, power and memory; {} without a GPU or without pynvml."""
    if device.type != "cuda":
        return {}
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # pynvml missing or no NVML library: the bench still runs
        return {"gpu": torch.cuda.get_device_name(device)}
    try:
        handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
        memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
        name = pynvml.nvmlDeviceGetName(handle)
        return {
            "gpu": name.decode() if isinstance(name, bytes) else name,
            "sm_clock_mhz": pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM),
            "mem_clock_mhz": pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_MEM),
            "power_w": pynvml.nvmlDeviceGetPowerUsage(handle) / 1000,
            "power_limit_w": pynvml.nvmlDeviceGetEnforcedPowerManagementLimit(handle) / 1000,
            "memory_used_gib": memory.used / 2**30,
            "memory_total_gib": memory.total / 2**30,
        }
    finally:
        pynvml.nvmlShutdown()


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def _prompts(engine: Engine, batch_size: int, prompt_len: int, seed: int, modality: str | None = None) -> list[list[int]]:
    """Random text prompts; with a modality, each ends by opening its span (e.g. <sosp>)."""
    g = torch.Generator().manual_seed(seed)
    tail = [engine.vocab.start_token(modality)] if modality else []
    text_ids = torch.randint(3, 32000, (batch_size, prompt_len - 1 - len(tail)), generator=g)
    return [[engine.config.bos_token_id] + row.tolist() + tail for row in text_ids]


def weight_bytes_per_step(engine: Engine, batch_size: int) -> int:
    """Bytes of weights one decode step reads with the full LM head: every matrix and norm, but
    only the batch's rows of the embedding table."""
    model = engine.model
    total = sum(p.numel() * p.element_size() for p in model.parameters()) + quantized_bytes(model)
    embed = model.tok_embeddings
    if model.output is not None:
        total -= embed.numel() * embed.element_size()
    return total + batch_size * embed.shape[1] * embed.element_size()


def kv_bytes_per_step(engine: Engine, batch_size: int, context: float) -> float:
    c = engine.model.config  # this rank's heads under tensor parallelism
    return 2 * c.num_layers * batch_size * c.num_kv_heads * c.head_dim * context * engine.dtype.itemsize


def run_engine(engine: Engine, prompts, new_tokens: int, progress: bool) -> dict:
    """Serves `prompts` through add_request/step; the first step(s) prefill every prompt
    and sample first tokens (time to first token), every later step is one decode step."""
    params = SamplingParams.greedy(new_tokens, stop_token_ids=())
    device = engine.device
    _sync(device)
    start = time.perf_counter()
    ids = [engine.add_request(p, params) for p in prompts]
    outputs = {rid: [] for rid in ids}
    ttft, steps = None, []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=new_tokens - 1, desc="decode", unit="step", file=sys.stderr, leave=False)
    while engine.has_unfinished():
        step_start = time.perf_counter()
        for out in engine.step():  # reading the ids syncs the device
            outputs[out.request_id].extend(out.new_token_ids)
        now = time.perf_counter()
        if ttft is None:
            if all(outputs.values()):
                ttft = now - start
        else:
            steps.append(now - step_start)
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    return {"ttft_s": ttft, "step_s": steps, "outputs": [outputs[rid] for rid in ids], "total_s": ttft + sum(steps)}


def run_reference(engine: Engine, prompts, new_tokens: int, make_engine=None) -> dict:
    """The same model and weights with every op on its torch reference face (ANYGPT_BACKEND=torch),
    decode steps captured in CUDA graphs all the same. make_engine() builds that engine again
    (a quantized engine's 16-bit weights are gone); without it, from the engine's own weights."""
    from anygpt_engine.weights import hf_state_dict

    previous = os.environ.get("ANYGPT_BACKEND")
    os.environ["ANYGPT_BACKEND"] = "torch"
    try:
        if make_engine is not None:
            reference = make_engine()
        else:
            reference = Engine(engine.config, weights=hf_state_dict(engine.model, engine.config),
                               device=engine.device, dtype=engine.dtype, max_batch_size=len(prompts),
                               cuda_graphs=engine.graphs is not None)
        run_engine(reference, _prompts(reference, len(prompts), len(prompts[0]), 1), min(4, new_tokens), False)
        return run_engine(reference, prompts, new_tokens, progress=False)
    finally:
        if previous is None:
            del os.environ["ANYGPT_BACKEND"]
        else:
            os.environ["ANYGPT_BACKEND"] = previous


def hf_model(engine: Engine):
    """transformers' LlamaForCausalLM holding the engine's weights, on its device and dtype."""
    try:
        import transformers
    except ImportError as err:
        raise RuntimeError("comparing with transformers needs it (pip install 'anygpt-engine[hf]')") from err
    from anygpt_engine.weights import hf_state_dict

    config = transformers.LlamaConfig(**engine.config.to_hf_dict())
    with torch.device(engine.device):
        model = transformers.LlamaForCausalLM._from_config(config, dtype=engine.dtype).eval()
    missing, unexpected = model.load_state_dict(hf_state_dict(engine.model, engine.config), strict=False)
    if unexpected or any(not name.endswith("rotary_emb.inv_freq") for name in missing):
        raise RuntimeError(f"exporting to transformers failed: missing {missing}, unexpected {unexpected}")
    return model


def run_hf(engine: Engine, prompts, new_tokens: int) -> dict:
    """transformers' generate (eager, greedy) on the engine's weights, same shapes."""
    model = hf_model(engine)
    input_ids = torch.tensor(prompts, device=engine.device)
    kwargs = dict(do_sample=False, top_k=None, top_p=None, temperature=None, pad_token_id=engine.config.pad_token_id,
                  attention_mask=torch.ones_like(input_ids))
    with torch.inference_mode():
        model.generate(input_ids, max_new_tokens=2, min_new_tokens=2, **kwargs)  # warm-up
        _sync(engine.device)
        start = time.perf_counter()
        out = model.generate(input_ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
        _sync(engine.device)
        total = time.perf_counter() - start
    return {"total_s": total, "outputs": out[:, input_ids.shape[1]:].tolist()}


def compare_quantized(engine: Engine, prompts, result: dict, new_tokens: int, make_unquantized) -> dict:
    """The unquantized engine (make_unquantized(): same weights) on the same prompts: its decode
    speed, greedy agreement free-running and teacher-forced, and the logits error."""
    base = make_unquantized()
    run_engine(base, _prompts(base, len(prompts), len(prompts[0]), 1), min(4, new_tokens), False)  # warm-up
    ref = run_engine(base, prompts, new_tokens, progress=False)
    same = sum(a == b for ours, theirs in zip(result["outputs"], ref["outputs"]) for a, b in zip(ours, theirs))
    sequence = prompts[0] + ref["outputs"][0][:-1]  # position i predicts sequence[i + 1]
    exact, quantized = base.logits(sequence), engine.logits(sequence)
    tail = slice(len(prompts[0]) - 1, None)  # the positions that chose the 16-bit engine's tokens
    base_tok_s = len(prompts) * len(ref["step_s"]) / sum(ref["step_s"])
    return {
        "unquantized_decode_tok_s": base_tok_s,
        "speedup_vs_unquantized": len(prompts) * len(result["step_s"]) / sum(result["step_s"]) / base_tok_s,
        "greedy_tokens_equal_to_unquantized": same / (len(prompts) * new_tokens),
        "greedy_choices_equal_teacher_forced": float((quantized[tail].argmax(-1) == exact[tail].argmax(-1)).float()
                                                      .mean()),
        "logits_max_abs_error": float((quantized - exact).abs().max()),
        "logits_rel_error": float((quantized - exact).abs().max() / exact.abs().max()),
    }


def benchmark(model="auto", weights=None, batch_size=1, prompt_len=128, new_tokens=None, dtype=None, device=None,
              compare=None, seed=0, progress=True, modality=None, quantization=None,
              tensor_parallel_size=1) -> dict | None:
    """Decode benchmark of one engine. With tensor_parallel_size > 1, every rank of a torchrun
    launch calls it: rank 0 returns the report, the others None (they follow rank 0's steps)."""
    if tensor_parallel_size > 1:
        if compare or quantization is not None:
            raise ValueError(f"compare={compare!r} and quantization={quantization!r} need tensor_parallel_size=1 "
                             "(their references load the whole model)")
        from anygpt_engine.distributed import init_from_env

        device = init_from_env()
    device = torch.device(device) if device is not None else default_device()
    if model == "auto":
        model = "anygpt-7b" if device.type == "cuda" else "tiny"
    if new_tokens is None:
        new_tokens = 128 if device.type == "cuda" else 32
    if batch_size < 1 or prompt_len < 2 or new_tokens < 2:
        raise ValueError(f"batch_size={batch_size}, prompt_len={prompt_len}, new_tokens={new_tokens}: expected "
                         "batch_size >= 1, prompt_len >= 2, new_tokens >= 2")
    compare = [compare] if isinstance(compare, str) else list(compare or ())
    unknown = [c for c in compare if c not in ("hf", "reference")]
    if unknown:
        raise ValueError(f"compare={unknown!r}, expected 'hf' and/or 'reference'")
    if "hf" in compare and quantization is not None:
        raise ValueError("compare='hf' runs transformers on the engine's 16-bit weights; with quantization the "
                         "unquantized engine is the comparison (reported without --compare)")
    def make_engine(mode):
        return Engine(model, weights=weights, device=device, dtype=resolve_dtype(dtype) if dtype else None,
                      seed=seed, max_batch_size=batch_size, quantization=mode,
                      tensor_parallel_size=tensor_parallel_size)

    with ops_backend.recording() as faces:  # _measure reads it after the timed run
        load_start = time.perf_counter()
        engine = make_engine(quantization)
        _sync(device)
        load_s = time.perf_counter() - load_start
        if tensor_parallel_size == 1:
            return _measure(engine, load_s, batch_size, prompt_len, new_tokens, compare, seed, progress, modality,
                            quantization, make_engine, faces)
        from anygpt_engine.distributed import run

        all_reduce_s = all_reduce_seconds(engine, batch_size)  # every rank, before rank 0 leads
        report = run(engine, lambda e: _measure(e, load_s, batch_size, prompt_len, new_tokens, compare, seed, progress,
                                                modality, None, None, faces))
    if report is not None:
        layers = engine.config.num_layers
        report.update({"tensor_parallel_size": tensor_parallel_size, "all_reduce_us": all_reduce_s * 1e6,
                       # two all-reduces per layer (after wo and w2), one for the embedding
                       "all_reduce_ms_per_step": (2 * layers + 1) * all_reduce_s * 1e3,
                       "all_reduce_fraction_of_step": (2 * layers + 1) * all_reduce_s / (report["step_ms_p50"] / 1e3)})
    return report


def all_reduce_seconds(engine: Engine, batch_size: int, repeats: int = 50) -> float:
    """Median time of one decode all-reduce ([batch, hidden] in the engine's dtype) on the
    engine's tensor-parallel group; every rank must call it."""
    import torch.distributed as dist

    shard = engine.model.shard
    x = torch.ones(batch_size, engine.config.hidden_size, device=engine.device, dtype=engine.dtype)
    times = []
    for i in range(repeats + 3):
        dist.barrier(group=shard.group)
        _sync(engine.device)
        start = time.perf_counter()
        dist.all_reduce(x, group=shard.group)
        _sync(engine.device)
        if i >= 3:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def _measure(engine: Engine, load_s: float, batch_size: int, prompt_len: int, new_tokens: int, compare, seed: int,
             progress: bool, modality, quantization, make_engine, faces: ops_backend.FaceRecord) -> dict:
    """The report for `engine`; make_engine(mode) builds it again with another quantization
    (the unquantized comparison and the reference run of a quantized engine). `faces` has
    recorded the dispatch since the engine was built; it is read before the comparisons run."""
    device = engine.device
    prompts = _prompts(engine, batch_size, prompt_len, seed, modality)

    # Warm-up (allocator, kernels) on other prompts, so the timed run finds no cached prefix.
    run_engine(engine, _prompts(engine, batch_size, prompt_len, seed + 1, modality), min(4, new_tokens),
               progress=False)
    hits_before = engine.scheduler.blocks.hit_tokens, engine.scheduler.blocks.queried_tokens
    rows_before = engine.head_rows_read
    result = run_engine(engine, prompts, new_tokens, progress)
    faces_ran = faces.faces()
    head_rows = (engine.head_rows_read - rows_before) / (batch_size * len(result["step_s"]))
    steps = result["step_s"]
    median = statistics.median(steps)
    head_saved = (engine.config.vocab_size - head_rows) * engine.config.hidden_size * engine.dtype.itemsize
    weight_bytes = weight_bytes_per_step(engine, batch_size) - int(head_saved)
    kv_bytes = kv_bytes_per_step(engine, batch_size, prompt_len + new_tokens / 2)
    bandwidth = copy_bandwidth(device)
    stats = engine.stats()
    report = {
        "model": engine.config.name, "device": str(device), "dtype": str(engine.dtype).replace("torch.", ""),
        "quantization": quantization or "none",
        "batch_size": batch_size, "prompt_len": prompt_len, "new_tokens": new_tokens,
        "parameters": engine.config.num_parameters(), "load_s": load_s,
        "ttft_ms": result["ttft_s"] * 1e3,
        "decode_tok_s": batch_size * len(steps) / sum(steps),
        "step_ms_p50": median * 1e3, "step_ms_p99": _percentile(steps, 0.99) * 1e3,
        "weight_bytes_per_step": weight_bytes, "kv_bytes_per_step": kv_bytes,
        "achieved_gb_s": (weight_bytes + kv_bytes) / median / 1e9,
        "copy_bandwidth_gb_s": bandwidth / 1e9,
        "fraction_of_copy_bandwidth": (weight_bytes + kv_bytes) / median / bandwidth,
        "end_to_end_tok_s": batch_size * new_tokens / result["total_s"],
        "modality": modality or "text",
        "lm_head_rows_per_token": head_rows,
        "lm_head_bytes_saved_per_token": head_saved,
        "prefix_cache_hit_rate": (stats.prefix_hits - hits_before[0]) / max(1, stats.prefix_queries - hits_before[1]),
        "preemptions": stats.preemptions, "kv_blocks": stats.total_blocks, "cuda_graphs": stats.graphs,
        "graph_capture_s": stats.graph_capture_s,
        "warm_up_s": engine.warm_up_summary.seconds if engine.warm_up_summary is not None else 0.0,
        "graph_buckets_used": [f"{b}x{w}" for b, w in stats.graph_buckets_used],
        "faces": faces_ran, "cuda_kernels_built": cuda_kernels_missing() is None,
        "git_sha": git_sha(), "torch": torch.__version__, "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        **nvml_info(device),
    }
    if cuda_kernels_missing() is not None:
        report["cuda_kernels_missing"] = cuda_kernels_missing()
    if quantization is not None:
        report.update(compare_quantized(engine, prompts, result, new_tokens, lambda: make_engine(None)))
    if "reference" in compare:
        ref = run_reference(engine, prompts, new_tokens,
                            None if quantization is None else lambda: make_engine(quantization))
        same = sum(a == b for ours, theirs in zip(result["outputs"], ref["outputs"]) for a, b in zip(ours, theirs))
        report.update({
            "reference_decode_tok_s": batch_size * len(ref["step_s"]) / sum(ref["step_s"]),
            "speedup_vs_reference": (batch_size * len(steps) / sum(steps))
            / (batch_size * len(ref["step_s"]) / sum(ref["step_s"])),
            "greedy_tokens_equal_to_reference": same / (batch_size * new_tokens),
        })
    if "hf" in compare:
        hf = run_hf(engine, prompts, new_tokens)
        same = sum(a == b for ours, theirs in zip(result["outputs"], hf["outputs"]) for a, b in zip(ours, theirs))
        report.update({
            "hf_end_to_end_tok_s": batch_size * new_tokens / hf["total_s"],
            "speedup_vs_hf": hf["total_s"] / result["total_s"],
            "greedy_tokens_equal_to_hf": same / (batch_size * new_tokens),
        })
    return report


_ROWS = [
    ("model", "{}"), ("device", "{}"), ("gpu", "{}"), ("dtype", "{}"), ("quantization", "{}"), ("batch_size", "{}"),
    ("prompt_len", "{}"),
    ("new_tokens", "{}"), ("parameters", "{:,}"), ("ttft_ms", "{:.2f}"), ("decode_tok_s", "{:.1f}"),
    ("step_ms_p50", "{:.3f}"), ("step_ms_p99", "{:.3f}"), ("weight_bytes_per_step", "{:,}"),
    ("kv_bytes_per_step", "{:,.0f}"), ("achieved_gb_s", "{:.1f}"), ("copy_bandwidth_gb_s", "{:.1f}"),
    ("fraction_of_copy_bandwidth", "{:.1%}"), ("end_to_end_tok_s", "{:.1f}"), ("modality", "{}"),
    ("lm_head_rows_per_token", "{:,.0f}"), ("lm_head_bytes_saved_per_token", "{:,.0f}"), ("hf_end_to_end_tok_s", "{:.1f}"),
    ("speedup_vs_hf", "{:.2f}x"), ("reference_decode_tok_s", "{:.1f}"), ("speedup_vs_reference", "{:.2f}x"),
    ("greedy_tokens_equal_to_reference", "{:.1%}"), ("greedy_tokens_equal_to_hf", "{:.1%}"),
    ("unquantized_decode_tok_s", "{:.1f}"), ("speedup_vs_unquantized", "{:.2f}x"),
    ("greedy_tokens_equal_to_unquantized", "{:.1%}"), ("greedy_choices_equal_teacher_forced", "{:.1%}"),
    ("logits_max_abs_error", "{:.4g}"), ("logits_rel_error", "{:.2%}"), ("prefix_cache_hit_rate", "{:.1%}"),
    ("preemptions", "{}"), ("kv_blocks", "{:,}"), ("cuda_graphs", "{}"), ("graph_capture_s", "{:.2f}"),
    ("warm_up_s", "{:.2f}"), ("graph_buckets_used", "{}"), ("cuda_kernels_built", "{}"),
    ("cuda_kernels_missing", "{}"), ("tensor_parallel_size", "{}"), ("all_reduce_us", "{:.1f}"),
    ("all_reduce_ms_per_step", "{:.3f}"), ("all_reduce_fraction_of_step", "{:.1%}"), ("sm_clock_mhz", "{}"),
    ("mem_clock_mhz", "{}"), ("power_w", "{:.0f}"), ("power_limit_w", "{:.0f}"), ("memory_used_gib", "{:.1f}"),
    ("memory_total_gib", "{:.1f}"), ("git_sha", "{}"), ("torch", "{}"),
]


def format_table(report: dict) -> str:
    lines = []
    for key, fmt in _ROWS:
        if key in report:
            lines.append(f"{key:<28} {fmt.format(report[key])}")
        if key == "cuda_kernels_missing":  # beside it, a row per op: the faces it ran
            lines.extend(f"{'face ' + op:<28} {', '.join(faces)}" for op, faces in report.get("faces", {}).items())
    return "\n".join(lines)


def write_json(report: dict, path: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(report, indent=2) + "\n")

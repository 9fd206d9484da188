"""Beam search end to end: the engine's beam search (runtime/beams.py; paged KV cache shared
between beams, decode steps replayed from CUDA graphs on a GPU) against transformers'
generate(num_beams=N) on the same weights and prompts, in the same run.

Both generate exactly --new-tokens tokens per request (min_new_tokens = max_new_tokens, so no
search ends early) from random text prompts, a fresh prompt per repeat (no prefix-cache hits).
Reported per side: the median wall time of a whole request (prefill included, host included)
and tokens/s = batch x new tokens / that time (the tokens of the returned best sequences), the
ratio, the fraction of best-sequence tokens that agree (greedy beam search only; beam-sample
draws differ by design), the GPU's name and the git sha.

    python benchmarks/bench_beam.py [--model auto|tiny|anygpt-7b|DIR] [--num-beams 5] [--batch 1]
                                    [--prompt-len 64] [--new-tokens N] [--repeats 3] [--sample]
                                    [--dtype bfloat16] [--device cuda] [--json PATH]

--model auto is the anygpt-7b preset (random bf16 weights) on a GPU and tiny on a CPU.
--sample runs beam-sample with AnyGPT's chat text config (temperature 1, top_k 50).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from anygpt_engine import Engine, SamplingParams
from anygpt_engine.bench import _prompts, _sync, git_sha, hf_model, nvml_info
from anygpt_engine.engine import default_device, resolve_dtype


def _time_engine(engine: Engine, prompts, params: SamplingParams) -> tuple[float, list]:
    _sync(engine.device)
    start = time.perf_counter()
    outputs = engine.generate(prompts, params)
    _sync(engine.device)
    return time.perf_counter() - start, outputs


def _time_hf(model, engine: Engine, prompts, num_beams: int, new_tokens: int, sample: bool) -> tuple[float, list]:
    input_ids = torch.tensor(prompts, device=engine.device)
    warpers = dict(temperature=1.0, top_k=50, top_p=1.0) if sample else dict(temperature=None, top_k=None, top_p=None)
    _sync(engine.device)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), num_beams=num_beams,
                             do_sample=sample, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             pad_token_id=engine.config.pad_token_id, **warpers)
    _sync(engine.device)
    return time.perf_counter() - start, out[:, input_ids.shape[1]:].tolist()


def benchmark(model="auto", num_beams=5, batch=1, prompt_len=64, new_tokens=None, repeats=3, sample=False,
              dtype=None, device=None) -> dict:
    device = torch.device(device) if device is not None else default_device()
    if model == "auto":
        model = "anygpt-7b" if device.type == "cuda" else "tiny"
    if new_tokens is None:
        new_tokens = 128 if device.type == "cuda" else 24
    engine = Engine(model, device=device, dtype=resolve_dtype(dtype) if dtype else None,
                    max_batch_size=max(8, batch * num_beams))
    hf = hf_model(engine)
    params = (SamplingParams(temperature=1.0, top_k=50, top_p=1.0, seed=0, num_beams=num_beams,
                             min_new_tokens=new_tokens, max_new_tokens=new_tokens, stop_token_ids=())
              if sample else SamplingParams.greedy(new_tokens, num_beams=num_beams, min_new_tokens=new_tokens,
                                                   stop_token_ids=()))
    warm = _prompts(engine, batch, prompt_len, seed=1000)
    _time_engine(engine, warm, SamplingParams.greedy(4, num_beams=num_beams, stop_token_ids=()))
    _time_hf(hf, engine, warm, num_beams, 4, sample)
    ours, theirs, agree = [], [], []
    for r in range(repeats):
        prompts = _prompts(engine, batch, prompt_len, seed=r)
        t_ours, out_ours = _time_engine(engine, prompts, params)
        t_hf, out_hf = _time_hf(hf, engine, prompts, num_beams, new_tokens, sample)
        ours.append(t_ours)
        theirs.append(t_hf)
        agree.append(sum(a == b for x, y in zip(out_ours, out_hf) for a, b in zip(x, y)) / (batch * new_tokens))
    import transformers

    median_ours, median_hf = statistics.median(ours), statistics.median(theirs)
    report = {
        "model": engine.config.name, "device": str(device), "dtype": str(engine.dtype).replace("torch.", ""),
        "mode": "beam-sample" if sample else "beam search", "num_beams": num_beams, "batch": batch,
        "prompt_len": prompt_len, "new_tokens": new_tokens, "repeats": repeats,
        "engine_median_s": median_ours, "engine_tok_s": batch * new_tokens / median_ours,
        "hf_median_s": median_hf, "hf_tok_s": batch * new_tokens / median_hf,
        "speedup_vs_hf": median_hf / median_ours,
        "cuda_graphs": engine.stats().graphs,
        "git_sha": git_sha(), "torch": torch.__version__, "transformers": transformers.__version__,
        "cpu": platform.processor() or platform.machine(), **nvml_info(device),
    }
    if not sample:
        report["best_tokens_equal_to_hf"] = statistics.mean(agree)
    return report


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="auto")
    parser.add_argument("--num-beams", type=int, default=5)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sample", action="store_true", help="beam-sample (AnyGPT's chat text config)")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    report = benchmark(args.model, args.num_beams, args.batch, args.prompt_len, args.new_tokens, args.repeats,
                       args.sample, args.dtype, args.device)
    for key, value in report.items():
        print(f"{key:<24} {value:.4g}" if isinstance(value, float) else f"{key:<24} {value}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()

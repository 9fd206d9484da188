"""Fused sampling (ops.sample_tokens) against torch's sort-based top-p and transformers' warpers,
measured in the same run, at V = 53,516 (AnyGPT's vocabulary) for B = 1..256.

Workloads (every row pays the repetition penalty over a 512-token history and the allowed-id
mask; half the rows have a speech span open, so only 1,025 ids are legal there):
  top_p     temperature 1, top_p 0.9        (the peer: sort, softmax, cumsum, mask, draw)
  speech    AnyGPT's speech preset: top_k 50, repetition penalty 1.05, min_new_tokens 10
  greedy    temperature 0
Peers: `torch_sort_top_p` (penalty + mask + one full-vocabulary sort for top-p, then a draw),
`hf_warpers` (transformers' RepetitionPenalty, Temperature, TopK, TopP processors, then a draw).
Every face is timed as a CUDA-graph replay where it can be captured (the engine replays its
decode step), else eagerly; the `mode` column says which. Reports the median time, GB/s over
the bytes a fused face must read (float32 logits plus the seen, stop and allowed bytes: 7 B per
logit), the ratio to each peer, the GPU name and the git sha.

    python benchmarks/bench_sampling.py [--json PATH] [--batch 1 4 16 64 256] [--quick]

--quick is a CPU smoke run (B = 1, 4; the torch reference and the peers; few repeats).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from anygpt_engine import SamplingParams, Vocabulary, ops
from anygpt_engine.bench import git_sha, median_seconds
from anygpt_engine.sampling import ModalityConstraint, SamplerWork, SamplingState

WORKLOADS = {
    "top_p": dict(temperature=1.0, top_p=0.9, repetition_penalty=1.1),
    "speech": dict(temperature=1.0, top_k=50, repetition_penalty=1.05, min_new_tokens=10),
    "greedy": dict(temperature=0.0, repetition_penalty=1.1),
}
HISTORY = 512


def _setup(batch, workload, device, vocab, constraint, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = SamplingParams(**WORKLOADS[workload])
    state = SamplingState(batch, vocab.size, device)
    speech = vocab.start_token("speech")
    for i in range(batch):
        prompt = torch.randint(0, vocab.size, (HISTORY,), generator=g).tolist()
        if i % 2:
            prompt.append(speech)
        state.assign(i, params, 1000 + i, prompt, (vocab.end_token("speech"), 2), constraint.state_after(prompt))
    logits = (torch.randn(batch, vocab.size, generator=g) * 3).to(device)
    return params, state, logits


def _time(fn, device, repeats):
    """(median seconds, mode): CUDA-graph replays when fn captures, else eager calls."""
    fn()
    if device.type != "cuda":
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times), "eager"
    torch.cuda.synchronize()
    mode, run = "eager", fn
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        graph.replay()
        torch.cuda.synchronize()
        mode, run = "graph", graph.replay
    except Exception:  # not capturable (e.g. a host sync inside): time it eagerly
        torch.cuda.synchronize()
    return median_seconds(run, repeats), mode


def _peer_inputs(state, logits, constraint, batch):
    slots = torch.arange(batch, device=logits.device)
    rows = state.rows(slots)
    allowed = constraint.allowed[rows.open_modality]
    return rows, allowed


def torch_sort_top_p(logits, rows, allowed, top_p=0.9):
    """The usual torch top-p: penalty and mask, one descending sort, softmax, cumsum, mask, draw."""
    p = rows.repetition_penalty.unsqueeze(1)
    x = torch.where(rows.seen, torch.where(logits < 0, logits * p, logits / p), logits)
    x = x.masked_fill(~allowed, -float("inf")) / rows.temperature.clamp(min=1e-5).unsqueeze(1)
    sorted_x, order = x.sort(dim=-1, descending=True)
    probs = sorted_x.softmax(-1)
    drop = probs.cumsum(-1) - probs > top_p
    sorted_x = sorted_x.masked_fill(drop, -float("inf"))
    choice = torch.multinomial(sorted_x.softmax(-1), 1)
    return order.gather(1, choice).squeeze(1)


def hf_warpers(logits, rows, allowed, history, params):
    from transformers.generation.logits_process import (LogitsProcessorList, RepetitionPenaltyLogitsProcessor,
                                                        TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

    processors = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(params.repetition_penalty)])
    if params.temperature > 0:
        processors.append(TemperatureLogitsWarper(params.temperature))
        if params.top_k:
            processors.append(TopKLogitsWarper(params.top_k))
        if params.top_p < 1:
            processors.append(TopPLogitsWarper(params.top_p))
    scores = processors(history, logits.masked_fill(~allowed, -float("inf")))
    if params.temperature == 0:
        return scores.argmax(-1)
    return torch.multinomial(scores.softmax(-1), 1).squeeze(1)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default=None, help="write the rows as JSON here")
    parser.add_argument("--batch", type=int, nargs="*", default=None)
    parser.add_argument("--workload", nargs="*", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="CPU smoke run: small batches, few repeats")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    batches = args.batch or ([1, 4] if args.quick or device.type == "cpu" else [1, 4, 16, 64, 256])
    repeats = args.repeats or (3 if device.type == "cpu" else 100)
    faces = ["cuda", "triton", "torch"] if device.type == "cuda" else ["torch"]
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    sha = git_sha()
    vocab = Vocabulary.anygpt()
    constraint = ModalityConstraint.build(vocab, device)
    try:
        import transformers  # noqa: F401
        have_hf = True
    except ImportError:
        have_hf = False

    print(f"# sample_tokens  device={name}  V={vocab.size}  git={sha}")
    print(f"{'workload':>8} {'B':>4} {'face':>17} {'mode':>6} {'median_us':>10} {'GB/s':>8} {'vs_sort':>8} "
          f"{'vs_hf':>8}")
    rows_out = []
    for workload in args.workload:
        for batch in batches:
            params, state, logits = _setup(batch, workload, device, vocab, constraint)
            rows, allowed = _peer_inputs(state, logits, constraint, batch)
            history = torch.randint(0, vocab.size, (batch, HISTORY), device=device)
            moved = logits.numel() * 7
            results = {}
            results["torch_sort_top_p"] = _time(lambda: torch_sort_top_p(logits, rows, allowed), device, repeats)
            if have_hf:
                results["hf_warpers"] = _time(lambda: hf_warpers(logits, rows, allowed, history, params), device,
                                              repeats)
            slots = torch.arange(batch, device=device)
            out = torch.empty(batch, dtype=torch.int64, device=device)
            work = SamplerWork.for_params([params])
            for face in faces:
                results[face] = _time(lambda face=face: ops.sample_tokens(logits, slots, state, constraint, work,
                                                                           out=out, backend=face), device, repeats)
            sort_t = results["torch_sort_top_p"][0]
            hf_t = results["hf_warpers"][0] if have_hf else float("nan")
            for face, (t, mode) in results.items():
                row = dict(workload=workload, batch=batch, vocab=vocab.size, face=face, mode=mode, median_s=t,
                           gb_s=moved / t / 1e9, speedup_vs_sort_top_p=sort_t / t, speedup_vs_hf=hf_t / t, gpu=name,
                           git_sha=sha)
                rows_out.append(row)
                print(f"{workload:>8} {batch:>4} {face:>17} {mode:>6} {t * 1e6:>10.1f} {row['gb_s']:>8.1f} "
                      f"{row['speedup_vs_sort_top_p']:>7.2f}x {row['speedup_vs_hf']:>7.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows_out, f, indent=2)


if __name__ == "__main__":
    main()

"""SoundStorm generate (AnyGPT's algorithm, steps=3): the fast path against the reference path in
the same run, for 10 s and 30 s of speech (500 and 1,500 frames at 50 Hz), batch 1 and 8.

  reference:  float32 weights, the reference network (generate(fast=False)) and the torch face
              of the MaskGIT step: a plain PyTorch implementation of the same algorithm
  fast:       generate's GPU default: forward_fast (weights cast once to --dtype, bf16 by
              default; fused kernels; float32 logits) replayed as one CUDA graph per (batch,
              frame bucket), captured up front (capture time reported), the fused MaskGIT step
  fast_eager: the same forward without graphs (what the graphs buy)

One model (AnyGPT's shape, 351M parameters, random weights) serves every path. Reports median
milliseconds per generate call (wall clock, synchronized), the speed-up over the reference, the
fraction of codes equal to the reference's (bf16 changes ids where logits nearly tie, and a
changed id changes the passes after it), the GPU name and the git sha. The issue's target: 10 s
of speech at batch 1 in <= 30 ms on an H100 (goal 15 ms).
--quick is a CPU smoke run of the harness on a tiny model (fast path eager on the torch faces).

    python benchmarks/bench_soundstorm.py [--quick] [--json PATH] [--frames 500 1500] [--batch 1 8]
"""

import argparse
import json

import torch

from anygpt_engine import SoundStorm, SoundStormConfig
from anygpt_engine.bench import git_sha, median_wall_ms

TINY = SoundStormConfig(dim=64, depth=2, heads=2, dim_head=32, conv_kernel_size=7, num_quantizers=7,
                        codebook_size=64)
TARGET_MS, GOAL_MS = 30.0, 15.0


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CPU smoke run on a tiny model")
    parser.add_argument("--json", default=None, help="write the results as JSON here")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                        help="the fast path's weights and activations")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--frames", type=int, nargs="+", default=None, help="frames per item (50 per second)")
    parser.add_argument("--batch", type=int, nargs="+", default=None, help="batch sizes")
    parser.add_argument("--repeats", type=int, default=7, help="timed calls of the fast paths")
    parser.add_argument("--reference-repeats", type=int, default=3, help="timed calls of the reference path")
    parser.add_argument("--no-eager", action="store_true", help="skip the fast path without graphs")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    config = TINY if args.quick else SoundStormConfig.anygpt()
    frames_list = args.frames or ([20, 60] if args.quick else [500, 1500])
    batches = args.batch or ([1, 2] if args.quick else [1, 8])
    repeats, ref_repeats = (1, 1) if args.quick else (args.repeats, args.reference_repeats)
    graphs = device.type == "cuda"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    sha = git_sha()

    model = SoundStorm(config, device=device).eval()  # float32: the reference's weights
    model.fast_dtype = getattr(torch, args.dtype)
    capture_s = model.capture_graphs(batches, frames_list) if graphs else 0.0
    print(f"# soundstorm generate  device={name}  steps={args.steps}  fast dtype={args.dtype}  git={sha}")
    if graphs:
        print(f"# captured {len(model.captured_graphs)} graphs {model.captured_graphs} in {capture_s:.2f} s",
              flush=True)
    print(f"{'frames':>6} {'speech_s':>8} {'batch':>5} {'reference_ms':>12} {'fast_ms':>8} {'eager_ms':>8} "
          f"{'speedup':>8} {'codes_equal':>11}")
    rows = []
    for frames in frames_list:
        for batch in batches:
            g = torch.Generator().manual_seed(frames + batch)
            semantic = torch.randint(0, config.codebook_size, (batch, frames), generator=g)
            seeds = list(range(batch))

            def run(**kw):
                return model.generate(semantic, steps=args.steps, seeds=seeds, **kw)

            ref_ms, ref_codes = median_wall_ms(lambda: run(fast=False, backend="torch"), device, ref_repeats)
            fast_ms, fast_codes = median_wall_ms(lambda: run(fast=True, cuda_graphs=graphs), device, repeats)
            eager_ms = eager_same = None
            if graphs and not args.no_eager:
                eager_ms, eager_codes = median_wall_ms(lambda: run(fast=True, cuda_graphs=False), device, repeats)
                eager_same = bool(torch.equal(eager_codes, fast_codes))  # expected: same kernels, same shapes
            equal = (fast_codes == ref_codes).float().mean().item()
            row = dict(frames=frames, speech_s=frames / 50, batch=batch, steps=args.steps, reference_ms=ref_ms,
                       fast_ms=fast_ms, fast_eager_ms=eager_ms, speedup=ref_ms / fast_ms,
                       codes_equal_fraction=equal, graph_codes_equal_eager=eager_same, fast_dtype=args.dtype,
                       cuda_graphs=graphs, gpu=name, git_sha=sha, quick=args.quick)
            rows.append(row)
            eager = f"{eager_ms:>8.2f}" if eager_ms is not None else f"{'-':>8}"
            print(f"{frames:>6} {frames / 50:>8.1f} {batch:>5} {ref_ms:>12.2f} {fast_ms:>8.2f} {eager} "
                  f"{ref_ms / fast_ms:>7.2f}x {equal:>11.3f}", flush=True)
    headline = next((r for r in rows if r["frames"] == 500 and r["batch"] == 1), None)
    if headline is not None and not args.quick:
        verdict = ("goal met" if headline["fast_ms"] <= GOAL_MS else
                   "target met" if headline["fast_ms"] <= TARGET_MS else "target NOT met")
        print(f"# 10 s of speech, batch 1: {headline['fast_ms']:.2f} ms (target <= {TARGET_MS:.0f} ms, goal "
              f"{GOAL_MS:.0f} ms): {verdict}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(gpu=name, git_sha=sha, capture_s=capture_s, captured_graphs=model.captured_graphs,
                           rows=rows), f, indent=2)


if __name__ == "__main__":
    main()

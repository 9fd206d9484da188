"""SoundStorm generate (AnyGPT's algorithm, steps=3): the engine path against the reference path
in the same run, for 10 s and 30 s of speech (500 and 1,500 frames at 50 Hz), batch 1 and 8.

  reference: float32 weights, the torch reference network and the torch MaskGIT step
             (a plain PyTorch implementation of the same algorithm)
  engine:    --dtype weights (bf16 by default) and the fused MaskGIT step kernel (CUDA or Triton)

Random weights with AnyGPT's shape (351M parameters). Reports median seconds per generate call,
the speed-up, the fraction of codes equal to the reference's, the GPU name and the git sha.
--quick is a CPU smoke run of the harness on a tiny model (both paths use the torch step there).

    python benchmarks/bench_soundstorm.py [--quick] [--json PATH]
"""

import argparse
import json
import statistics
import time

import torch

from anygpt_engine import SoundStorm, SoundStormConfig
from anygpt_engine.bench import git_sha

TINY = SoundStormConfig(dim=64, depth=2, heads=2, dim_head=32, conv_kernel_size=7, num_quantizers=7,
                        codebook_size=64)


def _median_time(fn, device, repeats):
    fn()  # warm-up: kernel compilation, allocator
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CPU smoke run on a tiny model")
    parser.add_argument("--json", default=None, help="write the rows as JSON here")
    parser.add_argument("--dtype", default="bfloat16", help="weights of the engine path")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    config = TINY if args.quick else SoundStormConfig.anygpt()
    frames_list, batches = ([20, 60], [1, 2]) if args.quick else ([500, 1500], [1, 8])
    repeats = 1 if args.quick else args.repeats
    engine_backend = None if device.type == "cuda" else "torch"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    sha = git_sha()

    reference = SoundStorm(config, device=device).eval()
    engine = SoundStorm(config, device=device, dtype=getattr(torch, args.dtype)).eval()
    engine.load_state_dict(reference.state_dict())
    print(f"# soundstorm generate  device={name}  steps={args.steps}  engine dtype={args.dtype}  git={sha}")
    print(f"{'frames':>6} {'speech_s':>8} {'batch':>5} {'reference_s':>11} {'engine_s':>9} {'speedup':>7} "
          f"{'codes_equal':>11}")
    rows = []
    for frames in frames_list:
        for batch in batches:
            g = torch.Generator().manual_seed(frames + batch)
            semantic = torch.randint(0, config.codebook_size, (batch, frames), generator=g)
            seeds = list(range(batch))

            def run(model, backend):
                return model.generate(semantic, steps=args.steps, seeds=seeds, backend=backend)

            ref_s = _median_time(lambda: run(reference, "torch"), device, repeats)
            eng_s = _median_time(lambda: run(engine, engine_backend), device, repeats)
            equal = (run(engine, engine_backend) == run(reference, "torch")).float().mean().item()
            row = dict(frames=frames, speech_s=frames / 50, batch=batch, steps=args.steps, reference_s=ref_s,
                       engine_s=eng_s, speedup=ref_s / eng_s, codes_equal_fraction=equal, engine_dtype=args.dtype,
                       gpu=name, git_sha=sha, quick=args.quick)
            rows.append(row)
            print(f"{frames:>6} {frames / 50:>8.1f} {batch:>5} {ref_s:>11.4f} {eng_s:>9.4f} {ref_s / eng_s:>6.2f}x "
                  f"{equal:>11.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()

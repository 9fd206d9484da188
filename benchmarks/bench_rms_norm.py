"""RMSNorm (+ fused residual add) faces against the torch reference, in the same run.

Reports median time, achieved GB/s (bytes each face must move), the ratio to the torch
reference, the GPU name and the git sha. On a CPU it times the C++ twin against torch.

    python benchmarks/bench_rms_norm.py [--json PATH]
"""

import argparse
import json

import torch

from anygpt_engine import ops
from anygpt_engine.bench import git_sha, median_seconds

SHAPES = [(1, 4096), (16, 4096), (128, 4096), (4096, 4096), (16384, 4096)]


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", default=None)
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    faces = ["cuda", "triton"] if device.type == "cuda" else ["cpp"]
    repeats = 100 if device.type == "cuda" else 5
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    rows = []
    print(f"# rms_norm  device={name}  dtype={args.dtype}  git={git_sha()}")
    print(f"{'shape':>14} {'fused':>5} {'face':>7} {'median_us':>10} {'GB/s':>8} {'vs_torch':>8}")
    for shape in SHAPES:
        if device.type == "cpu" and shape[0] > 128:
            continue
        for fused in (False, True):
            x = torch.randn(shape, device=device).to(dtype)
            w = torch.rand(shape[1], device=device).to(dtype) + 0.5
            residual = torch.randn(shape, device=device).to(dtype)
            out = torch.empty_like(x)
            # Bytes a face must move: read x (+ residual) and weight, write out (+ residual).
            moved = x.numel() * x.element_size() * (4 if fused else 2) + w.numel() * w.element_size()

            def run(face):
                return lambda: ops.rms_norm(x, w, 1e-5, residual=residual if fused else None, out=out, backend=face)

            reference = median_seconds(run("torch"), repeats)
            for face in faces:
                t = median_seconds(run(face), repeats)
                row = dict(shape=list(shape), fused=fused, face=face, median_s=t, gb_s=moved / t / 1e9,
                           speedup_vs_torch=reference / t, gpu=name, git_sha=git_sha(), dtype=args.dtype)
                rows.append(row)
                print(f"{str(shape):>14} {str(fused):>5} {face:>7} {t * 1e6:>10.2f} {row['gb_s']:>8.1f} "
                      f"{row['speedup_vs_torch']:>7.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()

"""RVQ encode/decode: the engine's faces against the plain torch loop (speechtokenizer/encodec's
algorithm: float32 distance matrix per level, argmax, subtract), in the same run.

    python benchmarks/bench_rvq.py                  # GPU: N = 500..64000, the three codebook shapes
    python benchmarks/bench_rvq.py --quick          # CPU smoke run (Triton under the interpreter)
    python benchmarks/bench_rvq.py --json out.json  # also write the rows
    python benchmarks/bench_rvq.py --write-tuning   # GPU: sweep ENCODE_TILES and decode blocks at
                                                    # N = 32000, 8x1024x1024; record this GPU's best

Encode reports ms, achieved TFLOP/s (2 N K D L per call) and whether the codes equal the exact
reference (ops.rvq_encode_reference); the loop's own codes may differ on float32 near-ties,
counted as loop_mismatch. Decode reports ms and GB/s counting the output written plus every
gathered codeword read (N D 4 (L + 1) bytes). Codebooks are prepared once (RVQCodebooks), as a
codec keeps them. The table prints last, with the GPU name and the git sha.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any @triton.jit runs

from anygpt_engine import ops, tuning  # noqa: E402
from anygpt_engine.bench import git_sha, median_seconds  # noqa: E402
from anygpt_engine.ops import backend as ops_backend  # noqa: E402

SHAPES = {"speechtokenizer 8x1024x1024": (8, 1024, 1024), "encodec 4x2048x128": (4, 2048, 128),
          "seed 1x8192x32": (1, 8192, 32)}
FULL_SIZES = (500, 2000, 8000, 32000, 64000)
QUICK_SIZES = (16,)
# Triton encoder tiles (block_m, block_n, block_k, candidates, warps, stages, tma): each compiled for
# sm_90a with Triton 3.6 without spills (scripts/sm90_compile_check.py, 2026-11-26). 128-row
# blocks halve the codebook's L2 traffic; 4 warps let two programs share an SM, one selecting
# candidates while the other multiplies; 8 candidates suffice when few values come near the
# minimum (overflow falls back to an exact full scan, so any choice stays exact); tma reads the
# codeword tiles through a TMA descriptor instead of per-element loads.
ENCODE_TILES = [(64, 128, 64, 16, 8, 3, False), (64, 128, 64, 16, 8, 3, True), (128, 64, 64, 16, 8, 3, False),
                (64, 64, 64, 8, 4, 3, False), (64, 128, 64, 8, 8, 4, True)]
DECODE_BLOCKS = (256, 512, 1024)


def torch_loop_encode(x: torch.Tensor, embed: torch.Tensor) -> torch.Tensor:
    r = x
    codes = []
    for level in embed:
        dist = -(r.pow(2).sum(1, keepdim=True) - 2 * r @ level.t() + level.t().pow(2).sum(0, keepdim=True))
        idx = dist.max(dim=-1).indices
        codes.append(idx)
        r = r - level[idx]
    return torch.stack(codes)


def torch_loop_decode(codes: torch.Tensor, embed: torch.Tensor) -> torch.Tensor:
    out = torch.zeros((), device=codes.device)
    for level, idx in enumerate(codes):
        out = out + torch.nn.functional.embedding(idx, embed[level])
    return out


def timed(fn, reps: int) -> float:
    """Median milliseconds of fn() over reps runs (after two warm-up calls)."""
    return median_seconds(fn, reps, warmup=2) * 1e3


def faces(device: torch.device, requested: list[str] | None) -> list[str]:
    available = ["torch"]
    if ops_backend.triton_available():
        available.append("triton")
    if device.type == "cuda" and ops_backend.cuda_kernels_built():
        available.append("cuda")
    return [f for f in available if requested is None or f in requested]


def run(sizes, shape_names, face_names, reps: int) -> list[dict]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    for name in shape_names:
        levels, size, dim = SHAPES[name]
        g = torch.Generator().manual_seed(0)
        embed = ((torch.rand(levels, size, dim, generator=g) * 2 - 1) * (6.0 / dim) ** 0.5).to(device)
        book = ops.RVQCodebooks(embed)
        for n in sizes:
            x = (torch.randn(n, dim, generator=g) * (2.0 / dim) ** 0.5).to(device)
            exact = ops.rvq_encode_reference(x, book).codes
            loop_codes = torch_loop_encode(x, embed)
            flops = 2.0 * n * size * dim * levels
            decode_bytes = 4.0 * n * dim * (levels + 1)
            base_enc = timed(lambda: torch_loop_encode(x, embed), reps)
            base_dec = timed(lambda: torch_loop_decode(exact, embed), reps)
            rows.append(dict(op="encode", shape=name, n=n, face="torch loop", ms=base_enc,
                             tflops=flops / base_enc / 1e9,
                             identical=bool(torch.equal(loop_codes, exact)),
                             loop_mismatch=int((loop_codes != exact).any(0).sum()), speedup=1.0))
            rows.append(dict(op="decode", shape=name, n=n, face="torch loop", ms=base_dec,
                             gbps=decode_bytes / base_dec / 1e6, speedup=1.0))
            for face in face_names:
                if face == "cuda" and dim > ops.rvq.CUDA_MAX_DIM:
                    continue
                codes = ops.rvq_encode(x, book, backend=face)
                ms = timed(lambda: ops.rvq_encode(x, book, backend=face), reps)
                rows.append(dict(op="encode", shape=name, n=n, face=face, ms=ms, tflops=flops / ms / 1e9,
                                 identical=bool(torch.equal(codes, exact)), speedup=base_enc / ms))
                out = torch.empty(n, dim, device=device)
                ms = timed(lambda: ops.rvq_decode(exact, book, out=out, check_codes=False, backend=face), reps)
                rows.append(dict(op="decode", shape=name, n=n, face=face, ms=ms, gbps=decode_bytes / ms / 1e6,
                                 identical=bool(torch.equal(out, torch_loop_decode(exact, embed))),
                                 speedup=base_dec / ms))
            print(f"done: {name} N={n}", file=sys.stderr, flush=True)
    return rows


def sweep(n: int, reps: int, device: torch.device) -> tuple[list[dict], dict]:
    """Times every encoder tile and decode block on the speechtokenizer shape at n frames,
    keeping only configurations with identical codes / decodes; returns the rows and the
    tuning values to record (fastest Triton configuration, faces fastest first)."""
    levels, size, dim = SHAPES["speechtokenizer 8x1024x1024"]
    g = torch.Generator().manual_seed(1)
    embed = ((torch.rand(levels, size, dim, generator=g) * 2 - 1) * (6.0 / dim) ** 0.5).to(device)
    book = ops.RVQCodebooks(embed)
    x = (torch.randn(n, dim, generator=g) * (2.0 / dim) ** 0.5).to(device)
    exact = ops.rvq_encode_reference(x, book).codes
    decoded = torch_loop_decode(exact, embed)
    flops, decode_bytes = 2.0 * n * size * dim * levels, 4.0 * n * dim * (levels + 1)
    rows, enc, dec = [], {}, {}
    for bm, bn, bk, c, warps, stages, tma in ENCODE_TILES:
        config = dict(triton_block_m=bm, triton_block_n=bn, triton_block_k=bk, triton_candidates=c,
                      triton_num_warps=warps, triton_num_stages=stages, triton_tma=tma)
        with tuning.override("rvq", **config):
            same = bool(torch.equal(ops.rvq_encode(x, book, backend="triton"), exact))
            ms = timed(lambda: ops.rvq_encode(x, book, backend="triton"), reps)
        name = f"triton {bm}x{bn}x{bk} c{c} w{warps} s{stages}{' tma' if tma else ''}"
        rows.append(dict(op="encode", shape="sweep", n=n, face=name, ms=ms, tflops=flops / ms / 1e9, identical=same,
                         speedup=float("nan")))
        if same and ms < enc.get("triton", (float("inf"),))[0]:
            enc["triton"] = (ms, config)
    out = torch.empty(n, dim, device=device)
    for block_d in DECODE_BLOCKS:
        with tuning.override("rvq", decode_block_d=block_d):
            ops.rvq_decode(exact, book, out=out, backend="triton")
            same = bool(torch.equal(out, decoded))
            ms = timed(lambda: ops.rvq_decode(exact, book, out=out, check_codes=False, backend="triton"), reps)
        rows.append(dict(op="decode", shape="sweep", n=n, face=f"triton block_d={block_d}", ms=ms,
                         gbps=decode_bytes / ms / 1e6, identical=same, speedup=float("nan")))
        if same and ms < dec.get("triton", (float("inf"),))[0]:
            dec["triton"] = (ms, dict(decode_block_d=block_d))
    if device.type == "cuda" and ops_backend.cuda_kernels_built():
        same = bool(torch.equal(ops.rvq_encode(x, book, backend="cuda"), exact))
        ms = timed(lambda: ops.rvq_encode(x, book, backend="cuda"), reps)
        rows.append(dict(op="encode", shape="sweep", n=n, face="cuda", ms=ms, tflops=flops / ms / 1e9,
                         identical=same, speedup=float("nan")))
        if same:
            enc["cuda"] = (ms, {})
        ops.rvq_decode(exact, book, out=out, backend="cuda")
        same = bool(torch.equal(out, decoded))
        ms = timed(lambda: ops.rvq_decode(exact, book, out=out, check_codes=False, backend="cuda"), reps)
        rows.append(dict(op="decode", shape="sweep", n=n, face="cuda", ms=ms, gbps=decode_bytes / ms / 1e6,
                         identical=same, speedup=float("nan")))
        if same:
            dec["cuda"] = (ms, {})
    values = {}
    for key, found in (("encode_faces", enc), ("decode_faces", dec)):
        if found:
            values[key] = sorted(found, key=lambda face: found[face][0])
            values.update(found.get("triton", (0, {}))[1])
    return rows, values


def table(rows: list[dict]) -> str:
    head = (f"{'op':7} {'codebooks':28} {'N':>6} {'face':30} {'ms':>9} {'TFLOP/s':>8} {'GB/s':>8} {'x loop':>7} "
            "identical")
    lines = [head, "-" * len(head)]
    for r in rows:
        tf = f"{r['tflops']:8.2f}" if "tflops" in r else " " * 8
        gb = f"{r['gbps']:8.1f}" if "gbps" in r else " " * 8
        same = {True: "yes", False: "NO"}.get(r.get("identical"), "")
        if "loop_mismatch" in r:
            same += f" (loop_mismatch={r['loop_mismatch']})"
        lines.append(f"{r['op']:7} {r['shape']:28} {r['n']:6d} {r['face']:30} {r['ms']:9.3f} {tf} {gb} "
                     f"{r['speedup']:7.1f} {same}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (CPU smoke run)")
    parser.add_argument("--sizes", type=int, nargs="+", help="frame counts N")
    parser.add_argument("--shapes", nargs="+", choices=[s.split()[0] for s in SHAPES], help="codebook shapes")
    parser.add_argument("--faces", nargs="+", choices=["torch", "triton", "cuda"], help="engine faces to time")
    parser.add_argument("--reps", type=int, help="timed runs per measurement (median reported)")
    parser.add_argument("--json", type=Path, help="write the rows here")
    parser.add_argument("--write-tuning", action="store_true",
                        help="GPU: sweep the Triton tiles and decode blocks at N = 32000 (8x1024x1024) and record "
                             "this GPU's fastest configuration and face order in anygpt_engine/tuning/rvq.json")
    args = parser.parse_args()
    sizes = args.sizes or (QUICK_SIZES if args.quick else FULL_SIZES)
    names = [n for n in SHAPES if args.shapes is None or n.split()[0] in args.shapes]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    reps = args.reps or (1 if args.quick else 20)
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (Triton interpreted)"
    tuned = {}
    if args.write_tuning:
        if device.type != "cuda":
            parser.error("--write-tuning needs a GPU")
        sweep_rows, tuned = sweep(32000, reps, device)
        print(table(sweep_rows), flush=True)
        if tuned:
            print(f"wrote {tuned} for {gpu} to {tuning.write_gpu_entry('rvq', gpu, tuned)}", flush=True)
    # The rows below run with the table as it now stands (an override applies what was just written).
    with tuning.override("rvq", **tuned):
        rows = run(sizes, names, faces(device, args.faces), reps)
    if args.write_tuning:
        rows = sweep_rows + rows
    info = dict(gpu=gpu, git=git_sha(), torch=torch.__version__)
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    if args.json:
        args.json.write_text(json.dumps(dict(info=info, rows=rows), indent=1))
    print(" ".join(f"{k}: {v}" for k, v in info.items()))
    print(table(rows))


if __name__ == "__main__":
    main()

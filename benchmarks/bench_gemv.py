"""The decode GEMV (ops.linear) against cuBLAS (F.linear on the bf16 weight) in the same run:
every matrix of the 7B backbone at M = 1, 2, 4, 8, 16, for bf16, int8, fp8 and int4 weights
and each kernel face, with the fusions the backbone uses (RMSNorm prologue on wqkv and w13,
SiLU * up on w13, the residual add on wo and w2). Reported per row: median device time (L2
flushed before every repeat), GB/s of the bytes the op must move (weights with their scales,
x, the output, the residual), its fraction of the copy bandwidth measured in this run, the
speedup over cuBLAS's bare matmul, over the unfused cuBLAS composition (F.linear + torch's
norm / SiLU * up / add), and the error against the float32 reference.

With --write-tuning it first times the GEMV's candidate tiles on the 7B shapes (the FMA tile at
M = 1, the dot tile at M = 16, the FMA/dot boundary, the split-K rule at M = 1 and then the
split count per matrix and M, the CUDA face's warps per row, the face order, the cuBLAS
crossover for 16-bit weights), keeps only candidates whose results match the reference, and
records this GPU's fastest in anygpt_engine/tuning/gemv.json.

    python benchmarks/bench_gemv.py [--json PATH] [--write-tuning] [--quick]

--quick (any machine; on a CPU the Triton kernels run under the interpreter): small shapes,
M = 1 and 4, a smoke run of the whole table.
"""

import argparse
import json
import os
import sys

import torch

if not torch.cuda.is_available():  # before any @triton.jit is defined
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.nn.functional as F  # noqa: E402

from anygpt_engine import tuning  # noqa: E402
from anygpt_engine.bench import copy_bandwidth, git_sha, median_seconds  # noqa: E402
from anygpt_engine.ops import gemv  # noqa: E402
from anygpt_engine.ops.rms_norm import rms_norm  # noqa: E402
from anygpt_engine.quantization import quantize  # noqa: E402

# name: (rows N of the weight, K, fusion) for anygpt-7b; w13's N stacks gate and up.
SHAPES_7B = {"wqkv": (12288, 4096, "norm"), "wo": (4096, 4096, "residual"), "w13": (22016, 4096, "silu_mul"),
             "w2": (4096, 11008, "residual"), "lm_head": (53516, 4096, None)}
SHAPES_QUICK = {"wqkv": (384, 256, "norm"), "w13": (512, 256, "silu_mul"), "w2": (128, 256, "residual")}
MODES = (None, "int8", "fp8", "int4")  # None: the 16-bit weight itself


class Case:
    """One (shape, M, weight format) with its inputs, the op call and the two cuBLAS peers."""

    def __init__(self, name, n, k, fusion, m, mode, device, dtype, seed=0):
        g = torch.Generator(device=device).manual_seed(seed)
        self.name, self.m, self.mode, self.fusion = name, m, mode, fusion
        self.label = mode or str(dtype).replace("torch.", "").replace("bfloat16", "bf16").replace("float32", "fp32")
        self.w16 = (torch.randn(n, k, generator=g, device=device) * 0.02).to(dtype)
        self.weight = self.w16 if mode is None else quantize(self.w16, mode)
        self.x = torch.randn(m, k, generator=g, device=device).to(dtype)
        self.norm = (torch.rand(k, generator=g, device=device) + 0.5).to(dtype) if fusion in ("norm", "silu_mul") \
            else None
        n_out = n // 2 if fusion == "silu_mul" else n
        self.residual = torch.randn(m, n_out, device=device).to(dtype) if fusion == "residual" else None
        self.kwargs = dict(norm_weight=self.norm, activation="silu_mul" if fusion == "silu_mul" else None)
        weight_bytes = self.w16.numel() * self.w16.element_size() if mode is None else self.weight.nbytes
        io = self.x.numel() * self.x.element_size() + m * n_out * self.x.element_size() * (
            2 if fusion == "residual" else 1)
        self.bytes = weight_bytes + io
        self.bytes_16 = self.w16.numel() * self.w16.element_size() + io

    def run(self, face):
        if self.residual is not None:
            return lambda: gemv.linear(self.x, self.weight, residual=self.residual, backend=face, **self.kwargs)
        return lambda: gemv.linear(self.x, self.weight, backend=face, **self.kwargs)

    def cublas(self):
        return lambda: F.linear(self.x, self.w16)

    def cublas_unfused(self):
        """The same fusions as separate torch ops around cuBLAS (what the backbone ran before)."""
        def run():
            h = rms_norm(self.x, self.norm, 1e-5) if self.norm is not None else self.x
            y = F.linear(h, self.w16)
            if self.fusion == "silu_mul":
                gate, up = y.chunk(2, dim=-1)
                y = F.silu(gate) * up
            if self.residual is not None:
                self.residual.add_(y)
            return y
        return run

    def error(self, face) -> float:
        """Max |ours - float32 reference| / max |reference|."""
        activation = self.kwargs["activation"]
        expected = gemv.linear_reference(self.x, self.weight, self.norm, 1e-5, activation, self.residual)
        if self.residual is not None:
            got = gemv.linear(self.x, self.weight, residual=self.residual.clone(), backend=face, **self.kwargs)
        else:
            got = gemv.linear(self.x, self.weight, backend=face, **self.kwargs)
        return float((got.float() - expected.float()).abs().max() / expected.float().abs().max().clamp(min=1e-6))


def _faces(device) -> list[str]:
    if device.type != "cuda":
        return ["triton"]
    from anygpt_engine.ops._extension import cuda_kernels_built

    return ["triton", "cuda"] if cuda_kernels_built() else ["triton"]


def table(shapes, ms, modes, device, dtype, repeats, bandwidth) -> list[dict]:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"# gemv  device={name}  dtype={dtype}  git={git_sha()}  copy bandwidth {bandwidth / 1e9:.0f} GB/s")
    print(f"{'matrix':>8} {'M':>3} {'weights':>7} {'face':>6} {'us':>9} {'GB/s':>7} {'%copy':>6} {'vs cuBLAS':>9} "
          f"{'vs unfused':>10} {'rel err':>8}")
    rows = []
    for shape, (n, k, fusion) in shapes.items():
        for m in ms:
            for mode in modes:
                case = Case(shape, n, k, fusion, m, mode, device, dtype)
                cublas = median_seconds(case.cublas(), repeats)
                unfused = median_seconds(case.cublas_unfused(), repeats)
                for face in _faces(device):
                    if face == "cuda" and m > gemv.CUDA_MAX_M:
                        continue
                    t = median_seconds(case.run(face), repeats)
                    row = dict(matrix=shape, n=n, k=k, fusion=fusion, m=m, weights=case.label, face=face, median_s=t,
                               gb_s=case.bytes / t / 1e9, fraction_of_copy=case.bytes / t / bandwidth,
                               speedup_vs_cublas=cublas / t, speedup_vs_unfused=unfused / t, cublas_s=cublas,
                               cublas_gb_s=case.bytes_16 / cublas / 1e9, rel_error=case.error(face), gpu=name,
                               git_sha=git_sha(), dtype=str(dtype))
                    rows.append(row)
                    print(f"{shape:>8} {m:>3} {case.label:>7} {face:>6} {t * 1e6:>9.1f} {row['gb_s']:>7.0f} "
                          f"{row['fraction_of_copy']:>6.0%} {row['speedup_vs_cublas']:>8.2f}x "
                          f"{row['speedup_vs_unfused']:>9.2f}x {row['rel_error']:>8.1e}")
    return rows


# -- tuning sweep -------------------------------------------------------------------------------
FMA_TILES = [dict(fma_block_n=bn, fma_elements=el) for bn in (8, 16, 32) for el in (4096, 8192, 16384)]
DOT_TILES = [dict(dot_block_n=bn, dot_block_k=bk) for bn in (16, 32, 64) for bk in (64, 128, 256)]
CROSSOVER_MS = (16, 24, 32, 48, 64)
SPLIT_RULES = [dict(split_waves=w, split_min_k=k) for w in (0, 1, 2, 4) for k in (256, 1024)]  # 0: never split
SPLIT_COUNTS = (1, 2, 4, 8)  # measured per matrix and M (ops.gemv.split_k caps them at K's steps)
SPLIT_MS = (1, 2, 4, 8, 16)
CUDA_ROW_WARPS = [dict(cuda_warps_per_sm=w) for w in (8, 16, 32, 64)]
_TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 4e-3, torch.float32: 1e-4}


def _total(cases, face, repeats) -> float:
    """Summed median time over the cases, inf when any result is off the reference."""
    total = 0.0
    for case in cases:
        if case.error(face) > _TOLERANCE[case.x.dtype]:
            return float("inf")
        total += median_seconds(case.run(face), repeats)
    return total


def sweep(shapes, device, dtype, repeats) -> tuple[list[dict], dict]:
    """Times the candidates (coordinate by coordinate) and returns (rows, the values to record)."""
    rows, chosen = [], {}

    def cases(m, modes=(None, "int4")):
        return [Case(s, n, k, f, m, mode, device, dtype) for s, (n, k, f) in shapes.items() if s != "lm_head"
                for mode in modes]

    def best(kind, candidates, m, face="triton", modes=(None, "int4")):
        timed = []
        for values in candidates:
            with tuning.override("gemv", **{**chosen, **values}):
                t = _total(cases(m, modes), face, repeats)
            rows.append(dict(kind=kind, m=m, face=face, values=values, total_s=t))
            timed.append((t, values))
            print(f"{kind:>10} M={m:<3} {face:>6} {values} {t * 1e6:10.1f} us")
        t, values = min(timed, key=lambda item: item[0])
        if t == float("inf"):
            raise RuntimeError(f"no {kind} candidate matched the reference")
        chosen.update(values)
        return t

    best("fma_tile", FMA_TILES, 1)
    best("dot_tile", DOT_TILES, 16)
    best("dot_min_m", [dict(dot_min_m=d) for d in (2, 4, 8, 16, 17)], 4)
    best("split_rule", SPLIT_RULES, 1)
    # Measured split counts per matrix and M; they win over the rule in ops.gemv.split_k.
    measured = {}
    for shape, (n, k, fusion) in shapes.items():
        if shape == "lm_head":
            continue
        key = f"linear {n // 2 if fusion == 'silu_mul' else n}x{k}"
        for m in SPLIT_MS:
            shape_cases = [Case(shape, n, k, fusion, m, mode, device, dtype) for mode in (None, "int4")]
            timed = []
            for splits in SPLIT_COUNTS:
                with tuning.override("gemv", **{**chosen, "split_k": {key: {str(m): splits}}}):
                    timed.append((_total(shape_cases, "triton", repeats), splits))
            rows.append(dict(kind="split_k", matrix=key, m=m, totals={s: t for t, s in timed}))
            t, splits = min(timed)
            if t == float("inf"):
                raise RuntimeError(f"no split count for {key} at M={m} matched the reference")
            measured.setdefault(key, {})[str(m)] = splits
            print(f"   split_k {key} M={m:<3} {splits} ({t * 1e6:.1f} us)")
    chosen["split_k"] = measured
    faces = _faces(device)
    if "cuda" in faces:
        best("cuda_row_warps", CUDA_ROW_WARPS, 1, face="cuda")
    if len(faces) > 1:  # which face is faster at decode sizes (summed over M = 1 and 16)
        speed = {}
        for face in faces:
            with tuning.override("gemv", **chosen):
                speed[face] = sum(_total(cases(m), face, repeats) for m in (1, 16))
        chosen["faces"] = sorted(faces, key=speed.get)
        rows.append(dict(kind="faces", totals=speed))
    # cuBLAS crossover for 16-bit weights: the largest M at which the GEMV still wins.
    max_m = 0
    for m in (1, 2, 4, 8, *CROSSOVER_MS):
        bf16 = cases(m, (None,))
        with tuning.override("gemv", **{**chosen, "max_m": m}):
            ours = _total(bf16, chosen.get("faces", faces)[0] if m <= gemv.CUDA_MAX_M else "triton", repeats)
        theirs = sum(median_seconds(c.cublas_unfused(), repeats) for c in bf16)
        rows.append(dict(kind="crossover", m=m, ours_s=ours, cublas_s=theirs))
        print(f" crossover M={m:<3} ours {ours * 1e6:9.1f} us  cuBLAS {theirs * 1e6:9.1f} us")
        if ours <= theirs:
            max_m = m
        else:
            break
    chosen["max_m"] = max_m
    return rows, chosen


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None)
    parser.add_argument("--write-tuning", action="store_true")
    parser.add_argument("--quick", action="store_true", help="small shapes and M = 1, 4 (runs on a CPU)")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.quick:
        parser.error("the full table needs a GPU; use --quick on a CPU")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shapes = SHAPES_QUICK if args.quick else SHAPES_7B
    ms = (1, 4) if args.quick else (1, 2, 4, 8, 16)
    repeats = 3 if device.type != "cuda" else (10 if args.quick else 30)
    out = {}
    if args.write_tuning:
        rows, values = sweep(shapes, device, dtype, repeats)
        gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        path = tuning.write_gpu_entry("gemv", gpu, values)
        print(f"# recorded for {gpu!r} in {path}: {values}")
        out["sweep"] = rows
        out["tuning"] = values
    out["rows"] = table(shapes, ms, MODES, device, dtype, repeats, copy_bandwidth(device))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2, default=str)
    bad = [r for r in out["rows"] if r["rel_error"] > _TOLERANCE[dtype]]
    if bad:
        print(f"# {len(bad)} rows off the reference: {[(r['matrix'], r['m'], r['weights'], r['face']) for r in bad]}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Attention kernels against torch's SDPA (and flash-attn when importable), in the same run.

Prefill: causal, d = 128, 32 heads, one sequence of S = 512..8192 tokens (the engine's kernel
over paged K/V, as the backbone runs it, and over packed K/V; contiguous for the peers): TFLOP/s = 4 * S^2 * H * D / 2 / time.
Decode: B = 1..64, context 512..16384, 32 q heads / 32 kv heads, d = 128, block 16: achieved
TB/s = K/V bytes read / time; the peer is SDPA over the same K/V stored contiguously.

With --write-tuning it also times the prefill tile candidates (PREFILL_TILES) at S = 4096 over
paged K/V and over packed K/V with and without TMA, and records for this GPU in
anygpt_engine/tuning/attention.json the fastest packed tile and TMA choice (the engine's fresh
prompts run packed) and the faster decode face per measured shape.

    python benchmarks/bench_attention.py [--json PATH] [--quick] [--write-tuning]
"""

import argparse
import json

import torch
import torch.nn.functional as F

from anygpt_engine import tuning
from anygpt_engine.bench import git_sha, median_seconds
from anygpt_engine.ops import attention as A

# (block_m, block_n, warps, stages) for 16-bit prefill: each compiles for sm_90a with Triton 3.6
# without register spills and uses wgmma (benchmarks/RESULTS.md); timing picks among them.
PREFILL_TILES = [(128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3)]


def _time(fn):
    return median_seconds(fn, repeats=20)


def _paged_copy(k, block_size):
    """[S, H, D] -> cache [S / block, block, H, D] with a shuffled block table."""
    s = k.shape[0]
    blocks = -(-s // block_size)
    order = torch.randperm(blocks, device=k.device)
    cache = torch.empty(blocks, block_size, *k.shape[1:], dtype=k.dtype, device=k.device)
    padded = torch.zeros(blocks * block_size, *k.shape[1:], dtype=k.dtype, device=k.device)
    padded[:s] = k
    cache[order] = padded.view(blocks, block_size, *k.shape[1:])
    return cache, order


def _prefill_inputs(s, dtype, heads=32, dim=128):
    """q, k, v [s, heads, dim] and the same K/V in a shuffled block-16 cache (table, lengths)."""
    q, k, v = (torch.randn(s, heads, dim, device="cuda", dtype=dtype) for _ in range(3))
    k_cache, order = _paged_copy(k, 16)
    v_cache = torch.empty_like(k_cache)
    v_cache[order] = torch.cat([v, v.new_zeros(k_cache.shape[0] * 16 - s, heads, dim)]).view_as(k_cache)
    table, lens, cu = order.view(1, -1), torch.tensor([s], device="cuda"), torch.tensor([0, s], device="cuda")
    return q, k, v, k_cache, v_cache, table, lens, cu


def _prefill_flops(s, heads=32, dim=128):
    return 4 * s * s * heads * dim / 2  # causal: half the square


def bench_prefill(rows, quick, dtype):
    try:
        from flash_attn import flash_attn_func
    except ImportError:
        flash_attn_func = None
    for s in ([512, 1024] if quick else [512, 1024, 2048, 4096, 8192]):
        q, k, v, k_cache, v_cache, table, lens, cu = _prefill_inputs(s, dtype)
        flops = _prefill_flops(s)
        times = {
            "engine_triton": _time(lambda: A.varlen_attention(q, k_cache, v_cache, cu, s, kv_lens=lens,
                                                                block_tables=table, backend="triton")),
            "engine_triton_packed": _time(lambda: A.varlen_attention(q, k, v, cu, s, cu_seqlens_k=cu,
                                                                       backend="triton")),
            "sdpa": _time(lambda: F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                                                 v.transpose(0, 1)[None], is_causal=True)),
        }
        if flash_attn_func is not None:
            times["flash_attn"] = _time(lambda: flash_attn_func(q[None], k[None], v[None], causal=True))
        for name, t in times.items():
            rows.append(dict(kind="prefill", impl=name, seq=s, median_ms=t * 1e3, tflops=flops / t / 1e12,
                             vs_sdpa=times["sdpa"] / t))


def sweep_prefill_tiles(rows, dtype, s=4096):
    """Times the prefill kernel with every PREFILL_TILES candidate (S = s, causal): over paged
    K/V (the cached-prefix path), and over packed K/V with pointer loads and with TMA."""
    q, k, v, k_cache, v_cache, table, lens, cu = _prefill_inputs(s, dtype)
    expected = A.varlen_attention(q, k_cache, v_cache, cu, s, kv_lens=lens, block_tables=table, backend="triton")
    paths = {
        "paged": lambda: A.varlen_attention(q, k_cache, v_cache, cu, s, kv_lens=lens, block_tables=table,
                                            backend="triton"),
        "packed": lambda: A.varlen_attention(q, k, v, cu, s, cu_seqlens_k=cu, backend="triton"),
    }
    for block_m, block_n, warps, stages in PREFILL_TILES:
        for path, tma in (("paged", False), ("packed", False), ("packed", True)):
            with tuning.override("attention", prefill_block_m=block_m, prefill_block_n=block_n, prefill_warps=warps,
                                 prefill_stages=stages, prefill_tma=tma):
                name = f"{path}{'_tma' if tma else ''}_{block_m}x{block_n}_w{warps}_s{stages}"
                try:
                    got, want = paths[path]().float(), expected.float()
                    err = ((got - want).abs() / (want.abs() + 1.0)).max().item()  # bf16-relative
                    t = _time(paths[path])
                except Exception as exc:  # a tile this GPU cannot launch (shared memory): skip it
                    print(f"prefill {name}: {type(exc).__name__}: {exc}")
                    continue
            rows.append(dict(kind="prefill_tile", impl=name, seq=s, median_ms=t * 1e3,
                             tflops=_prefill_flops(s) / t / 1e12, vs_sdpa=float("nan"), path=path, tma=tma,
                             tile=[block_m, block_n, warps, stages], rel_diff_vs_default=err))


def bench_decode(rows, quick, dtype):
    heads, dim, block = 32, 128, 16
    batches = [1, 32] if quick else [1, 4, 16, 32, 64]
    contexts = [512, 4096] if quick else [512, 2048, 4096, 16384]
    for b in batches:
        for ctx in contexts:
            if b * ctx * heads * dim * 2 * 2 > 24 * 2**30:
                continue
            k = torch.randn(b, ctx, heads, dim, device="cuda", dtype=dtype)
            v = torch.randn_like(k)
            q = torch.randn(b, heads, dim, device="cuda", dtype=dtype)
            blocks = ctx // block
            order = torch.randperm(b * blocks, device="cuda")
            k_cache = torch.empty(b * blocks, block, heads, dim, device="cuda", dtype=dtype)
            v_cache = torch.empty_like(k_cache)
            k_cache[order] = k.reshape(b * blocks, block, heads, dim)
            v_cache[order] = v.reshape(b * blocks, block, heads, dim)
            table = order.view(b, blocks)
            lens = torch.full((b,), ctx, device="cuda")
            moved = 2 * k.numel() * k.element_size()
            kt, vt, qt = k.transpose(1, 2), v.transpose(1, 2), q.unsqueeze(2)
            times = {"sdpa_contiguous": _time(lambda: F.scaled_dot_product_attention(qt, kt, vt))}
            for face in ("cuda", "triton"):
                try:
                    times[f"engine_{face}"] = _time(
                        lambda: A.paged_decode_attention(q, k_cache, v_cache, table, lens, backend=face))
                except (RuntimeError, ValueError) as err:
                    print(f"decode {face} B={b} ctx={ctx}: {err}")
            for name, t in times.items():
                rows.append(dict(kind="decode", impl=name, batch=b, context=ctx, median_ms=t * 1e3,
                                 tb_s=moved / t / 1e12, vs_sdpa=times["sdpa_contiguous"] / t))
            k = v = k_cache = v_cache = None  # free this shape before the next


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", default=None)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--write-tuning", action="store_true",
                        help="sweep prefill tiles; record the fastest tile and the faster decode face per "
                             "measured shape for this GPU in anygpt_engine/tuning/attention.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_attention: needs a CUDA GPU (the CPU path is the torch reference)")
        return
    dtype = torch.bfloat16
    rows = []
    bench_prefill(rows, args.quick, dtype)
    if args.write_tuning:
        sweep_prefill_tiles(rows, dtype)
    bench_decode(rows, args.quick, dtype)
    meta = dict(gpu=torch.cuda.get_device_name(), git_sha=git_sha(), dtype="bfloat16")
    print(f"# attention  {meta}")
    for r in rows:
        prefill = r["kind"].startswith("prefill")
        shape = f"S={r['seq']}" if prefill else f"B={r['batch']} ctx={r['context']}"
        rate = f"{r['tflops']:.0f} TFLOP/s" if prefill else f"{r['tb_s']:.2f} TB/s"
        print(f"{r['kind']:>8} {shape:>18} {r['impl']:>16} {r['median_ms']:9.3f} ms {rate:>14} "
              f"{r['vs_sdpa']:6.2f}x sdpa")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{**meta, **r} for r in rows], f, indent=2)
    if args.write_tuning:
        write_tuning(rows, meta["gpu"])


def write_tuning(rows, gpu_name):
    """For this GPU: the fastest prefill tile and TMA choice over packed K/V (the engine's fresh
    prompts; the tile also serves cached prefixes over the paged cache), and per measured
    (batch, context) the faster engine decode face, as rules the dispatch reads in order
    (smallest shapes first)."""
    values = {}
    # A tile whose output strays from the default tile's beyond a few bf16 ulps is wrong, not fast.
    packed = [r for r in rows if r["kind"] == "prefill_tile" and r["path"] == "packed"
              and r["rel_diff_vs_default"] < 2e-2]
    if packed:
        best = min(packed, key=lambda r: r["median_ms"])
        values.update(zip(("prefill_block_m", "prefill_block_n", "prefill_warps", "prefill_stages"), best["tile"]))
        values["prefill_tma"] = best["tma"]
    best = {}
    for r in rows:
        if r["kind"] == "decode" and r["impl"].startswith("engine_"):
            key = (r["batch"], r["context"])
            if key not in best or r["median_ms"] < best[key][1]:
                best[key] = (r["impl"].removeprefix("engine_"), r["median_ms"])
    values["decode_rules"] = [[b, ctx, face] for (b, ctx), (face, _) in sorted(best.items())]
    path = tuning.write_gpu_entry("attention", gpu_name, values)
    print(f"wrote {values} for {gpu_name} to {path}")


if __name__ == "__main__":
    main()

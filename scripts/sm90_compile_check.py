"""Compiles every Triton kernel for sm_90a (H100/H200) at the shipped tuning, on any machine:
no GPU is needed (Triton's bundled ptxas builds it and, with -v, reports the resources).
For each launch configuration the engine uses on a GPU it reports registers per thread, local
memory per thread (register spills), shared memory, and whether the dots run on wgmma.

The interpreter runs the kernels' semantics on a CPU but never their GPU compilation; this is the
CPU-side guard for that (tests/test_sm90_compile.py runs it in CI). Shapes are AnyGPT's: the 7B
backbone (hidden 4096, 32 heads of 128), its 53,516-token vocabulary, SoundStorm (1024 wide,
16 heads of 64), the codecs' codebooks; tile sizes come from anygpt_engine/tuning/*.json for
`--gpu`. Integer arguments that are multiples of 16 at those shapes are marked so, as Triton's
launcher specializes them at run time.

    python scripts/sm90_compile_check.py [--gpu "NVIDIA H100 80GB HBM3"] [--only varlen rvq ...] [--json PATH]

Exits non-zero when a kernel fails to compile, spills, exceeds the H100's shared memory, has
large 16-bit dots off wgmma, or has no case here. Run it without TRITON_INTERPRET (under the
interpreter the kernels are not compilable objects).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from anygpt_engine import tuning
from anygpt_engine.kernels import attention, gemv, lm_head, maskgit, rms_norm, rvq, sampling, soundstorm

MODULES = (attention, gemv, lm_head, maskgit, rms_norm, rvq, sampling, soundstorm)
H100_SHARED_BYTES = 227 * 1024


@dataclasses.dataclass
class Case:
    name: str
    fn: object  # a @triton.jit function
    types: dict  # runtime argument -> Triton type ("*bf16", "i32", "fp32")
    constexprs: dict
    num_warps: int
    num_stages: int = 3
    divisible: tuple = ()  # integer arguments that are multiples of 16 at the checked shapes
    dots: bool = False  # tl.dot on 16-bit tiles of 64+ rows: expected on wgmma


@dataclasses.dataclass
class Report:
    name: str
    registers: int = -1
    stack_bytes: int = -1  # stack frame per thread (spills, local arrays, call frames)
    spill_bytes: int = -1  # register spill stores per thread
    shared_bytes: int = -1
    wgmma: int = 0  # wgmma.mma_async instructions (Hopper tensor cores)
    mma_sync: int = 0  # mma.sync instructions (Ampere-style tensor cores: small-M dots)
    error: str = ""


def cases(gpu: str) -> list[Case]:
    p = {op: tuning.params_for(op, gpu) for op in ("attention", "gemv", "lm_head", "rms_norm", "sampling", "maskgit",
                                                    "rvq", "soundstorm")}
    out = gemv_cases(p["gemv"])
    a = p["attention"]
    for dt in ("bf16", "fp16", "fp32"):
        tile = "prefill_fp32_" if dt == "fp32" else "prefill_"
        shapes = [(True, True, False, 128, False), (False, False, True, 64, False), (False, True, False, 128, False)]
        if dt != "fp32":  # the op reads float32 K/V with pointers
            shapes += [(False, True, False, 128, True), (False, False, True, 64, True)]
        for paged, causal, padded, dim, tma in shapes:
            kv = f"tensordesc<{dt}[{a[tile + 'block_n']}, {dim}]>" if tma else f"*{dt}"
            out.append(Case(
                f"varlen_attention {dt} d{dim} {'paged' if paged else 'packed'} causal={causal}{' tma' if tma else ''}",
                attention._varlen_attention_kernel,
                dict(out_ptr=f"*{dt}", q_ptr=f"*{dt}", k_ptr=kv, v_ptr=kv, cu_q_ptr="*i64",
                     kv_len_ptr="*i64", cu_k_ptr="*i64", block_tables_ptr="*i64", q_stride="i32", out_stride="i32",
                     kv_token_stride="i32", bt_stride="i32", bt_width="i32", num_q_heads="i32", num_kv_heads="i32",
                     scale="fp32", num_tiles="i32"),
                dict(HEAD_DIM=dim, BLOCK_M=a[tile + "block_m"], BLOCK_N=a[tile + "block_n"], CAUSAL=causal,
                     PAGED=paged, PAGE=16 if paged else 1, PADDED_KEYS=padded, TMA=tma,
                     DOT_PRECISION="ieee" if dt == "fp32" else "tf32"),
                a[tile + "warps"], a[tile + "stages"], ("q_stride", "out_stride", "kv_token_stride"),
                dots=dt != "fp32"))
    for dt in ("bf16", "fp32"):
        for q_heads, kv_heads in ((32, 32), (32, 8)):
            group = q_heads // kv_heads
            out.append(Case(
                f"paged_decode {dt} group={group}", attention._paged_decode_kernel,
                dict(part_out_ptr="*fp32", part_lse_ptr="*fp32", q_ptr=f"*{dt}", k_cache_ptr=f"*{dt}",
                     v_cache_ptr=f"*{dt}", block_tables_ptr="*i64", seq_lens_ptr="*i64", q_stride="i32",
                     bt_stride="i32", bt_width="i32", num_kv_heads="i32", num_splits="i32", scale="fp32"),
                dict(HEAD_DIM=128, GROUP=group, GROUP_PAD=group, PAGE=16), a["triton_decode_warps"],
                divisible=("q_stride",)))
        out.append(Case(f"merge_splits {dt}", attention._merge_splits_kernel,
                        dict(out_ptr=f"*{dt}", part_out_ptr="*fp32", part_lse_ptr="*fp32", num_splits="i32"),
                        dict(HEAD_DIM=128, SPLITS=a["decode_max_splits"]), a["triton_decode_warps"]))
        out.append(Case(
            f"rope_kv_append {dt}", attention._rope_kv_append_kernel,
            dict(q_ptr=f"*{dt}", k_ptr=f"*{dt}", v_ptr=f"*{dt}", positions_ptr="*i64", slot_ptr="*i64",
                 k_cache_ptr=f"*{dt}", v_cache_ptr=f"*{dt}", inv_freq_ptr="*fp32", q_stride="i32", k_stride="i32",
                 v_stride="i32", num_q_heads="i32", num_kv_heads="i32", num_slots="i32"),
            dict(HEAD_DIM=128, HALF=64, Q_HEADS=32, KV_HEADS=32), a["rope_warps"],
            divisible=("q_stride", "k_stride", "v_stride")))
        h = p["lm_head"]
        for block_b in (16, 32):
            out.append(Case(
                f"lm_head {dt} BLOCK_B={block_b}", lm_head._lm_head_kernel,
                dict(out_ptr="*fp32", x_ptr=f"*{dt}", norm_ptr=f"*{dt}", weight_ptr=f"*{dt}", rows_ptr="*i64",
                     batch="i32", hidden="i32", vocab="i32", x_stride="i32", eps="fp32"),
                dict(BLOCK_B=block_b, BLOCK_V=h["block_v"], BLOCK_K=h["fp32_block_k" if dt == "fp32" else "block_k"],
                     DOT_PRECISION="ieee" if dt == "fp32" else "tf32"),
                h["num_warps"], h["num_stages"], ("hidden", "x_stride")))
        for residual in (True, False):
            out.append(Case(
                f"rms_norm {dt} residual={residual}", rms_norm._rms_norm_kernel,
                dict(out_ptr=f"*{dt}", residual_ptr=f"*{dt}", x_ptr=f"*{dt}", weight_ptr=f"*{dt}", hidden="i32",
                     x_row_stride="i32", eps="fp32"),
                dict(HAS_RESIDUAL=residual, BLOCK=4096), p["rms_norm"]["triton_num_warps"],
                divisible=("hidden", "x_row_stride")))
    s = p["sampling"]
    for random in (True, False):
        out.append(Case(
            f"sample random={random}", sampling._sample_kernel,
            dict(logits_ptr="*fp32", logits_stride="i32", slots_ptr="*i64", out_ptr="*i64", scratch_ptr="*fp32",
                 temperature_ptr="*fp32", top_k_ptr="*i64", top_p_ptr="*fp32", penalty_ptr="*fp32",
                 min_new_ptr="*i64", seeds_ptr="*i64", generated_ptr="*i64", open_ptr="*i64", stop_ptr="*u8",
                 seen_ptr="*u8", allowed_ptr="*u8", opens_ptr="*i64", closes_ptr="*i64", warped_ptr="*fp32",
                 noise_ptr="*fp32", num_slots="i32", num_states="i32", V="i32"),
            dict(RANDOM=random, TOP_K=random, TOP_P=random, PENALTY=random, BLOCK=s["triton_block"],
                 RADIX_BITS=s["triton_radix_bits"], DEBUG=False), s["triton_num_warps"]))
    g = p["maskgit"]
    for dt, key_bits in (("fp32", 32), ("bf16", 16)):
        out.append(Case(
            f"maskgit_step {dt}", maskgit._maskgit_step_kernel,
            dict(logits_ptr=f"*{dt}", codes_ptr="*i64", open_ptr="*i1", lengths_ptr="*i64", prompt_ptr="*i64",
                 counts_ptr="*i64", seeds_ptr="*i64", uniform_ptr="*fp32", conf_ptr="*fp32", done_ptr="*i32",
                 positions="i32", V="i32", Q="i32", keep="i32", level="i32", counter="i32", divisor="fp32"),
            dict(GREEDY=False, HAS_UNIFORM=False, KEY_BITS=key_bits, ROWS=g["triton_rows"], BLOCK_V=1024,
                 SELECT_BLOCK=g["triton_select_block"]), g["triton_num_warps"]))
    r = p["rvq"]
    for precision, dtype, tma in (("bf16", "bf16", False), ("bf16", "bf16", True), ("tf32", "fp32", False),
                                  ("fp32", "fp32", False)):
        block_n = r["triton_block_n" if precision == "bf16" else "triton_fp32_block_n"]
        low = f"tensordesc<{dtype}[{block_n}, {r['triton_block_k']}]>" if tma else f"*{dtype}"
        out.append(Case(
            f"rvq_encode {precision}{' tma' if tma else ''}", rvq._rvq_encode_kernel,
            dict(x_ptr="*fp32", x_row_stride="i32", cb_ptr="*fp32", low=low, norms_ptr="*fp32",
                 emax_ptr="*fp32", demax_ptr="*fp32", codes_ptr="*i64", res_ptr="*fp32", rlow_ptr=f"*{dtype}",
                 q_ptr="*fp32", N="i32", D="i32", K="i32", L="i32"),
            dict(PRECISION=precision, DOT_IN_FP32=False, HAS_Q=True, B_TMA=tma, BM=r["triton_block_m"], BN=block_n,
                 BK=r["triton_block_k"], C=r["triton_candidates"], SCAN=64),
            r["triton_num_warps"], r["triton_num_stages"], ("D", "K", "x_row_stride"), dots=precision == "bf16"))
    for levels in (8, 1):
        block_d = r["decode_block_d"]
        out.append(Case(f"rvq_decode levels={levels}", rvq._rvq_decode_kernel,
                        dict(out_ptr="*fp32", codes_ptr="*i64", cb_ptr="*fp32", N="i32", D="i32", K="i32",
                             FIRST="i32"),
                        dict(LEVELS=levels, BM=max(1, 4096 // block_d), BD=block_d), 4, divisible=("D", "K")))
    ss = p["soundstorm"]
    out.append(Case("code_embedding", soundstorm._code_embedding_kernel,
                    dict(out_ptr="*bf16", codes_ptr="*i64", semantic_ptr="*i64", code_embed_ptr="*bf16",
                         semantic_embed_ptr="*bf16", rows="i32", dim="i32", codes_per_level="i32",
                         semantic_rows="i32"),
                    dict(Q=7, ROWS=ss["embed_rows"], BLOCK_D=1024), ss["embed_warps"], divisible=("dim",)))
    out.append(Case("add_layer_norm", soundstorm._add_layer_norm_kernel,
                    dict(residual_ptr="*bf16", y_ptr="*bf16", out_ptr="*bf16", post_w_ptr="*fp32", post_b_ptr="*fp32",
                         norm_w_ptr="*fp32", norm_b_ptr="*fp32", rows="i32", dim="i32", alpha="fp32", eps="fp32"),
                    dict(HAS_Y=True, HAS_POST=True, HAS_NORM=True, WRITE_RESIDUAL=True, ROWS=ss["norm_rows"],
                         BLOCK=1024), ss["norm_warps"], divisible=("dim",)))
    out.append(Case("glu", soundstorm._glu_kernel,
                    dict(g_ptr="*bf16", u_ptr="*bf16", lengths_ptr="*i64", rows="i32", frames="i32", channels="i32"),
                    dict(ROWS=ss["glu_rows"], BLOCK_C=2048), ss["glu_warps"], divisible=("channels",)))
    out.append(Case("dwconv_norm", soundstorm._dwconv_norm_kernel,
                    dict(out_ptr="*bf16", g_ptr="*bf16", weight_ptr="*fp32", w_stride_c="i32", w_stride_k="i32",
                         bias_ptr="*fp32", gamma_ptr="*fp32", lengths_ptr="*i64", frames="i32", channels="i32",
                         eps="fp32"),
                    dict(K=31, PAD_LEFT=15, BLOCK_T=ss["conv_block_t"], BLOCK_C=2048), ss["conv_warps"],
                    divisible=("channels",)))
    for dt in ("bf16", "fp32"):
        out.append(Case(f"grouped_linear {dt}", soundstorm._grouped_linear_kernel,
                        dict(out_ptr="*fp32", x_ptr=f"*{dt}", w_ptr=f"*{dt}", b_ptr="*fp32", M="i32", D="i32",
                             V="i32", x_stride_m="i32", x_stride_q="i32", out_stride_m="i32", out_stride_q="i32"),
                        dict(IEEE=dt == "fp32", BLOCK_M=ss["gemm_block_m"], BLOCK_N=ss["gemm_block_n"],
                             BLOCK_K=ss["gemm_fp32_block_k" if dt == "fp32" else "gemm_block_k"]),
                        ss["gemm_warps"], ss["gemm_stages"],
                        ("D", "V", "x_stride_m", "x_stride_q", "out_stride_m", "out_stride_q"), dots=dt == "bf16"))
    return out


def gemv_cases(g: dict) -> list[Case]:
    """The decode GEMV (ops.linear) for each weight format on each inner product the tuning picks
    by M (FMA for M=1 and 2, the padded dot up to max_m, the tiled GEMM for quantized prefill),
    mostly with the heaviest fusions (RMSNorm prologue + SiLU*up: two accumulations per program),
    and the fused qkv + RoPE + KV append; with and without split-K; 7B shapes."""
    from anygpt_engine.ops.gemv import _blocks

    weights = {"bf16": (gemv.FLOAT, "*bf16", "*bf16", "*bf16"), "int8": (gemv.INT8, "*i8", "*fp32", "*u8"),
               "fp8": (gemv.FP8, "*fp8e4nv", "*fp32", "*u8"), "int4": (gemv.INT4, "*u8", "*fp16", "*u8")}
    out = []

    def launch(m, fmt, dt="bf16"):
        b = _blocks(g, m, None if fmt == "bf16" else fmt)
        constexprs = dict(DOT=b["dot"], DOT_IN_FP32=False, DOT_PRECISION="ieee" if dt == "fp32" else "tf32",
                          BLOCK_M=b["block_m"], BLOCK_N=b["block_n"], BLOCK_K=b["block_k"], GROUP=128)
        return b, constexprs

    split_types = dict(ws_ptr="*fp32", counter_ptr="*i32", splits="i32")
    # (M, label, epilogue, split-K): the FMA path at M=1 and 2, the padded dot at M=16, the GEMM
    # above max_m; split-K (the in-launch reduction) on the decode paths of bf16 and int4
    shapes = [(1, "m1", gemv.SILU_MUL, False), (2, "m2", gemv.RESIDUAL, False), (16, "m16", gemv.SILU_MUL, False),
              (g["max_m"] + 1, "gemm", gemv.SILU_MUL, False), (1, "m1", gemv.SILU_MUL, True),
              (2, "m2", gemv.RESIDUAL, True), (16, "m16", gemv.SILU_MUL, True)]
    for fmt, (code, w_type, s_type, z_type) in weights.items():
        for m, label, epilogue, split in shapes:
            if label == "gemm" and fmt == "bf16":
                continue  # 16-bit weights take cuBLAS above the crossover
            if split and fmt not in ("bf16", "int4"):
                continue
            norm = epilogue == gemv.SILU_MUL
            b, constexprs = launch(m, fmt)
            out.append(Case(
                f"gemv {fmt} {label} {'silu_mul+norm' if epilogue == gemv.SILU_MUL else 'residual'}"
                f"{' split-K' if split else ''}",
                gemv._gemv_kernel,
                dict(out_ptr="*bf16", x_ptr="*bf16", w_ptr=w_type, scale_ptr=s_type, zero_ptr=z_type,
                     norm_ptr="*bf16", M="i32", N_OUT="i32", K="i32", x_stride="i32", out_stride="i32",
                     eps="fp32", **split_types),
                dict(WEIGHT=code, NORM=norm, EPILOGUE=epilogue, SPLIT=split, **constexprs), b["num_warps"],
                b["num_stages"], ("N_OUT", "K"), dots=label == "gemm"))
        for m, label, split in ((1, "m1", False), (16, "m16", False), (1, "m1", True)) if fmt in ("bf16", "int4") \
                else ():
            b, constexprs = launch(m, fmt)
            constexprs["BLOCK_N"] = min(g["rope_block_n"], 64)
            out.append(Case(
                f"qkv_rope {fmt} {label}{' split-K' if split else ''}", gemv._qkv_rope_kernel,
                dict(q_ptr="*bf16", k_cache_ptr="*bf16", v_cache_ptr="*bf16", x_ptr="*bf16", w_ptr=w_type,
                     scale_ptr=s_type, zero_ptr=z_type, norm_ptr="*bf16", positions_ptr="*i64", slots_ptr="*i64",
                     inv_freq_ptr="*fp32", M="i32", K="i32", x_stride="i32", num_slots="i32", eps="fp32",
                     **split_types),
                dict(Q_HEADS=32, KV_HEADS=32, HEAD_DIM=128, WEIGHT=code, NORM=True, SPLIT=split, **constexprs),
                b["num_warps"], b["num_stages"], ("K",)))
    for m, label in ((1, "m1"),):  # float32 engines on a GPU
        b, constexprs = launch(m, "bf16", "fp32")
        out.append(Case(
            f"gemv fp32 {label} silu_mul+norm", gemv._gemv_kernel,
            dict(out_ptr="*fp32", x_ptr="*fp32", w_ptr="*fp32", scale_ptr="*fp32", zero_ptr="*fp32", norm_ptr="*fp32",
                 M="i32", N_OUT="i32", K="i32", x_stride="i32", out_stride="i32", eps="fp32", **split_types),
            dict(WEIGHT=gemv.FLOAT, NORM=True, EPILOGUE=gemv.SILU_MUL, SPLIT=False, **constexprs), b["num_warps"],
            b["num_stages"], ("N_OUT", "K")))
    return out


_TOOLS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
# Triton bundles more than one ptxas (newer PTX needs the newer one); the first that accepts
# the PTX reports on it.
_PTXAS = [os.path.join(_TOOLS, name) for name in ("ptxas-blackwell", "ptxas") if os.path.exists(os.path.join(_TOOLS, name))]


def _ptxas_report(ptx: str) -> str:
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        for ptxas in _PTXAS:
            run = subprocess.run([ptxas, "-v", "-arch=sm_90a", f.name, "-o", os.devnull], capture_output=True, text=True)
            if run.returncode == 0:
                return run.stderr
    return ""


def compile_case(case: Case) -> Report:
    names = case.fn.arg_names
    signature = {a: "constexpr" if a in case.constexprs else case.types[a] for a in names}
    missing = [a for a in names if signature[a] != "constexpr" and a not in case.types]
    if missing:
        return Report(case.name, error=f"no type for arguments {missing}")
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in names
             if a not in case.constexprs and (case.types[a].startswith("*") or a in case.divisible)}
    try:
        kernel = triton.compile(ASTSource(fn=case.fn, signature=signature, constexprs=case.constexprs, attrs=attrs),
                                target=GPUTarget("cuda", 90, 32),
                                options=dict(num_warps=case.num_warps, num_stages=case.num_stages))
    except Exception as exc:  # the compiler's own error, reported per case
        return Report(case.name, error=f"{type(exc).__name__}: {str(exc)[-400:]}")
    ptx = kernel.asm["ptx"]
    info = _ptxas_report(ptx)
    registers = re.search(r"Used (\d+) registers", info)
    frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores", info)
    if registers is None or frame is None:
        return Report(case.name, error=f"no ptxas report (tried {_PTXAS}): {info[-300:]!r}")
    return Report(case.name, registers=int(registers.group(1)), stack_bytes=int(frame.group(1)),
                  spill_bytes=int(frame.group(2)), shared_bytes=kernel.metadata.shared,
                  wgmma=len(re.findall(r"wgmma\.mma_async", ptx)), mma_sync=len(re.findall(r"mma\.sync", ptx)))


def problems(case: Case, report: Report) -> list[str]:
    if report.error:
        return [report.error]
    found = []
    if report.spill_bytes:
        found.append(f"spills {report.spill_bytes} B per thread")
    if report.shared_bytes > H100_SHARED_BYTES:
        found.append(f"needs {report.shared_bytes} B of shared memory")
    if case.dots and not report.wgmma:
        found.append("its dots are not on wgmma")
    return found


def uncovered_kernels(all_cases: list[Case]) -> list[str]:
    """Kernels (@triton.jit functions named *_kernel) that no case compiles."""
    covered = {case.fn.fn.__qualname__ for case in all_cases}
    return sorted(name for module in MODULES for name, obj in vars(module).items()
                  if isinstance(obj, triton.runtime.jit.JITFunction) and name.endswith("_kernel")
                  and name not in covered)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", default="NVIDIA H100 80GB HBM3", help="device name the tuning tables are read for")
    parser.add_argument("--only", nargs="+", help="cases whose name starts with one of these")
    parser.add_argument("--json", help="also write the reports here")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
    all_cases = cases(args.gpu)
    failed = 0
    reports = []
    print(f"# sm_90a compile check, Triton {triton.__version__}, tuning for {args.gpu!r}")
    print(f"{'kernel':48} {'regs':>5} {'spill B':>8} {'stack B':>8} {'smem KiB':>9} {'wgmma':>6} {'mma.sync':>8}")
    for case in all_cases:
        if args.only and not any(case.name.startswith(o) for o in args.only):
            continue
        report = compile_case(case)
        reports.append(dict(dataclasses.asdict(report), problems=problems(case, report)))
        if report.error:
            print(f"{case.name:48} FAILED {report.error}")
        else:
            print(f"{case.name:48} {report.registers:5d} {report.spill_bytes:8d} {report.stack_bytes:8d} "
                  f"{report.shared_bytes / 1024:9.1f} "
                  f"{report.wgmma:6d} {report.mma_sync:8d}")
        if reports[-1]["problems"]:
            failed += 1
            print(f"  PROBLEM: {'; '.join(reports[-1]['problems'])}")
    missing = [] if args.only else uncovered_kernels(all_cases)
    if missing:
        print(f"PROBLEM: no case compiles {missing}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(triton=triton.__version__, gpu=args.gpu, reports=reports, uncovered=missing), f, indent=1)
    return 1 if failed or missing else 0


if __name__ == "__main__":
    sys.exit(main())

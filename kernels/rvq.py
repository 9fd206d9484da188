"""Residual vector quantization as Triton kernels: all levels of a block of rows in one program.

Encode, per program of BLOCK_M rows, for every level:
  1. candidate search: approximate distances A = ||E_j||^2 - 2 r.E_j, BLOCK_N codewords at a time
     (tl.dot in fp32, tf32 or bf16); values above the running row minimum plus the margin are
     dropped at once (they can never be candidates), the rest folded into an unsorted buffer of
     the C smallest per row; every such value leaving or never entering the buffer lowers
     `drop_min`;
  2. exact rescoring of the buffered candidates within the margin (ops.rvq.margin) of the row's
     minimum, in float64 and the contract's fixed lane/butterfly order; a row with
     drop_min <= threshold may have more candidates than the buffer held, and is rescored
     against all K codewords instead (slow, rare, always right);
  3. residual update r -= E[code] in float32, its tf32/bf16 copy for the next level's dot, and the
     running sum of chosen codewords.
The residual stays with its program across levels (written and re-read in L2), and
tl.debug_barrier() orders those global-memory hand-offs between the program's threads.
See anygpt_engine/ops/rvq.py for the contract and the margin derivation.
"""

import triton
import triton.language as tl

from anygpt_engine.kernels.common import round_to

SAFETY = tl.constexpr(1.25)  # keep equal to ops.rvq.SAFETY (a jit function reads only constexpr globals)


@triton.jit
def _round_tf32(x):
    """float32 -> nearest tf32 (ties to even), kept in float32; NaN stays NaN."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0xFFF + ((bits >> 13) & 1)) & 0xFFFFE000
    return tl.where(x != x, x, bits.to(tl.float32, bitcast=True))


@triton.jit
def _store_low(rlow_ptr, offs, r, m, PRECISION: tl.constexpr):
    """Writes r rounded to the search precision; returns the squared rounding error per row."""
    if PRECISION == "bf16":
        low = round_to(r, tl.bfloat16)
        tl.store(rlow_ptr + offs, low, mask=m)
        err = low.to(tl.float32) - r
    else:
        low = _round_tf32(r)
        tl.store(rlow_ptr + offs, low, mask=m)
        err = low - r
    return tl.sum(err * err, axis=1)


@triton.jit
def _lane_sum(acc, M: tl.constexpr):
    """[M, 32] float64 lane sums -> [M], combined as the butterfly t + (t ^ w), w = 16..1.
    Each step sums an axis of size 2: a single, order-free addition."""
    x = tl.sum(tl.reshape(acc, [M, 2, 16]), axis=1)
    x = tl.sum(tl.reshape(x, [M, 2, 8]), axis=1)
    x = tl.sum(tl.reshape(x, [M, 2, 4]), axis=1)
    x = tl.sum(tl.reshape(x, [M, 2, 2]), axis=1)
    return tl.sum(x, axis=1)


@triton.jit
def _margin(r_norm, dr_norm, emax, demax, D):
    """ops.rvq.margin: the candidate margin per row (derivation there)."""
    eps_score = 1.1920928955078125e-07 + D * 2.220446049250313e-16  # 2^-23 + D 2^-52
    span = r_norm + emax
    e_dot = (dr_norm * emax + r_norm * demax + dr_norm * demax
             + D * 1.1920928955078125e-07 * (r_norm + dr_norm) * (emax + demax)
             + 1.1920928955078125e-07 * r_norm * emax)
    return (SAFETY * (4.0 * e_dot + 4.76837158203125e-07 * emax * emax + 2.0 * eps_score * span * span)
            + D * 4.70197740328915e-38 * (1.0 + span))  # 2^-21, 2^-124


@triton.jit
def _exact_scores(res_ptr, cb_ptr, rows64, row_ok, idx, D, M: tl.constexpr):
    """Exact score of codeword idx[m] (a valid index) against residual row rows64[m]."""
    lanes = tl.arange(0, 32)
    acc = tl.zeros([M, 32], tl.float64)
    for d0 in range(0, D, 32):
        cols = d0 + lanes
        m = row_ok[:, None] & (cols[None, :] < D)
        r = tl.load(res_ptr + rows64[:, None] * D + cols[None, :], mask=m, other=0.0)
        e = tl.load(cb_ptr + idx.to(tl.int64)[:, None] * D + cols[None, :], mask=m, other=0.0)
        diff = (r - e).to(tl.float64)  # float32 difference; its square is exact in float64
        acc += diff * diff
    return _lane_sum(acc, M)


@triton.jit
def _scan_all(res_ptr, cb_ptr, row, D, K, SCAN: tl.constexpr):
    """Index of the best of all K codewords for one row by the exact score, ties to the lowest."""
    rows64 = tl.zeros([SCAN], tl.int64) + row
    best_s = tl.full([1], float("inf"), tl.float64)
    best_j = tl.full([1], K, tl.int32)
    for j0 in range(0, K, SCAN):
        js = j0 + tl.arange(0, SCAN)
        j_ok = js < K
        s = tl.where(j_ok, _exact_scores(res_ptr, cb_ptr, rows64, j_ok, tl.where(j_ok, js, 0), D, SCAN),
                     float("inf"))
        chunk_s = tl.min(s, axis=0)
        chunk_j = tl.min(tl.where(j_ok & (s == chunk_s), js, K), axis=0)
        better = chunk_s < best_s  # strict: earlier chunks hold the lower indices
        best_s = tl.where(better, chunk_s, best_s)
        best_j = tl.where(better, chunk_j, best_j)
    return tl.sum(best_j, axis=0)


@triton.jit(do_not_specialize=["N"])  # frames per call vary (streaming chunks): no compile per count
def _rvq_encode_kernel(x_ptr, x_row_stride, cb_ptr, low, norms_ptr, emax_ptr, demax_ptr, codes_ptr, res_ptr,
                       rlow_ptr, q_ptr, N, D, K, L,
                       PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr, HAS_Q: tl.constexpr,
                       B_TMA: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, C: tl.constexpr,
                       SCAN: tl.constexpr):
    # `low` holds the codebooks at the search precision (the float32 codebooks for fp32): a
    # pointer, or with B_TMA a tensor descriptor of them as [L*K, D] in [BN, BK] boxes, so the
    # codeword tiles (the kernel's main memory traffic) arrive by TMA with no per-element
    # addresses in registers. Only read-only data goes through TMA: the residual this kernel
    # writes is read back by ordinary loads (TMA reads would need an async-proxy fence).
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    ks = tl.arange(0, BK)
    ns = tl.arange(0, BN)
    slots = tl.arange(0, C)
    bm_ids = tl.arange(0, BM)
    inf = float("inf")

    # r_0 = float(x). norm2 and err2 (squared rounding error of the low copy) feed the margin.
    norm2 = tl.zeros([BM], tl.float32)
    err2 = tl.zeros([BM], tl.float32)
    for d0 in range(0, D, BK):
        cols = d0 + ks
        m = row_ok[:, None] & (cols[None, :] < D)
        offs = rows64[:, None] * D + cols[None, :]
        xv = tl.load(x_ptr + rows64[:, None] * x_row_stride + cols[None, :], mask=m, other=0.0).to(tl.float32)
        tl.store(res_ptr + offs, xv, mask=m)
        if PRECISION != "fp32":
            err2 += _store_low(rlow_ptr, offs, xv, m, PRECISION)
        norm2 += tl.sum(xv * xv, axis=1)
    tl.debug_barrier()

    for level in range(L):
        cb_l = cb_ptr + level * K * D  # L*K*D < 2^31 (checked by the op)
        vals = tl.full([BM, C], inf, tl.float32)
        idxs = tl.full([BM, C], K, tl.int32)
        drop_min = tl.full([BM], inf, tl.float32)
        marg = _margin(tl.sqrt(norm2), tl.sqrt(err2), tl.load(emax_ptr + level), tl.load(demax_ptr + level), D)
        run_min = tl.full([BM], inf, tl.float32)
        for n0 in range(0, K, BN):
            js = n0 + ns
            j_ok = js < K
            acc = tl.zeros([BM, BN], tl.float32)
            for d0 in range(0, D, BK):
                cols = d0 + ks
                c_ok = cols < D
                a_ptrs = rows64[:, None] * D + cols[None, :]
                a_mask = row_ok[:, None] & c_ok[None, :]
                if B_TMA:
                    # Rows past this level's K are the next level's (masked below via j_ok) or
                    # zero-filled past the end, as are columns past D.
                    b = tl.trans(low.load([level * K + n0, d0]))
                else:
                    b_ptrs = level * K * D + js[None, :] * D + cols[:, None]
                    b = tl.load(low + b_ptrs, mask=j_ok[None, :] & c_ok[:, None], other=0.0)
                if PRECISION == "fp32":
                    a = tl.load(res_ptr + a_ptrs, mask=a_mask, other=0.0)
                    acc = tl.dot(a, b, acc, input_precision="ieee")
                else:
                    a = tl.load(rlow_ptr + a_ptrs, mask=a_mask, other=0.0)
                    if PRECISION == "tf32":
                        # Operands pre-rounded to tf32: the tensor cores' own conversion is exact.
                        acc = tl.dot(a, b, acc, input_precision="tf32")
                    elif DOT_IN_FP32:
                        # The interpreter's bf16 dot is broken; bf16 products are exact in fp32.
                        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
                    else:
                        acc = tl.dot(a, b, acc)
            norms = tl.load(norms_ptr + level * K + js, mask=j_ok, other=inf)
            dist = tl.where(j_ok[None, :], norms[None, :] - 2.0 * acc, inf)
            # The final threshold is the final minimum plus the margin, and the minimum only
            # falls: a value above the running minimum plus the margin can never be a candidate
            # (rounding is monotonic, so this holds in float32 too). Dropping those here leaves
            # the buffer only near-best values, so the insertion rounds below stay few.
            run_min = tl.minimum(run_min, tl.min(dist, axis=1))
            dist = tl.where(dist <= (run_min + marg)[:, None], dist, inf)
            # Only values below a row's current worst kept can enter; that many rounds (at most C)
            # move them in smallest first, each evicting the worst kept into drop_min.
            worst = tl.max(vals, axis=1)
            entering = tl.sum((dist < worst[:, None]).to(tl.int32), axis=1)
            rounds = tl.minimum(tl.max(entering, axis=0), C)
            for _ in range(rounds):
                tmin, targ = tl.min(dist, axis=1, return_indices=True)
                vmax, varg = tl.max(vals, axis=1, return_indices=True)
                take = tmin < vmax
                drop_min = tl.minimum(drop_min, tl.where(take, vmax, tmin))
                hit = take[:, None] & (slots[None, :] == varg[:, None])
                vals = tl.where(hit, tmin[:, None], vals)
                idxs = tl.where(hit, (n0 + targ)[:, None], idxs)
                dist = tl.where(ns[None, :] == targ[:, None], inf, dist)
            drop_min = tl.minimum(drop_min, tl.min(dist, axis=1))

        thr = tl.min(vals, axis=1) + marg
        # Exact rescoring, one candidate per row per step, as many steps as the busiest row needs.
        remaining = (vals <= thr[:, None]) & (idxs < K)
        steps = tl.max(tl.sum(remaining.to(tl.int32), axis=1), axis=0)
        best_s = tl.full([BM], inf, tl.float64)
        best = tl.full([BM], K, tl.int32)
        for _ in range(steps):
            slot = tl.min(tl.where(remaining, slots[None, :], C), axis=1)
            has = slot < C
            at = slots[None, :] == slot[:, None]
            j = tl.sum(tl.where(at, idxs, 0), axis=1)
            s = _exact_scores(res_ptr, cb_l, rows64, row_ok & has, tl.where(has, j, 0), D, BM)
            better = has & ((s < best_s) | ((s == best_s) & (j < best)))
            best_s = tl.where(better, s, best_s)
            best = tl.where(better, j, best)
            remaining = remaining & ~at

        # A row whose dropped values reach its threshold may have had candidates the buffer could
        # not hold: rescore it against every codeword, one row at a time (rare by construction).
        overflow = row_ok & (drop_min <= thr)
        if tl.max(overflow.to(tl.int32), axis=0) > 0:
            for i in range(BM):
                if tl.max(tl.where(bm_ids == i, overflow.to(tl.int32), 0), axis=0) > 0:
                    row = tl.program_id(0).to(tl.int64) * BM + i
                    best = tl.where(bm_ids == i, _scan_all(res_ptr, cb_l, row, D, K, SCAN), best)
        best = tl.where(best >= K, 0, best)  # rows without a finite score (non-finite input)
        tl.store(codes_ptr + level * N + rows64, best.to(tl.int64), mask=row_ok)
        tl.debug_barrier()  # every thread has read the old residual before any thread rewrites it

        norm2 = tl.zeros([BM], tl.float32)
        err2 = tl.zeros([BM], tl.float32)
        best64 = best.to(tl.int64)
        for d0 in range(0, D, BK):
            cols = d0 + ks
            m = row_ok[:, None] & (cols[None, :] < D)
            offs = rows64[:, None] * D + cols[None, :]
            e = tl.load(cb_l + best64[:, None] * D + cols[None, :], mask=m, other=0.0)
            r = tl.load(res_ptr + offs, mask=m, other=0.0) - e
            tl.store(res_ptr + offs, r, mask=m)
            if PRECISION != "fp32":
                err2 += _store_low(rlow_ptr, offs, r, m, PRECISION)
            if HAS_Q:
                tl.store(q_ptr + offs, tl.load(q_ptr + offs, mask=m, other=0.0) + e, mask=m)
            norm2 += tl.sum(r * r, axis=1)
        tl.debug_barrier()  # the next level reads the residual written by other threads


def tma_compatible(t) -> bool:
    """A contiguous tensor TMA can read as 2-D rows: 16-byte aligned base and row pitch."""
    return t.is_contiguous() and t.data_ptr() % 16 == 0 and t.shape[-1] * t.element_size() % 16 == 0


def rvq_encode(codes, residual, quantized, x, embed, low, norms, emax, demax, *, precision: str, dot_in_fp32: bool,
               block_m: int, block_n: int, block_k: int, candidates: int, num_warps: int, num_stages: int,
               tma: bool) -> None:
    """Encodes x [N, D] (unit column stride) into codes [L, N]; residual [N, D] float32 receives the
    final residual; quantized [N, D] (zero-filled, or None) receives the sum of chosen codewords.
    embed [L, K, D] float32; low its copy rounded to the search precision (embed for fp32);
    norms [L, K]; emax, demax [L]: largest codeword norm and rounding-error norm per level.
    tma: read codeword tiles through a TMA descriptor (the caller checks tma_compatible(low))."""
    n, dim = x.shape
    levels, size, _ = embed.shape
    rlow = residual if precision == "fp32" else residual.new_empty((n, dim), dtype=low.dtype)
    block_m = min(block_m, max(16, triton.next_power_of_2(n)))  # few rows: no padded block
    if tma:
        from triton.tools.tensor_descriptor import TensorDescriptor

        low = TensorDescriptor.from_tensor(low.view(levels * size, dim), [block_n, block_k])
    _rvq_encode_kernel[(triton.cdiv(n, block_m),)](
        x, x.stride(0), embed, low, norms, emax, demax, codes, residual, rlow,
        quantized if quantized is not None else residual, n, dim, size, levels,
        PRECISION=precision, DOT_IN_FP32=dot_in_fp32, HAS_Q=quantized is not None, B_TMA=tma,
        BM=block_m, BN=block_n, BK=block_k, C=candidates, SCAN=64, num_warps=num_warps, num_stages=num_stages,
    )


@triton.jit(do_not_specialize=["N", "FIRST"])  # as encode; FIRST (the first level decoded) varies by caller
def _rvq_decode_kernel(out_ptr, codes_ptr, cb_ptr, N, D, K, FIRST, LEVELS: tl.constexpr, BM: tl.constexpr,
                       BD: tl.constexpr):
    # LEVELS is unrolled: every level's gather is independent and in flight at once (the
    # codebooks sit in L2; the kernel is bound by outstanding gathers). Codebook lines are
    # kept in L2 (evict_last) and the output streams past it (evict_first).
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BD + tl.arange(0, BD)
    row_ok = rows < N
    m = row_ok[:, None] & (cols[None, :] < D)
    acc = tl.zeros([BM, BD], tl.float32)
    bad = tl.zeros([BM], tl.int1)
    for i in tl.static_range(LEVELS):
        code = tl.load(codes_ptr + i * N + rows, mask=row_ok, other=0)
        ok = (code >= 0) & (code < K)
        bad = bad | ~ok
        base = cb_ptr + ((FIRST + i) * K + tl.where(ok, code, 0)) * D
        # 0.0 + E_0 + E_1 + ... in order
        acc += tl.load(base[:, None] + cols[None, :], mask=m, other=0.0, eviction_policy="evict_last")
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * D + cols[None, :], tl.where(bad[:, None], float("nan"), acc),
             mask=m, eviction_policy="evict_first")


def rvq_decode(out, codes, embed, first_level: int, *, block_d: int) -> None:
    """out [N, D] = sum over i of embed[first_level + i][codes[i]]; NaN rows for codes outside [0, K)."""
    levels, n = codes.shape
    _, size, dim = embed.shape
    block_d = min(block_d, triton.next_power_of_2(dim))
    block_m = max(1, 4096 // block_d)
    _rvq_decode_kernel[(triton.cdiv(n, block_m), triton.cdiv(dim, block_d))](
        out, codes, embed, n, dim, size, first_level, LEVELS=levels, BM=block_m, BD=block_d,
    )

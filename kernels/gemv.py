"""Skinny GEMM for decode steps: y [M, N] = x [M, K] @ W [N, K]^T with few rows M (a decode
batch), weights 16-bit or weight-only quantized (formats in anygpt_engine/quantization.py) and
dequantized in registers, tile by tile. The work around the matmul is fused so a decoder layer
needs few launches:

  prologue   RMSNorm of x (each program computes its rows' inverse RMS, then normalizes every
             x tile it loads with HF's rounding points, as ops.rms_norm)
  epilogues  none; the residual add (residual += y in place, rounded as the unfused add);
             SiLU(gate) * up over the row pairs (n, N/2 + n) of a stacked gate/up matrix;
             RoPE on q and k plus the paged KV append, over the row pairs (j, j + D/2) of each
             head of a stacked qkv matrix (q goes to its own buffer, k and v to the cache)

A program owns BLOCK_N output rows (two row sets for the paired epilogues) of BLOCK_M x rows
and walks K, or with split-K (SPLIT) one of `splits` contiguous K ranges of them, so that a few
output tiles (batch 1, a tensor-parallel shard) still give every SM programs to stream. Split-K
reduces in the same launch, deterministically: each program stores its float32 partial to a
workspace and counts itself in on the tile's counter; the last to arrive sums the partials in
split order (the same float order whichever program arrives last), runs the epilogue and resets
the counter to zero for the next launch.

Two inner products: FMA (BLOCK_M <= 8: the products accumulate per column in registers and are
reduced once at the end, so the K loop is pure loads and FMAs) and tl.dot (tensor cores; M
padded to 16). Quantized values enter the dot exactly (int8, e4m3 and
int4 - zero are exact in 16-bit floats); the per-channel scale is applied once at the end and
the int4 group scale once per group, so every face computes the same float32 sums as the
reference up to their order.
"""

import triton
import triton.language as tl

from anygpt_engine.kernels.attention import _cos_sin
from anygpt_engine.kernels.common import round_to

# Weight formats (WEIGHT) and epilogues (EPILOGUE): the ops pass these codes.
FLOAT, INT8, FP8, INT4 = 0, 1, 2, 3
NONE, RESIDUAL, SILU_MUL = 0, 1, 2


@triton.jit
def _inv_rms(x_ptr, x_stride, m, m_mask, K, eps, NORM: tl.constexpr, BLOCK_M: tl.constexpr,
             BLOCK_K: tl.constexpr):
    """1 / sqrt(mean(x^2) + eps) of each row m, correctly rounded as ops.rms_norm's faces (with
    the norm prologue; zeros, unread, without it)."""
    inv_rms = tl.zeros([BLOCK_M], tl.float32)
    if NORM:
        cols = tl.arange(0, BLOCK_K)
        for start in range(0, K, BLOCK_K):
            c = start + cols
            xs = tl.load(x_ptr + m[:, None].to(tl.int64) * x_stride + c[None, :],
                         mask=m_mask[:, None] & (c < K)[None, :], other=0.0).to(tl.float32)
            inv_rms += tl.sum(xs * xs, axis=1)
        inv_rms = tl.math.div_rn(1.0, tl.math.sqrt_rn(tl.math.div_rn(inv_rms, tl.cast(K, tl.float32)) + eps))
    return inv_rms


@triton.jit
def _x_tile(x_ptr, x_stride, m, m_mask, cols, col_mask, inv_rms, norm_ptr, NORM: tl.constexpr):
    """x[m, cols] in x's dtype; with NORM, RMS-normalized: round(w * round(x * inv_rms))."""
    # int64 row offsets (as the output's): M * K passes 2^31 in a large quantized prefill
    xs = tl.load(x_ptr + m[:, None].to(tl.int64) * x_stride + cols[None, :], mask=m_mask[:, None] & col_mask[None, :],
                 other=0.0)
    if NORM:
        normed = round_to(xs.to(tl.float32) * inv_rms[:, None], xs.dtype).to(tl.float32)
        w = tl.load(norm_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        xs = round_to(w[None, :] * normed, xs.dtype)
    return xs


@triton.jit
def _dot(x, w, acc, DOT_IN_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """acc + x @ w^T on tensor cores (x [BM, BK]; w [BN, BK], values exact in x's dtype)."""
    if DOT_IN_FP32:  # the interpreter's bf16 dot (and int8 -> bf16 cast) is broken; the products are exact
        acc = tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
    else:
        acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _accumulate(x_ptr, x_stride, m, m_mask, inv_rms, norm_ptr, w_ptr, scale_ptr, zero_ptr, rows, row_mask, K,
                k_begin, k_end, WEIGHT: tl.constexpr, NORM: tl.constexpr, DOT: tl.constexpr,
                DOT_IN_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr, GROUP: tl.constexpr):
    """float32 [BLOCK_M, BLOCK_N]: x[m] . dequant(W[rows]) over k_begin..k_end (k_begin a multiple
    of BLOCK_K, k_end one too or K)."""
    rows64 = rows.to(tl.int64)
    if WEIGHT == 3:  # int4: one group (GROUP values, GROUP / 2 bytes) at a time, even and odd k apart
        HALF: tl.constexpr = GROUP // 2
        j = tl.arange(0, HALF)
        groups = K // GROUP
        if DOT:
            acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        else:
            acc = tl.zeros([BLOCK_M, BLOCK_N, HALF], tl.float32)
        for start in range(k_begin, k_end, BLOCK_K):
            for g in tl.static_range(BLOCK_K // GROUP):
                k0 = start + g * GROUP
                even = k0 + 2 * j
                valid = even < K
                x_even = _x_tile(x_ptr, x_stride, m, m_mask, even, valid, inv_rms, norm_ptr, NORM)
                x_odd = _x_tile(x_ptr, x_stride, m, m_mask, even + 1, valid, inv_rms, norm_ptr, NORM)
                packed = tl.load(w_ptr + rows64[:, None] * (K // 2) + (k0 // 2 + j)[None, :],
                                 mask=row_mask[:, None] & valid[None, :], other=0)
                group_mask = row_mask & (rows * 0 + k0 < K)
                group = rows64 * groups + k0 // GROUP
                zero = tl.load(zero_ptr + group, mask=group_mask, other=0).to(tl.float32)[:, None]
                scale = tl.load(scale_ptr + group, mask=group_mask, other=0.0).to(tl.float32)
                low = (packed & 0xF).to(tl.float32) - zero
                high = (packed >> 4).to(tl.float32) - zero
                if DOT:  # q - zero in -15..15: exact in x's dtype
                    part = _dot(x_even, low, tl.zeros([BLOCK_M, BLOCK_N], tl.float32),
                                DOT_IN_FP32, DOT_PRECISION)
                    part = _dot(x_odd, high, part, DOT_IN_FP32, DOT_PRECISION)
                    acc += part * scale[None, :]
                else:
                    acc += (x_even.to(tl.float32)[:, None, :] * (low * scale[:, None])[None, :, :]
                            + x_odd.to(tl.float32)[:, None, :] * (high * scale[:, None])[None, :, :])
        if not DOT:
            acc = tl.sum(acc, axis=2)
    else:
        cols = tl.arange(0, BLOCK_K)
        if DOT:
            acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        else:
            acc = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_K], tl.float32)
        for start in range(k_begin, k_end, BLOCK_K):
            c = start + cols
            col_mask = c < K
            xs = _x_tile(x_ptr, x_stride, m, m_mask, c, col_mask, inv_rms, norm_ptr, NORM)
            w = tl.load(w_ptr + rows64[:, None] * K + c[None, :], mask=row_mask[:, None] & col_mask[None, :],
                        other=0.0)
            if DOT:  # int8 and e4m3 values are exact in 16-bit floats
                acc = _dot(xs, w, acc, DOT_IN_FP32, DOT_PRECISION)
            else:
                acc += xs.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]
        if not DOT:
            acc = tl.sum(acc, axis=2)
        if WEIGHT != 0:  # int8, fp8: one scale per output channel
            acc *= tl.load(scale_ptr + rows64, mask=row_mask, other=0.0)[None, :]
    return acc


@triton.jit
def _split_of(pid, splits, SPLIT: tl.constexpr):
    """(tile, split) of program pid: a tile's split programs are adjacent in launch order."""
    if SPLIT:
        return pid // splits, pid % splits
    return pid, 0


@triton.jit
def _k_range(K, split, splits, SPLIT: tl.constexpr, BLOCK_K: tl.constexpr):
    """The K range [begin, end) of split `split`: whole BLOCK_K steps (so whole int4 groups)."""
    if SPLIT:
        steps = tl.cdiv(tl.cdiv(K, BLOCK_K), splits)
        begin = split * steps * BLOCK_K
        return begin, tl.minimum(begin + steps * BLOCK_K, K)
    return 0, K


@triton.jit
def _partials(ws_ptr, tile, split, splits, part, PARTS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Pointers [BLOCK_M, BLOCK_N] to partial `part` of (tile, split) in the float32 workspace
    [tiles, splits, PARTS, BLOCK_M, BLOCK_N]."""
    offsets = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    return ws_ptr + ((tile.to(tl.int64) * splits + split) * PARTS + part) * (BLOCK_M * BLOCK_N) + offsets


@triton.jit
def _arrive(counter_ptr, tile, splits, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Counts this program's partials in on the tile's counter (int32, zero at launch). Returns
    [BLOCK_M, BLOCK_N] all True in the last of the tile's programs to arrive (which resets the
    counter to zero), all False in the others."""
    tl.debug_barrier()  # every thread's partial stores precede the release below
    arrived = tl.atomic_add(counter_ptr + tile, 1, sem="acq_rel", scope="gpu")
    tl.store(counter_ptr + tile, 0, mask=arrived == splits - 1)  # all the others are in: no one else touches it
    tl.debug_barrier()  # the partial loads after this follow the acquire
    # A full bool tensor: the interpreter widens `tensor & scalar bool` to int32, which masks reject.
    return tl.zeros([BLOCK_M, BLOCK_N], tl.int32) + arrived == splits - 1


@triton.jit
def _sum_partials(ws_ptr, tile, splits, part, last, PARTS: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr):
    """The tile's partials summed in split order (loaded only where `last`)."""
    total = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for split in range(0, splits):  # .cg: from L2, where the other SMs' stores are
        total += tl.load(_partials(ws_ptr, tile, split, splits, part, PARTS, BLOCK_M, BLOCK_N), mask=last, other=0.0,
                         cache_modifier=".cg")
    return total


@triton.jit(do_not_specialize=["M", "x_stride", "out_stride", "splits"])
def _gemv_kernel(out_ptr, x_ptr, w_ptr, scale_ptr, zero_ptr, norm_ptr, ws_ptr, counter_ptr, M, N_OUT, K, x_stride,
                 out_stride, splits, eps, WEIGHT: tl.constexpr, NORM: tl.constexpr, EPILOGUE: tl.constexpr,
                 SPLIT: tl.constexpr, DOT: tl.constexpr, DOT_IN_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr):
    """out [M, N_OUT] (EPILOGUE 0 or 2) or the residual [M, N_OUT] updated in place (EPILOGUE 1,
    out_ptr is the residual). With SiLU(gate) * up the weight has 2 * N_OUT rows. Program
    (tile_n * splits + split, tile_m); with SPLIT, ws_ptr/counter_ptr are the split workspace
    (float32 [tiles, splits, 1 or 2, BLOCK_M, BLOCK_N]) and the tiles' counters (int32, zero)."""
    tile_n, split = _split_of(tl.program_id(0), splits, SPLIT)
    n = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    n_mask = n < N_OUT
    m_mask = m < M
    dtype = x_ptr.dtype.element_ty
    inv_rms = _inv_rms(x_ptr, x_stride, m, m_mask, K, eps, NORM, BLOCK_M, BLOCK_K)
    k_begin, k_end = _k_range(K, split, splits, SPLIT, BLOCK_K)
    acc = _accumulate(x_ptr, x_stride, m, m_mask, inv_rms, norm_ptr, w_ptr, scale_ptr, zero_ptr, n, n_mask, K,
                      k_begin, k_end, WEIGHT, NORM, DOT, DOT_IN_FP32, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K, GROUP)
    if EPILOGUE == 2:
        up = _accumulate(x_ptr, x_stride, m, m_mask, inv_rms, norm_ptr, w_ptr, scale_ptr, zero_ptr, n + N_OUT,
                         n_mask, K, k_begin, k_end, WEIGHT, NORM, DOT, DOT_IN_FP32, DOT_PRECISION, BLOCK_M, BLOCK_N,
                         BLOCK_K, GROUP)
    mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT:
        PARTS: tl.constexpr = 2 if EPILOGUE == 2 else 1
        tile = tl.program_id(1) * (tl.num_programs(0) // splits) + tile_n
        tl.store(_partials(ws_ptr, tile, split, splits, 0, PARTS, BLOCK_M, BLOCK_N), acc)
        if EPILOGUE == 2:
            tl.store(_partials(ws_ptr, tile, split, splits, 1, PARTS, BLOCK_M, BLOCK_N), up)
        last = _arrive(counter_ptr, tile, splits, BLOCK_M, BLOCK_N)
        mask = mask & last
        acc = _sum_partials(ws_ptr, tile, splits, 0, last, PARTS, BLOCK_M, BLOCK_N)
        if EPILOGUE == 2:
            up = _sum_partials(ws_ptr, tile, splits, 1, last, PARTS, BLOCK_M, BLOCK_N)
    y = round_to(acc, dtype)
    if EPILOGUE == 2:  # SiLU(gate) * up with the rounding points of torch's bf16 ops
        gate = y.to(tl.float32)
        silu = round_to(tl.math.div_rn(gate, 1.0 + tl.exp(-gate)), dtype).to(tl.float32)
        y = round_to(silu * round_to(up, dtype).to(tl.float32), dtype)
    out_ptrs = out_ptr + m[:, None].to(tl.int64) * out_stride + n[None, :]
    if EPILOGUE == 1:
        residual = tl.load(out_ptrs, mask=mask, other=0.0).to(tl.float32)
        y = round_to(y.to(tl.float32) + residual, dtype)
    tl.store(out_ptrs, y, mask=mask)


@triton.jit(do_not_specialize=["M", "x_stride", "num_slots", "splits"])
def _qkv_rope_kernel(q_ptr, k_cache_ptr, v_cache_ptr, x_ptr, w_ptr, scale_ptr, zero_ptr, norm_ptr, positions_ptr,
                     slots_ptr, inv_freq_ptr, ws_ptr, counter_ptr, M, K, x_stride, num_slots, splits, eps,
                     Q_HEADS: tl.constexpr, KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, WEIGHT: tl.constexpr,
                     NORM: tl.constexpr, SPLIT: tl.constexpr, DOT: tl.constexpr, DOT_IN_FP32: tl.constexpr,
                     DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     GROUP: tl.constexpr):
    """The qkv projection of M tokens with RoPE and the KV append fused: program (t, h) computes
    rows j and j + D/2 of head h for j in its BLOCK_N slice of the half; q heads go rotated to
    q [M, Q_HEADS, D], k heads rotated and v heads as they are to their tokens' cache slots
    (caches [slots, KV_HEADS, D]; a slot outside 0..num_slots-1 writes nothing). Split-K as in
    _gemv_kernel (two partials per tile: the two halves)."""
    HALF: tl.constexpr = HEAD_DIM // 2
    TILES: tl.constexpr = HALF // BLOCK_N
    pid, split = _split_of(tl.program_id(0), splits, SPLIT)
    head = pid // TILES
    j = (pid % TILES) * BLOCK_N + tl.arange(0, BLOCK_N)
    m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = m < M
    dtype = x_ptr.dtype.element_ty
    inv_rms = _inv_rms(x_ptr, x_stride, m, m_mask, K, eps, NORM, BLOCK_M, BLOCK_K)
    rows = head * HEAD_DIM + j
    all_rows = j < HALF
    k_begin, k_end = _k_range(K, split, splits, SPLIT, BLOCK_K)
    first = _accumulate(x_ptr, x_stride, m, m_mask, inv_rms, norm_ptr, w_ptr, scale_ptr, zero_ptr, rows, all_rows, K,
                        k_begin, k_end, WEIGHT, NORM, DOT, DOT_IN_FP32, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
                        GROUP)
    second = _accumulate(x_ptr, x_stride, m, m_mask, inv_rms, norm_ptr, w_ptr, scale_ptr, zero_ptr, rows + HALF,
                         all_rows, K, k_begin, k_end, WEIGHT, NORM, DOT, DOT_IN_FP32, DOT_PRECISION, BLOCK_M, BLOCK_N,
                         BLOCK_K, GROUP)
    mask = m_mask[:, None] & all_rows[None, :]
    if SPLIT:
        tile = tl.program_id(1) * (tl.num_programs(0) // splits) + pid
        tl.store(_partials(ws_ptr, tile, split, splits, 0, 2, BLOCK_M, BLOCK_N), first)
        tl.store(_partials(ws_ptr, tile, split, splits, 1, 2, BLOCK_M, BLOCK_N), second)
        last = _arrive(counter_ptr, tile, splits, BLOCK_M, BLOCK_N)
        mask = mask & last
        first = _sum_partials(ws_ptr, tile, splits, 0, last, 2, BLOCK_M, BLOCK_N)
        second = _sum_partials(ws_ptr, tile, splits, 1, last, 2, BLOCK_M, BLOCK_N)
    first = round_to(first, dtype).to(tl.float32)
    second = round_to(second, dtype).to(tl.float32)
    heads = (head + j * 0)[None, :]  # the head as a [1, BLOCK_N] tensor: masks below are tensors
    is_q = heads < Q_HEADS
    is_k = (heads >= Q_HEADS) & (heads < Q_HEADS + KV_HEADS)
    is_v = heads >= Q_HEADS + KV_HEADS
    positions = tl.load(positions_ptr + m, mask=m_mask, other=0)
    cos, sin = _cos_sin(positions.to(tl.float32)[:, None] * tl.load(inv_freq_ptr + j)[None, :])
    # Rotate-half RoPE on q and k in float32, rounded once (as ops.rope_kv_append); v as it is.
    first, second = (round_to(tl.where(is_v, first, first * cos - second * sin), dtype),
                     round_to(tl.where(is_v, second, second * cos + first * sin), dtype))
    m64 = m.to(tl.int64)[:, None]
    q_ptrs = q_ptr + m64 * (Q_HEADS * HEAD_DIM) + head * HEAD_DIM + j[None, :]
    tl.store(q_ptrs, first, mask=mask & is_q)
    tl.store(q_ptrs + HALF, second, mask=mask & is_q)
    slots = tl.load(slots_ptr + m, mask=m_mask, other=-1)
    in_cache = mask & ((slots >= 0) & (slots < num_slots))[:, None]
    kv_head = (head - Q_HEADS) % KV_HEADS
    cache = slots.to(tl.int64)[:, None] * (KV_HEADS * HEAD_DIM) + kv_head * HEAD_DIM + j[None, :]
    tl.store(k_cache_ptr + cache, first, mask=in_cache & is_k)
    tl.store(k_cache_ptr + cache + HALF, second, mask=in_cache & is_k)
    tl.store(v_cache_ptr + cache, first, mask=in_cache & is_v)
    tl.store(v_cache_ptr + cache + HALF, second, mask=in_cache & is_v)


def split_workspace_shape(tiles: int, splits: int, parts: int, block_m: int, block_n: int) -> tuple[int, int]:
    """(float32 workspace elements, int32 counters) a split-K launch of `tiles` output tiles needs."""
    return tiles * splits * parts * block_m * block_n, tiles


def gemv(out, x, weight, scales, zeros, norm_weight, eps, *, weight_format, epilogue, n_out, dot, dot_in_fp32,
         block_m, block_n, block_k, group, num_warps, num_stages, splits=1, workspace=None, counters=None):
    """out [M, n_out] (or the residual, epilogue RESIDUAL) <- x [M, K] (unit column stride) times
    the weight [rows, K] (or its packed form) with the fused prologue/epilogue; scales/zeros/
    norm_weight may be None when unused. splits > 1: split-K over that many K ranges, with a
    float32 workspace and int32 counters (all zero) of split_workspace_shape's sizes."""
    m, k = x.shape
    if m == 0 or n_out == 0:
        return
    grid = (triton.cdiv(n_out, block_n) * splits, triton.cdiv(m, block_m))
    _gemv_kernel[grid](
        out, x, weight, scales if scales is not None else weight, zeros if zeros is not None else weight,
        norm_weight if norm_weight is not None else x, workspace if splits > 1 else out,
        counters if splits > 1 else out, m, n_out, k, x.stride(0), out.stride(0), splits, eps,
        WEIGHT=weight_format, NORM=norm_weight is not None, EPILOGUE=epilogue, SPLIT=splits > 1, DOT=dot,
        DOT_IN_FP32=dot_in_fp32, DOT_PRECISION="ieee" if x.element_size() == 4 else "tf32", BLOCK_M=block_m,
        BLOCK_N=block_n, BLOCK_K=block_k, GROUP=group, num_warps=num_warps, num_stages=num_stages)


def qkv_rope(q, k_cache, v_cache, x, weight, scales, zeros, norm_weight, eps, positions, slot_mapping, inv_freq, *,
             weight_format, dot, dot_in_fp32, block_m, block_n, block_k, group, num_warps, num_stages, splits=1,
             workspace=None, counters=None):
    """q [M, Hq, D] contiguous; caches [blocks, block_size, Hkv, D]; block_n divides D / 2; split-K
    as in gemv (two partials per tile)."""
    m, k = x.shape
    _, num_q_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    if m == 0:
        return
    heads = num_q_heads + 2 * num_kv_heads
    grid = (heads * (head_dim // 2 // block_n) * splits, triton.cdiv(m, block_m))
    _qkv_rope_kernel[grid](
        q, k_cache, v_cache, x, weight, scales if scales is not None else weight,
        zeros if zeros is not None else weight, norm_weight if norm_weight is not None else x, positions,
        slot_mapping, inv_freq, workspace if splits > 1 else q, counters if splits > 1 else q, m, k, x.stride(0),
        k_cache.shape[0] * k_cache.shape[1], splits, eps,
        Q_HEADS=num_q_heads, KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, WEIGHT=weight_format,
        NORM=norm_weight is not None, SPLIT=splits > 1, DOT=dot, DOT_IN_FP32=dot_in_fp32,
        DOT_PRECISION="ieee" if x.element_size() == 4 else "tf32", BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_K=block_k, GROUP=group, num_warps=num_warps, num_stages=num_stages)

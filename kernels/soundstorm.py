"""SoundStorm's fused kernels: the fast forward of anygpt_engine.models.soundstorm (contracts and
torch references: anygpt_engine/ops/soundstorm.py).

  code_embedding   the 7-level code-embedding gather-sum plus the semantic embedding, one frame
                   per row, summed in float32 and rounded once
  add_layer_norm   residual += alpha * y, optionally LayerNorm'd in place (the block's post-norm),
                   then the next sublayer's LayerNorm of it: one pass over each row, float32
                   statistics
  glu              the conv module's GLU (out * sigmoid(gate)) with padded frames zeroed
  dwconv_norm      depthwise conv over time ('same' padding, padded frames zeroed before and
                   after), Swish and the channel LayerNorm: a program holds BLOCK_T frames x all
                   channels, so the statistics never leave registers
  grouped_linear   the per-level output projection [M, Q, D] x [Q, D, V] + bias -> [M, Q, V]
                   (fp32 logits from bf16 operands), written in the [B, N*Q, V] layout

Every value is computed in float32 and rounded once at the store (kernels.common.round_to), so
the CPU interpreter checks the same numbers the GPU produces (except bf16 tl.dot, which the
interpreter gets wrong: grouped_linear is tested there in float32 and float16).
"""

import torch
import triton
import triton.language as tl

from anygpt_engine.kernels.common import round_to


@triton.jit
def _code_embedding_kernel(out_ptr, codes_ptr, semantic_ptr, code_embed_ptr, semantic_embed_ptr, rows, dim,
                           codes_per_level, semantic_rows, Q: tl.constexpr, ROWS: tl.constexpr,
                           BLOCK_D: tl.constexpr):
    d = tl.arange(0, BLOCK_D)
    for r in range(ROWS):
        row = (tl.program_id(0) * ROWS + r).to(tl.int64)
        ok = row < rows
        # (Masks combine by comparison, not `&` with a scalar, which the interpreter mistypes.)
        live = d < tl.where(ok, dim, 0)
        acc = tl.zeros([BLOCK_D], tl.float32)
        for q in tl.static_range(Q):
            # Ids are checked by the callers; clamping keeps a bad one inside the table.
            idx = tl.load(codes_ptr + row * Q + q, mask=ok, other=0)
            idx = tl.minimum(tl.maximum(idx, 0), codes_per_level - 1) + q * codes_per_level
            acc += tl.load(code_embed_ptr + idx * dim + d, mask=live, other=0.0).to(tl.float32)
        sem = tl.load(semantic_ptr + row, mask=ok, other=0)
        sem = tl.minimum(tl.maximum(sem, 0), semantic_rows - 1)
        acc += tl.load(semantic_embed_ptr + sem * dim + d, mask=live, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * dim + d, round_to(acc, out_ptr.dtype.element_ty), mask=live)


def code_embedding(out, codes, semantic, code_embed, semantic_embed, rows_per_program=4, num_warps=4):
    """out [T, D]; codes [T, Q] and semantic [T] int64 (contiguous)."""
    rows, q = codes.shape
    dim = code_embed.shape[1]
    if rows == 0:
        return
    _code_embedding_kernel[(triton.cdiv(rows, rows_per_program),)](
        out, codes, semantic, code_embed, semantic_embed, rows, dim, code_embed.shape[0] // q, semantic_embed.shape[0],
        Q=q, ROWS=rows_per_program, BLOCK_D=triton.next_power_of_2(dim), num_warps=num_warps)


@triton.jit
def _layer_norm(s, live, weight_ptr, bias_ptr, d, dim, eps):
    """LayerNorm of a float32 row (entries outside `live` are ignored and come back as 0)."""
    mean = tl.math.div_rn(tl.sum(tl.where(live, s, 0.0), axis=0), tl.cast(dim, tl.float32))
    diff = tl.where(live, s - mean, 0.0)
    var = tl.math.div_rn(tl.sum(diff * diff, axis=0), tl.cast(dim, tl.float32))
    rstd = tl.math.div_rn(1.0, tl.math.sqrt_rn(var + eps))  # correctly rounded (as is every division here)
    w = tl.load(weight_ptr + d, mask=live, other=0.0).to(tl.float32)
    b = tl.load(bias_ptr + d, mask=live, other=0.0).to(tl.float32)
    return diff * rstd * w + b


@triton.jit
def _add_layer_norm_kernel(residual_ptr, y_ptr, out_ptr, post_w_ptr, post_b_ptr, norm_w_ptr, norm_b_ptr, rows, dim,
                           alpha, eps, HAS_Y: tl.constexpr, HAS_POST: tl.constexpr, HAS_NORM: tl.constexpr,
                           WRITE_RESIDUAL: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    d = tl.arange(0, BLOCK)
    dtype = residual_ptr.dtype.element_ty
    for r in range(ROWS):
        row = (tl.program_id(0) * ROWS + r).to(tl.int64)
        live = d < tl.where(row < rows, dim, 0)
        ptrs = residual_ptr + row * dim + d
        s = tl.load(ptrs, mask=live, other=0.0).to(tl.float32)
        if HAS_Y:
            s += alpha * tl.load(y_ptr + row * dim + d, mask=live, other=0.0).to(tl.float32)
        if HAS_POST:
            s = _layer_norm(s, live, post_w_ptr, post_b_ptr, d, dim, eps)
        if WRITE_RESIDUAL:
            stored = round_to(s, dtype)
            tl.store(ptrs, stored, mask=live)
            s = stored.to(tl.float32)  # the next norm reads exactly what was stored
        if HAS_NORM:
            o = _layer_norm(s, live, norm_w_ptr, norm_b_ptr, d, dim, eps)
            tl.store(out_ptr + row * dim + d, round_to(o, dtype), mask=live)


def add_layer_norm(residual, y, out, post_norm, norm, alpha: float, eps: float, rows_per_program=1, num_warps=4):
    """residual, y, out [rows, D] contiguous; post_norm / norm: (weight, bias) or None."""
    rows, dim = residual.shape
    if rows == 0:
        return
    post_w, post_b = post_norm if post_norm is not None else (residual, residual)
    norm_w, norm_b = norm if norm is not None else (residual, residual)
    _add_layer_norm_kernel[(triton.cdiv(rows, rows_per_program),)](
        residual, y if y is not None else residual, out if out is not None else residual, post_w, post_b, norm_w,
        norm_b, rows, dim, alpha, eps, HAS_Y=y is not None, HAS_POST=post_norm is not None,
        HAS_NORM=norm is not None, WRITE_RESIDUAL=y is not None or post_norm is not None, ROWS=rows_per_program,
        BLOCK=triton.next_power_of_2(dim), num_warps=num_warps)


@triton.jit
def _glu_kernel(g_ptr, u_ptr, lengths_ptr, rows, frames, channels, ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    c = tl.arange(0, BLOCK_C)
    for r in range(ROWS):
        row = (tl.program_id(0) * ROWS + r).to(tl.int64)
        ok = row < rows
        item = tl.where(ok, row // frames, 0)
        length = tl.load(lengths_ptr + item)
        live = c < tl.where(ok, channels, 0)
        out = tl.load(u_ptr + row * 2 * channels + c, mask=live, other=0.0).to(tl.float32)
        gate = tl.load(u_ptr + row * 2 * channels + channels + c, mask=live, other=0.0).to(tl.float32)
        g = out * tl.sigmoid(gate)
        g = tl.where(row % frames < length, g, 0.0)  # padded frames are zeroed before the conv
        tl.store(g_ptr + row * channels + c, round_to(g, g_ptr.dtype.element_ty), mask=live)


@triton.jit
def _dwconv_norm_kernel(out_ptr, g_ptr, weight_ptr, w_stride_c, w_stride_k, bias_ptr, gamma_ptr, lengths_ptr, frames,
                        channels, eps, K: tl.constexpr, PAD_LEFT: tl.constexpr, BLOCK_T: tl.constexpr,
                        BLOCK_C: tl.constexpr):
    tile = tl.program_id(0)
    item = tl.program_id(1).to(tl.int64)
    length = tl.minimum(tl.load(lengths_ptr + item), frames)
    t = tile * BLOCK_T + tl.arange(0, BLOCK_T)
    c = tl.arange(0, BLOCK_C)
    c_live = c < channels
    base = g_ptr + item * frames * channels
    acc = tl.zeros([BLOCK_T, BLOCK_C], tl.float32)
    for j in range(K):
        src = t + (j - PAD_LEFT)
        ok = (src >= 0) & (src < length)  # zero padding, and padded frames read as zeros
        x = tl.load(base + src[:, None] * channels + c[None, :], mask=ok[:, None] & c_live[None, :], other=0.0)
        w = tl.load(weight_ptr + c * w_stride_c + j * w_stride_k, mask=c_live, other=0.0).to(tl.float32)
        acc += x.to(tl.float32) * w[None, :]
    acc += tl.load(bias_ptr + c, mask=c_live, other=0.0).to(tl.float32)[None, :]
    live = (t < length)[:, None] & c_live[None, :]
    h = tl.where(live, acc, 0.0)  # padded frames are zeroed after the conv
    h = h * tl.sigmoid(h)
    mean = tl.math.div_rn(tl.sum(h, axis=1), tl.cast(channels, tl.float32))
    diff = tl.where(c_live[None, :], h - mean[:, None], 0.0)
    var = tl.math.div_rn(tl.sum(diff * diff, axis=1), tl.cast(channels, tl.float32))
    rstd = tl.math.div_rn(1.0, tl.math.sqrt_rn(tl.maximum(var, eps)))  # correctly rounded
    gamma = tl.load(gamma_ptr + c, mask=c_live, other=0.0).to(tl.float32)
    y = diff * rstd[:, None] * gamma[None, :]
    store_mask = (t < frames)[:, None] & c_live[None, :]
    tl.store(out_ptr + item * frames * channels + t[:, None] * channels + c[None, :],
             round_to(y, out_ptr.dtype.element_ty), mask=store_mask)


def conformer_conv(out, g, u, lengths, weight, bias, gamma, eps: float, glu_rows=4, glu_warps=4, block_t=4,
                   num_warps=8):
    """u [B, N, 2C] contiguous -> g (scratch) [B, N, C] -> out [B, N, C]; weight [C, K] any strides."""
    b, n, c2 = u.shape
    c = c2 // 2
    k = weight.shape[1]
    if b * n == 0:
        return
    block_c = triton.next_power_of_2(c)
    _glu_kernel[(triton.cdiv(b * n, glu_rows),)](g, u, lengths, b * n, n, c, ROWS=glu_rows, BLOCK_C=block_c,
                                                 num_warps=glu_warps)
    _dwconv_norm_kernel[(triton.cdiv(n, block_t), b)](
        out, g, weight, weight.stride(0), weight.stride(1), bias, gamma, lengths, n, c, eps, K=k, PAD_LEFT=k // 2,
        BLOCK_T=block_t, BLOCK_C=block_c, num_warps=num_warps)


@triton.jit
def _grouped_linear_kernel(out_ptr, x_ptr, w_ptr, b_ptr, M, D, V, x_stride_m, x_stride_q, out_stride_m, out_stride_q,
                           IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # Row tiles vary fastest, so the programs that share a weight tile run together (L2 reuse).
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    q = tl.program_id(2).to(tl.int64)
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < V
    x_rows = x_ptr + rm[:, None] * x_stride_m + q * x_stride_q
    w_base = w_ptr + q * D * V
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, D, BLOCK_K):
        k = k0 + rk
        k_ok = k < D
        a = tl.load(x_rows + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_base + k[:, None] * V + rn[None, :], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if IEEE:  # float32 operands: no TF32 rounding
            acc = tl.dot(a, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, w, acc)
    acc += tl.load(b_ptr + q * V + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rm[:, None] * out_stride_m + q * out_stride_q + rn[None, :],
             round_to(acc, out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def grouped_linear(out, x, weight, bias, block_m=64, block_n=64, block_k=32, num_warps=4, num_stages=2):
    """x [M, Q, D] and out [M, Q, V] with unit last stride; weight [Q, D, V], bias [Q, V] contiguous."""
    m, q, d = x.shape
    v = weight.shape[2]
    if m == 0:
        return
    grid = (triton.cdiv(m, block_m), triton.cdiv(v, block_n), q)
    _grouped_linear_kernel[grid](
        out, x, weight, bias, m, d, v, x.stride(0), x.stride(1), out.stride(0), out.stride(1),
        IEEE=x.dtype == torch.float32, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_K=block_k, num_warps=num_warps, num_stages=num_stages)

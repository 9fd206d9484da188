"""LM head with the final RMSNorm fused in, reading only a device-given range of vocabulary
rows (the open modality's values and end token); logits outside the range are -inf.

Each program owns BLOCK_V vocabulary rows, aligned to BLOCK_V whatever the range, so a row's
logit is computed the same way (same tiles, same summation order) for any range: the
restricted head is bit-identical to the full one on the rows it reads. Programs whose rows
are all outside the range only write -inf and never touch the weight.
"""

import os

import torch
import triton
import triton.language as tl

from anygpt_engine.kernels.common import round_to


@triton.jit(do_not_specialize=["batch"])  # varies with the batch
def _lm_head_kernel(out_ptr, x_ptr, norm_ptr, weight_ptr, rows_ptr, batch, hidden, vocab, x_stride, eps,
                    BLOCK_B: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                    DOT_PRECISION: tl.constexpr):
    # Batch blocks are the grid's fastest axis: the programs sharing a weight tile run together,
    # so above BLOCK_B rows the tile comes from HBM once and from L2 for the other blocks.
    v = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    first = tl.load(rows_ptr)
    count = tl.load(rows_ptr + 1)
    inside = (v >= first) & (v < first + count) & (v < vocab)
    b_mask = b < batch
    out_ptrs = out_ptr + b[:, None] * vocab + v[None, :]
    store_mask = b_mask[:, None] & (v < vocab)[None, :]
    if tl.sum(inside.to(tl.int32), axis=0) == 0:
        tl.store(out_ptrs, tl.full([BLOCK_B, BLOCK_V], float("-inf"), tl.float32), mask=store_mask)
        return
    dtype = x_ptr.dtype.element_ty
    k = tl.arange(0, BLOCK_K)
    # Sum of squares of each row of x (as ops.rms_norm: float32, HF rounding points below).
    squares = tl.zeros([BLOCK_B], tl.float32)
    for start in range(0, hidden, BLOCK_K):
        cols = start + k
        xs = tl.load(x_ptr + b[:, None] * x_stride + cols[None, :], mask=b_mask[:, None] & (cols < hidden)[None, :],
                     other=0.0).to(tl.float32)
        squares += tl.sum(xs * xs, axis=1)
    # Correctly rounded (a GPU's tl.sqrt and fp32 `/` are approximate): the same numbers as the reference.
    inv_rms = tl.math.div_rn(1.0, tl.math.sqrt_rn(tl.math.div_rn(squares, tl.cast(hidden, tl.float32)) + eps))
    acc = tl.zeros([BLOCK_B, BLOCK_V], tl.float32)
    for start in range(0, hidden, BLOCK_K):
        cols = start + k
        col_mask = cols < hidden
        xs = tl.load(x_ptr + b[:, None] * x_stride + cols[None, :], mask=b_mask[:, None] & col_mask[None, :],
                     other=0.0).to(tl.float32)
        w_norm = tl.load(norm_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        normed = round_to(xs * inv_rms[:, None], dtype).to(tl.float32)
        h = round_to(w_norm[None, :] * normed, dtype)
        w = tl.load(weight_ptr + v[:, None] * hidden + cols[None, :], mask=inside[:, None] & col_mask[None, :],
                    other=0.0)
        if DOT_PRECISION == "ieee":  # float32 (no tf32), or 16-bit operands under the CPU interpreter,
            # whose bfloat16 dot is broken: products of 16-bit values are exact in float32.
            acc += tl.dot(h.to(tl.float32), tl.trans(w).to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(h, tl.trans(w), input_precision=DOT_PRECISION)
    tl.store(out_ptrs, tl.where(inside[None, :], acc, float("-inf")), mask=store_mask)


def lm_head(out, x, norm_weight, weight, rows, eps, block_v=64, block_k=128, num_warps=4, num_stages=3):
    """out [B, V] float32 <- norm(x [B, H]) @ weight[V, H].T on the rows given by rows = (first, count)."""
    batch, hidden = x.shape
    vocab = weight.shape[0]
    if batch == 0:
        return
    # At most 32 rows a program: with 64 a float32 tile no longer fits in shared memory.
    block_b = min(32, max(16, triton.next_power_of_2(batch)))
    _lm_head_kernel[(triton.cdiv(batch, block_b), triton.cdiv(vocab, block_v))](
        out, x, norm_weight, weight, rows, batch, hidden, vocab, x.stride(0), eps,
        BLOCK_B=block_b, BLOCK_V=block_v, BLOCK_K=block_k,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 or _interpreting() else "tf32", num_warps=num_warps,
        num_stages=num_stages)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"

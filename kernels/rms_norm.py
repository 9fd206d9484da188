"""RMSNorm, optionally fused with the residual add, as a Triton kernel.

One program per row; the whole row sits in registers (hidden <= 16384), so the residual
sum is written once and never re-read. Rounding follows HF LlamaRMSNorm (see ops.rms_norm).
"""

import triton
import triton.language as tl

from anygpt_engine.kernels.common import round_to


@triton.jit
def _rms_norm_kernel(out_ptr, residual_ptr, x_ptr, weight_ptr, hidden, x_row_stride, eps,
                     HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0)
    h = x.to(tl.float32)
    if HAS_RESIDUAL:
        res_ptrs = residual_ptr + row * hidden + cols
        summed = round_to(h + tl.load(res_ptrs, mask=mask, other=0.0).to(tl.float32), x.dtype)
        tl.store(res_ptrs, summed, mask=mask)
        h = summed.to(tl.float32)
    # Correctly rounded (a GPU's tl.sqrt and fp32 `/` are approximate): the same numbers as the reference.
    mean_square = tl.math.div_rn(tl.sum(h * h, axis=0), tl.cast(hidden, tl.float32))
    inv_rms = tl.math.div_rn(1.0, tl.math.sqrt_rn(mean_square + eps))
    normed = round_to(h * inv_rms, x.dtype).to(tl.float32)
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * hidden + cols, round_to(w * normed, x.dtype), mask=mask)


def rms_norm(out, residual, x, weight, eps: float, num_warps: int = 4) -> None:
    """out[r] = weight * norm(x[r] (+ residual[r], written back)); 2-D tensors, rows contiguous."""
    rows, hidden = x.shape
    if rows == 0:
        return
    block = triton.next_power_of_2(hidden)
    _rms_norm_kernel[(rows,)](
        out, residual if residual is not None else out, x, weight, hidden, x.stride(0), eps,
        HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=num_warps,
    )

"""Small Triton helpers shared by the kernels."""

import triton
import triton.language as tl


@triton.jit
def round_to(x, dtype: tl.constexpr):
    """float32 -> dtype with round-to-nearest-even everywhere.

    On a GPU `.to(tl.bfloat16)` already rounds to nearest even, but the CPU interpreter
    truncates; rounding the float32 bits first makes the final cast exact on both, so CPU
    tests check the same numbers the GPU produces."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = tl.where(x != x, x, bits.to(tl.float32, bitcast=True))
    return x.to(dtype)


@triton.jit
def mix32(x):
    """lowbias32 on uint32 (products wrap mod 2^32): the kernels' twin of sampling.hash32, the
    mixer behind every counter-based random draw (sampling, MaskGIT)."""
    x = (x ^ (x >> 16)) * 0x7FEB352D
    x = (x ^ (x >> 15)) * 0x846CA68B
    return x ^ (x >> 16)

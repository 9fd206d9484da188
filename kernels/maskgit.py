"""SoundStorm's MaskGIT step as one Triton kernel (contract: anygpt_engine/ops/maskgit.py).

Grid (row blocks, items). Each program takes ROWS positions of one item: the keep-top set by a
bitwise threshold search on order-preserving integer keys (no sort: 32 counting passes, 16 for
bf16 logits whose low key bits are zero), the counter-based Gumbel noise, the argmax and the
confidence. It then takes a ticket from the item's arrival counter; the program that arrives
last (every other program's confidence is then visible: the atomic is acq_rel) selects the
item's c least confident positions with the same threshold search over the positions, ties
to the lowest position, and re-masks them. One launch, no host sync.
"""

import torch
import triton
import triton.language as tl

from anygpt_engine.kernels.common import mix32

# Significant bits of a value's float32 key: the low bits of a bf16/fp16 value widened to float32
# are zero, and need no counting pass.
_KEY_BITS = {torch.float32: 32, torch.bfloat16: 16, torch.float16: 19}


@triton.jit
def _order_key(x):
    """float32 -> uint32 with the same order (-0.0 is canonicalised to +0.0 first)."""
    bits = (x + 0.0).to(tl.uint32, bitcast=True)
    return tl.where((bits >> 31) != 0, ~bits, bits | 0x80000000)


# A new pass, level or frame bucket must not compile a new kernel (Triton specializes ints on
# == 1 and % 16 == 0): level runs 0..6, counter every pass, positions = frames x levels.
@triton.jit(do_not_specialize=["counter", "level", "positions"])
def _maskgit_step_kernel(logits_ptr, codes_ptr, open_ptr, lengths_ptr, prompt_ptr, counts_ptr, seeds_ptr,
                         uniform_ptr, conf_ptr, done_ptr, positions, V, Q, keep, level, counter, divisor,
                         GREEDY: tl.constexpr, HAS_UNIFORM: tl.constexpr, KEY_BITS: tl.constexpr,
                         ROWS: tl.constexpr, BLOCK_V: tl.constexpr, SELECT_BLOCK: tl.constexpr):
    block = tl.program_id(0)
    item = tl.program_id(1).to(tl.int64)
    n_valid = tl.minimum(tl.load(lengths_ptr + item), positions // Q) * Q
    count = tl.load(counts_ptr + item)
    sampled = (count > 0) | (not GREEDY)
    seed = tl.load(seeds_ptr + item)
    item_key = mix32(mix32((seed >> 32).to(tl.uint32) ^ 0x9E3779B9) ^ seed.to(tl.uint32))
    pass_key = mix32(item_key + tl.cast(counter, tl.uint32) * 0x632BE5AB + 0x85EBCA6B)
    key_mask = tl.full((), 0xFFFFFFFF, tl.uint32) << (32 - KEY_BITS)

    v = tl.arange(0, BLOCK_V)
    v_ok = v < V
    for r in range(ROWS):
        p = block * ROWS + r
        row_ok = p < n_valid
        row = item * positions + p
        # (Masks combine by comparison, not `&` with a scalar, which the interpreter mistypes.)
        v_live = v < tl.where(row_ok, V, 0)
        x = tl.load(logits_ptr + row * V + v, mask=v_live, other=0.0).to(tl.float32)
        x = tl.where(x != x, float("-inf"), x)  # NaN logits lose, as in the reference
        x = tl.where(v_ok, x, -float("inf"))
        # keep-top: the largest key K with count(key >= K) >= keep is the keep-th largest value.
        key = tl.where(v_ok, _order_key(x) & key_mask, 0)
        kth = tl.zeros((), tl.uint32)
        for i in range(KEY_BITS):
            candidate = kth | (tl.full((), 1, tl.uint32) << (31 - i))
            kth = tl.where(tl.sum((key >= candidate).to(tl.int32), axis=0) >= keep, candidate, kth)
        greater = key > kth
        equal = key == kth
        need = keep - tl.sum(greater.to(tl.int32), axis=0)
        kept = greater | (equal & (tl.cumsum(equal.to(tl.int32), axis=0) <= need))

        if HAS_UNIFORM:
            u = tl.load(uniform_ptr + row * V + v, mask=v_live, other=0.5)
        else:
            row_key = mix32(pass_key ^ mix32(p.to(tl.uint32) + 0x27D4EB2F))
            bits = mix32(row_key + v.to(tl.uint32) * 0x165667B1)
            u = ((bits >> 9).to(tl.float32) + 0.5) * (1.0 / 8388608.0)  # 23 bits: u < 1 in float32
        gumbel = (-tl.log(-tl.log(u.to(tl.float64) + 1e-10) + 1e-10)).to(tl.float32)
        noisy = tl.where(kept, tl.math.div_rn(x, divisor) + gumbel, -float("inf"))
        best = tl.argmax(tl.where(sampled, noisy, x), axis=0, tie_break_left=True)

        x64 = x.to(tl.float64)
        e = tl.where(kept, tl.exp(x64 - tl.max(x64, axis=0)), 0.0)
        prob = tl.sum(tl.where(v == best, e, 0.0), axis=0) / tl.sum(e, axis=0)
        tl.store(conf_ptr + row, (1.0 - prob).to(tl.float32), mask=row_ok)
        is_open = tl.load(open_ptr + row, mask=row_ok, other=0) != 0
        tl.store(codes_ptr + row, best.to(tl.int64), mask=is_open)

    tl.debug_barrier()  # every thread's stores before the (single-thread, acq_rel) arrival
    ticket = tl.atomic_add(done_ptr + item, 1)
    if (ticket == tl.num_programs(0) - 1) & (count > 0):
        prompt_start = tl.load(prompt_ptr + item) * Q
        base = item * positions
        offs = tl.arange(0, SELECT_BLOCK)
        # The count-th largest confidence key, bit by bit, over the item's valid positions.
        kth = tl.zeros((), tl.uint32)
        for i in range(32):
            candidate = kth | (tl.full((), 1, tl.uint32) << (31 - i))
            above = tl.zeros((), tl.int32)
            for start in range(0, n_valid, SELECT_BLOCK):
                p = start + offs
                c = tl.load(conf_ptr + base + p, mask=p < n_valid, other=0.0, cache_modifier=".cg")
                above += tl.sum(((_order_key(c) >= candidate) & (p < n_valid)).to(tl.int32), axis=0)
            kth = tl.where(above >= count, candidate, kth)
        greater_total = tl.zeros((), tl.int32)
        for start in range(0, n_valid, SELECT_BLOCK):
            p = start + offs
            c = tl.load(conf_ptr + base + p, mask=p < n_valid, other=0.0, cache_modifier=".cg")
            greater_total += tl.sum(((_order_key(c) > kth) & (p < n_valid)).to(tl.int32), axis=0)
        need = count - greater_total
        equal_before = tl.zeros((), tl.int32)
        for start in range(0, n_valid, SELECT_BLOCK):
            p = start + offs
            ok = p < n_valid
            key = _order_key(tl.load(conf_ptr + base + p, mask=ok, other=0.0, cache_modifier=".cg"))
            equal = (key == kth) & ok
            chosen = (key > kth) | (equal & (equal_before + tl.cumsum(equal.to(tl.int32), axis=0) <= need))
            reopen = (chosen | (p % Q > level)) & (p >= prompt_start)
            tl.store(open_ptr + base + p, reopen, mask=ok)
            tl.store(codes_ptr + base + p, tl.full((SELECT_BLOCK,), 0, tl.int64) + V, mask=ok & reopen)
            equal_before += tl.sum(equal.to(tl.int32), axis=0)


def maskgit_step(logits, codes, open_mask, lengths, prompt_lengths, counts, seeds, uniform, confidence, done, *,
                 counter: int, divisor: float, greedy: bool, keep: int, level: int, rows: int = 4,
                 num_warps: int = 4, select_block: int = 4096) -> None:
    """Launches the fused step on checked, contiguous tensors (see ops.maskgit.maskgit_step)."""
    b, n, q = codes.shape
    positions, v = n * q, logits.shape[-1]
    if b == 0 or positions == 0:
        return
    grid = (triton.cdiv(positions, rows), b)
    _maskgit_step_kernel[grid](
        logits, codes, open_mask, lengths, prompt_lengths, counts, seeds,
        uniform if uniform is not None else confidence, confidence, done, positions, v, q, keep, level, counter,
        divisor, GREEDY=greedy, HAS_UNIFORM=uniform is not None, KEY_BITS=_KEY_BITS[logits.dtype], ROWS=rows,
        BLOCK_V=triton.next_power_of_2(v), SELECT_BLOCK=min(select_block, triton.next_power_of_2(positions)),
        num_warps=num_warps,
    )

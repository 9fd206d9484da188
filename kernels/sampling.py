"""Fused sampling (contract: anygpt_engine/ops/sampling.py) as one Triton kernel.

One program per row, looping over the vocabulary in BLOCK-wide chunks:
  1. logits -> repetition penalty -> masks (allowed ids, stop ids before min_new_tokens) ->
     scores s = x / temperature, written to a float32 scratch row; the running first-argmax
     gives the greedy token and the row maximum.
  2. top-k: the k-th largest score by a radix select on order-preserving uint32 keys of s,
     RADIX_BITS per pass (counts of each digit inside the current prefix window): no sort.
  3. top-p: the same digit search on the probability mass above each key (restricted to the
     top-k survivors); its first pass also sums the normaliser Z.
  4. Gumbel-max over the kept set with the counter-based noise of sampling.uniform_noise,
     computed in-kernel with uint32 arithmetic (bit-exact), then the state updates.
The kept set is {s >= threshold}: ties at the top-k and top-p boundaries are all kept.
No host sync; every branch is on device values inside the program.
"""

import triton
import triton.language as tl

from anygpt_engine.kernels.common import mix32


@triton.jit
def _sample_kernel(logits_ptr, logits_stride, slots_ptr, out_ptr, scratch_ptr,
                   temperature_ptr, top_k_ptr, top_p_ptr, penalty_ptr, min_new_ptr, seeds_ptr, generated_ptr,
                   open_ptr, stop_ptr, seen_ptr, allowed_ptr, opens_ptr, closes_ptr, warped_ptr, noise_ptr,
                   num_slots, num_states, V, RANDOM: tl.constexpr, TOP_K: tl.constexpr, TOP_P: tl.constexpr,
                   PENALTY: tl.constexpr, BLOCK: tl.constexpr, RADIX_BITS: tl.constexpr, DEBUG: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    slot = tl.load(slots_ptr + row)
    valid = (slot >= 0) & (slot < num_slots)
    slot = tl.where(valid, slot, 0)  # an invalid row reads slot 0 (memory-safe), writes -1 and no state
    temperature = tl.load(temperature_ptr + slot)
    generated = tl.load(generated_ptr + slot)
    suppress_stop = generated < tl.load(min_new_ptr + slot)
    state = tl.load(open_ptr + slot)
    state = tl.minimum(tl.maximum(state, 0), num_states - 1)
    if RANDOM:
        sampled = temperature != 0.0
        divisor = tl.where(sampled, temperature, 1.0)
    if PENALTY:
        penalty = tl.load(penalty_ptr + slot)

    offs = tl.arange(0, BLOCK).to(tl.int64)  # (int64: the interpreter overflow-checks int32 math)
    scratch_row = scratch_ptr + row * V
    seen_row = seen_ptr + slot * V
    stop_row = stop_ptr + slot * V
    # -- pass 1: penalty, masks, scores; first argmax (greedy token, row max) -------------------
    row_max = tl.full((), -float("inf"), tl.float32)
    token = tl.zeros((), tl.int32)
    for start in range(0, V, BLOCK):
        v = start + offs
        ok = v < V
        x = tl.load(logits_ptr + row * logits_stride + v, mask=ok, other=0.0)
        x = tl.where(x != x, -float("inf"), x)  # NaN reads as -inf
        if PENALTY:
            seen = tl.load(seen_row + v, mask=ok, other=0) != 0
            x = tl.where(seen, tl.where(x < 0, x * penalty, tl.math.div_rn(x, penalty)), x)
        allowed = tl.load(allowed_ptr + state * V + v, mask=ok, other=0) != 0
        # (Vector masks combine with a scalar condition by comparison, not `&`, which the
        # interpreter mistypes.)
        stop = tl.load(stop_row + v, mask=v < tl.where(suppress_stop, V, 0), other=0) != 0
        x = tl.where(allowed & ~stop & ok, x, -float("inf"))
        if RANDOM:
            s = tl.math.div_rn(x, divisor)
            tl.store(scratch_row + v, s, mask=v < tl.where(sampled, V, 0))
        else:
            s = x
        # Running first argmax: earlier chunks win ties, and an all -inf row gives index 0, as
        # torch.argmax does. (Helpers are inlined in the loops: the CPU interpreter re-patches
        # triton.language on every device-function call.)
        chunk_max, chunk_index = tl.max(s, axis=0, return_indices=True, return_indices_tie_break_left=True)
        token = tl.where(chunk_max > row_max, start + chunk_index, token)
        row_max = tl.maximum(chunk_max, row_max)

    if RANDOM:
        if sampled:
            NB: tl.constexpr = 1 << RADIX_BITS
            bins = tl.arange(0, NB)
            # Order-preserving uint32 keys: -0.0 becomes +0.0 (they compare equal), then negative
            # floats have all bits flipped and positive ones the sign bit set.
            top_bits = row_max.to(tl.uint32, bitcast=True)
            top_bits = tl.where(top_bits == 0x80000000, 0, top_bits)
            top_key = tl.where((top_bits >> 31) != 0, ~top_bits, top_bits | 0x80000000)
            threshold = tl.zeros((), tl.uint32)
            # -- top-k: the largest key K with count(key >= K) >= k ---------------------------
            # Digit by digit from the top: `prefix` holds the decided bits (`window` marks them);
            # ge[d] counts the keys inside the window whose next digit is >= d.
            if TOP_K:
                k = tl.load(top_k_ptr + slot)
                if (k > 0) & (k < V):
                    remaining = k.to(tl.int32)  # k minus the keys above the window
                    prefix = tl.zeros((), tl.uint32)
                    window = tl.zeros((), tl.uint32)
                    for step in tl.static_range(32 // RADIX_BITS):
                        shift = 32 - RADIX_BITS * (step + 1)  # (a constexpr may not be re-bound per step)
                        ge = tl.zeros((NB,), tl.int32)
                        for start in range(0, V, BLOCK):
                            v = start + offs
                            bits = tl.load(scratch_row + v, mask=v < V, other=0.0).to(tl.uint32, bitcast=True)
                            bits = tl.where(bits == 0x80000000, 0, bits)
                            key = tl.where((bits >> 31) != 0, ~bits, bits | 0x80000000)
                            # outside the window or past V: digit -1, counted nowhere
                            digit = tl.where((v < V) & ((key & window) == prefix),
                                             ((key >> shift) & (NB - 1)).to(tl.int32), -1)
                            ge += tl.sum((digit[:, None] >= bins[None, :]).to(tl.int32), axis=0)
                        d = tl.max(tl.where(ge >= remaining, bins, 0), axis=0)
                        remaining -= tl.sum(tl.where(bins == d + 1, ge, 0), axis=0)
                        prefix = prefix | (d.to(tl.uint32) << shift)
                        window = window | (tl.full((), NB - 1, tl.uint32) << shift)
                    threshold = prefix
            # -- top-p: the largest key K with mass(key >= K) >= top_p * Z, over the top-k set ---
            if TOP_P:
                top_p = tl.load(top_p_ptr + slot)
                if (top_p < 1.0) & (row_max > -float("inf")) & (row_max < float("inf")):
                    need = tl.zeros((), tl.float32)  # top_p * Z, Z summed by the first pass
                    above = tl.zeros((), tl.float32)  # mass of the keys above the window
                    prefix = tl.zeros((), tl.uint32)
                    window = tl.zeros((), tl.uint32)
                    for step in tl.static_range(32 // RADIX_BITS):
                        shift = 32 - RADIX_BITS * (step + 1)  # (a constexpr may not be re-bound per step)
                        ge = tl.zeros((NB,), tl.float32)
                        for start in range(0, V, BLOCK):
                            v = start + offs
                            s = tl.load(scratch_row + v, mask=v < V, other=0.0)
                            bits = s.to(tl.uint32, bitcast=True)
                            bits = tl.where(bits == 0x80000000, 0, bits)
                            key = tl.where((bits >> 31) != 0, ~bits, bits | 0x80000000)
                            digit = tl.where((v < V) & (key >= threshold) & ((key & window) == prefix),
                                             ((key >> shift) & (NB - 1)).to(tl.int32), -1)
                            weight = tl.exp(s - row_max)
                            ge += tl.sum(tl.where(digit[:, None] >= bins[None, :], weight[:, None], 0.0), axis=0)
                        if step == 0:
                            need = top_p * tl.max(ge, axis=0)  # ge[0] = Z
                        d = tl.max(tl.where(above + ge >= need, bins, 0), axis=0)
                        above += tl.sum(tl.where(bins == d + 1, ge, 0.0), axis=0)
                        prefix = prefix | (d.to(tl.uint32) << shift)
                        window = window | (tl.full((), NB - 1, tl.uint32) << shift)
                    threshold = tl.maximum(threshold, prefix)
            threshold = tl.minimum(threshold, top_key)  # the row maximum is always kept
            # -- Gumbel-max over the kept set, noise keyed by (seed, generated, token id) --------
            seed = tl.load(seeds_ptr + slot)
            row_key = mix32(mix32(seed.to(tl.uint32) ^ 0x9E3779B9) + generated.to(tl.uint32) * 0x632BE5AB
                             + 0x85EBCA6B)  # once per row; the per-token mixes below are inlined
            best = tl.full((), -float("inf"), tl.float32)
            for start in range(0, V, BLOCK):
                v = start + offs
                s = tl.load(scratch_row + v, mask=v < V, other=0.0)
                bits = s.to(tl.uint32, bitcast=True)
                bits = tl.where(bits == 0x80000000, 0, bits)
                key = tl.where((bits >> 31) != 0, ~bits, bits | 0x80000000)
                h = v.to(tl.uint32) + 0x27D4EB2F  # mix32(row_key ^ mix32(v + 0x27D4EB2F))
                h = (h ^ (h >> 16)) * 0x7FEB352D
                h = (h ^ (h >> 15)) * 0x846CA68B
                h = (h ^ (h >> 16)) ^ row_key
                h = (h ^ (h >> 16)) * 0x7FEB352D
                h = (h ^ (h >> 15)) * 0x846CA68B
                h = h ^ (h >> 16)
                u = ((h >> 9).to(tl.float32) + 0.5) * (1.0 / 8388608.0)  # sampling.unit_interval
                kept = (v < V) & (key >= threshold)
                noisy = tl.where(kept, s + -tl.log(-tl.log(u)), -float("inf"))
                if DEBUG:  # tests: the warped scores (-inf where dropped) and the noise
                    tl.store(warped_ptr + row * V + v, tl.where(kept, s, -float("inf")), mask=v < V)
                    tl.store(noise_ptr + row * V + v, u, mask=v < V)
                chunk_max, chunk_index = tl.max(noisy, axis=0, return_indices=True,
                                                return_indices_tie_break_left=True)
                token = tl.where(chunk_max > best, start + chunk_index, token)
                best = tl.maximum(chunk_max, best)

    # -- state updates: seen, open modality, generated ----------------------------------------
    tl.store(out_ptr + row, tl.where(valid, token.to(tl.int64), -1))
    tl.store(seen_row + token, tl.full((), 1, tl.uint8), mask=valid)
    opened = tl.load(opens_ptr + token)
    closed = token.to(tl.int64) == tl.load(closes_ptr + state)
    tl.store(open_ptr + slot, tl.where(opened >= 0, opened, tl.where(closed, 0, state)), mask=valid)
    tl.store(generated_ptr + slot, generated + 1, mask=valid)


def sample(logits, slots, out, scratch, temperature, top_k, top_p, penalty, min_new_tokens, seeds, generated,
           open_modality, stop_mask, seen, allowed, opens, closes, *, random: bool, use_top_k: bool,
           use_top_p: bool, use_penalty: bool, block: int = 1024, radix_bits: int = 4, num_warps: int = 8,
           debug_warped=None, debug_noise=None) -> None:
    """Launches one program per row on checked tensors (see ops.sampling.sample_tokens); bool
    tensors arrive viewed as uint8. Tests may pass float32 [B, V] `debug_warped` and
    `debug_noise` to receive the sampled rows' warped scores and uniform noise."""
    rows, vocab = logits.shape
    if rows == 0:
        return
    if radix_bits not in (1, 2, 4, 8):
        raise ValueError(f"radix_bits={radix_bits}, expected 1, 2, 4 or 8 (a divisor of 32)")
    _sample_kernel[(rows,)](
        logits, logits.stride(0), slots, out, scratch, temperature, top_k, top_p, penalty, min_new_tokens, seeds,
        generated, open_modality, stop_mask, seen, allowed, opens, closes,
        debug_warped if debug_warped is not None else scratch, debug_noise if debug_noise is not None else scratch,
        seen.shape[0], allowed.shape[0], vocab, RANDOM=random, TOP_K=use_top_k, TOP_P=use_top_p, PENALTY=use_penalty,
        BLOCK=min(block, triton.next_power_of_2(vocab), (1 << 20) >> radix_bits), RADIX_BITS=radix_bits,
        DEBUG=debug_warped is not None, num_warps=num_warps,
    )

// SoundStorm's MaskGIT step as one raw-pointer CUDA kernel (contract: anygpt_engine/ops/maskgit.py).
//
// Grid (row blocks, items). Each warp takes whole positions: a codebook row lives in its registers
// (kPerLane values per lane, V <= 1024), the keep-top set is found by a bitwise threshold search on
// order-preserving keys (no sort), then Gumbel noise, argmax and confidence. The block that arrives
// last at the item's counter (threadfence + atomic, so every confidence is visible) selects the
// item's c least confident positions by an 8-bit radix select over the positions, ties to the
// lowest position through a block-wide ordered count, and re-masks them. One launch, no host sync.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "anygpt/cuda_float.cuh"

namespace anygpt {
namespace maskgit {

constexpr unsigned kFullMask = 0xffffffffu;

// Significant bits of a float32 key: widened bf16 / fp16 values have zero low bits.
template <typename T> struct KeyBits { static constexpr int value = 32; };
template <> struct KeyBits<__nv_bfloat16> { static constexpr int value = 16; };
template <> struct KeyBits<__half> { static constexpr int value = 19; };

__device__ __forceinline__ uint32_t mix32(uint32_t x) {  // lowbias32, twin of ops.maskgit._mix32
  x = (x ^ (x >> 16)) * 0x7FEB352Du;
  x = (x ^ (x >> 15)) * 0x846CA68Bu;
  return x ^ (x >> 16);
}

// float -> uint32 with the same order; -0.0 is canonicalised to +0.0 first.
__device__ __forceinline__ uint32_t order_key(float x) {
  const uint32_t bits = __float_as_uint(x + 0.0f);
  return (bits >> 31) ? ~bits : (bits | 0x80000000u);
}

__device__ __forceinline__ unsigned lanes_below() {
  unsigned mask;
  asm("mov.u32 %0, %%lanemask_lt;" : "=r"(mask));
  return mask;
}

__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, offset));
  return v;
}

struct Args {
  int64_t* codes;            // [B, L]
  uint8_t* open;             // [B, L] bool
  float* confidence;         // [B, L] workspace
  int* done;                 // [B] arrival counters, zero on entry
  const float* uniform;      // [B, L, V] or null: the counter-based hash
  const int64_t* lengths;    // [B] valid frames
  const int64_t* prompt;     // [B] protected frames
  const int64_t* counts;     // [B] positions to re-mask
  const int64_t* seeds;      // [B]
  int64_t positions;         // L = frames * levels
  int levels, codebook, keep, level, rows_per_warp;
  uint32_t counter;
  float divisor;             // max(temperature, 1e-10)
  bool greedy;
};

// One position (row) of one item, processed by one warp; lane 0 writes the results.
template <typename T, int kPerLane>
__device__ __forceinline__ void step_row(const T* __restrict__ logits, const Args& a, int64_t item, int64_t p,
                                         uint32_t pass_key, bool sampled) {
  const int lane = threadIdx.x % 32;
  const int64_t row = item * a.positions + p;
  const T* x_row = logits + row * a.codebook;
  constexpr uint32_t key_mask = 0xffffffffu << (32 - KeyBits<T>::value);
  float x[kPerLane];
  uint32_t key[kPerLane];
#pragma unroll
  for (int j = 0; j < kPerLane; ++j) {
    const int v = j * 32 + lane;
    const float value = v < a.codebook ? to_float(x_row[v]) : -INFINITY;
    x[j] = value != value ? -INFINITY : value;  // NaN logits lose, as in the reference
    key[j] = v < a.codebook ? (order_key(x[j]) & key_mask) : 0u;
  }
  // keep-top: the largest K with count(key >= K) >= keep is the keep-th largest key.
  uint32_t kth = 0;
  for (int bit = 31; bit >= 32 - KeyBits<T>::value; --bit) {
    const uint32_t candidate = kth | (1u << bit);
    int count = 0;
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) count += key[j] >= candidate;
    if (static_cast<int>(__reduce_add_sync(kFullMask, static_cast<unsigned>(count))) >= a.keep) kth = candidate;
  }
  int greater = 0;
#pragma unroll
  for (int j = 0; j < kPerLane; ++j) greater += key[j] > kth;
  const int need = a.keep - static_cast<int>(__reduce_add_sync(kFullMask, static_cast<unsigned>(greater)));
  bool kept[kPerLane];
  int equal_before = 0;  // ties in value order of the code index: j-major, then lane
#pragma unroll
  for (int j = 0; j < kPerLane; ++j) {
    const bool equal = key[j] == kth;  // never an unused lane: its key 0 is below every value's
    const unsigned ballot = __ballot_sync(kFullMask, equal);
    kept[j] = key[j] > kth || (equal && equal_before + __popc(ballot & lanes_below()) < need);
    equal_before += __popc(ballot);
  }

  float x_max = -INFINITY;
#pragma unroll
  for (int j = 0; j < kPerLane; ++j) x_max = fmaxf(x_max, x[j]);
  x_max = warp_max(x_max);
  uint32_t row_key = 0;
  if (a.uniform == nullptr) row_key = mix32(pass_key ^ mix32(static_cast<uint32_t>(p) + 0x27D4EB2Fu));
  float best = -INFINITY;
  int best_v = a.codebook;
  double e[kPerLane];
  double denom = 0.0;
#pragma unroll
  for (int j = 0; j < kPerLane; ++j) {
    const int v = j * 32 + lane;
    e[j] = kept[j] ? exp(static_cast<double>(x[j]) - static_cast<double>(x_max)) : 0.0;
    denom += e[j];
    float y = x[j];
    if (sampled) {
      y = -INFINITY;
      if (kept[j]) {
        float u;
        if (a.uniform != nullptr) {
          u = a.uniform[row * a.codebook + v];
        } else {
          const uint32_t bits = mix32(row_key + static_cast<uint32_t>(v) * 0x165667B1u);
          // 23 bits: with 24 the top value rounds to 1.0f and the Gumbel noise becomes NaN.
          u = (static_cast<float>(bits >> 9) + 0.5f) * (1.0f / 8388608.0f);
        }
        const float gumbel = static_cast<float>(-log(-log(static_cast<double>(u) + 1e-10) + 1e-10));
        y = __fdiv_rn(x[j], a.divisor) + gumbel;
      }
    }
    if (v < a.codebook && (y > best || (y == best && v < best_v))) {
      best = y;
      best_v = v;
    }
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {  // argmax, ties to the lowest code
    const float other = __shfl_xor_sync(kFullMask, best, offset);
    const int other_v = __shfl_xor_sync(kFullMask, best_v, offset);
    if (other > best || (other == best && other_v < best_v)) {
      best = other;
      best_v = other_v;
    }
  }
  double e_best = 0.0;
#pragma unroll
  for (int j = 0; j < kPerLane; ++j) e_best += (j * 32 + lane == best_v) ? e[j] : 0.0;
  e_best = warp_sum(e_best);
  denom = warp_sum(denom);
  if (lane == 0) {
    a.confidence[row] = static_cast<float>(1.0 - e_best / denom);
    if (a.open[row]) a.codes[row] = best_v;
  }
}

// The block that finishes an item last: picks the `count` highest confidences among the item's
// valid positions (ties to the lowest position) and re-masks them with levels above `level`.
__device__ __forceinline__ void select_and_remask(const Args& a, int64_t item, int64_t n_valid, int64_t count) {
  __shared__ unsigned hist[256];
  __shared__ int warp_counts[32];
  __shared__ uint32_t s_prefix;
  __shared__ int64_t s_remaining;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32, warps = blockDim.x / 32;
  const float* conf = a.confidence + item * a.positions;
  uint32_t kth = 0;
  int64_t need = 0;  // how many keys equal to kth are chosen, lowest positions first
  if (count < n_valid) {
    uint32_t prefix = 0, known = 0;
    int64_t remaining = count;  // rank of the wanted key among keys matching the prefix
    for (int shift = 24; shift >= 0; shift -= 8) {
      for (int i = tid; i < 256; i += blockDim.x) hist[i] = 0;
      __syncthreads();
      for (int64_t i = tid; i < n_valid; i += blockDim.x) {
        const uint32_t key = order_key(__ldcg(conf + i));
        if ((key & known) == prefix) atomicAdd(&hist[(key >> shift) & 255u], 1u);
      }
      __syncthreads();
      if (warp == 0) {  // lane l holds digits 255-8l down to 248-8l; find where the count is reached
        unsigned lane_total = 0;
        for (int d = 0; d < 8; ++d) lane_total += hist[255 - 8 * lane - d];
        unsigned inclusive = lane_total;
        for (int offset = 1; offset < 32; offset <<= 1) {
          const unsigned up = __shfl_up_sync(kFullMask, inclusive, offset);
          if (lane >= offset) inclusive += up;
        }
        const unsigned reached = __ballot_sync(kFullMask, inclusive >= remaining);
        if (lane == __ffs(reached) - 1) {
          int64_t above = inclusive - lane_total;
          int digit = 255 - 8 * lane;
          while (above + hist[digit] < remaining) above += hist[digit--];
          s_prefix = prefix | (static_cast<uint32_t>(digit) << shift);
          s_remaining = remaining - above;
        }
      }
      __syncthreads();
      prefix = s_prefix;
      remaining = s_remaining;
      known |= 255u << shift;
      __syncthreads();  // hist and the shared results are reused by the next digit
    }
    kth = prefix;
    need = remaining;
  }
  const int64_t prompt_start = a.prompt[item] * a.levels;
  int64_t equal_before = 0;
  for (int64_t start = 0; start < n_valid; start += blockDim.x) {
    const int64_t i = start + tid;
    const bool ok = i < n_valid;
    const uint32_t key = ok ? order_key(__ldcg(conf + i)) : 0u;
    const bool equal = ok && key == kth;
    const unsigned ballot = __ballot_sync(kFullMask, equal);
    if (lane == 0) warp_counts[warp] = __popc(ballot);
    __syncthreads();
    int64_t rank = equal_before + __popc(ballot & lanes_below());
    int64_t chunk_equal = 0;
    for (int w = 0; w < warps; ++w) {
      if (w < warp) rank += warp_counts[w];
      chunk_equal += warp_counts[w];
    }
    if (ok) {
      const bool chosen = key > kth || (equal && rank < need);
      const bool reopen = (chosen || i % a.levels > a.level) && i >= prompt_start;
      const int64_t at = item * a.positions + i;
      a.open[at] = reopen;
      if (reopen) a.codes[at] = a.codebook;
    }
    equal_before += chunk_equal;
    __syncthreads();  // warp_counts is rewritten by the next chunk
  }
}

// Up to 128 registers per thread (32 values per lane): blocks of at most 256 threads always fit.
constexpr int kMaxThreads = 256;

template <typename T, int kPerLane>
__global__ void __launch_bounds__(kMaxThreads) step_kernel(const T* __restrict__ logits, Args a) {
  __shared__ bool last;
  const int64_t item = blockIdx.y;
  const int warps = blockDim.x / 32, warp = threadIdx.x / 32;
  const int64_t n_valid = min(a.lengths[item], a.positions / a.levels) * a.levels;
  const int64_t count = a.counts[item];
  const bool sampled = count > 0 || !a.greedy;
  const uint64_t seed = static_cast<uint64_t>(a.seeds[item]);
  const uint32_t item_key = mix32(mix32(static_cast<uint32_t>(seed >> 32) ^ 0x9E3779B9u) ^ static_cast<uint32_t>(seed));
  const uint32_t pass_key = mix32(item_key + a.counter * 0x632BE5ABu + 0x85EBCA6Bu);
  const int64_t first = static_cast<int64_t>(blockIdx.x) * warps * a.rows_per_warp;
  for (int r = 0; r < a.rows_per_warp; ++r) {
    const int64_t p = first + static_cast<int64_t>(r) * warps + warp;  // warps interleave: coalesced writes
    if (p < n_valid) step_row<T, kPerLane>(logits, a, item, p, pass_key, sampled);
  }
  __threadfence();  // this block's confidences and codes before its arrival
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(a.done + item, 1) == static_cast<int>(gridDim.x) - 1;
  __syncthreads();
  if (!last || count <= 0) return;
  __threadfence();
  select_and_remask(a, item, n_valid, count);
}

}  // namespace maskgit
}  // namespace anygpt

// Fused sampling (contract: anygpt_engine/ops/sampling.py and anygpt_sample_tokens_cuda in c_api.h)
// as a raw-pointer CUDA kernel template. One block per row:
//   pass 1   logits -> repetition penalty -> masks -> scores s = x / temperature, written to a
//            float32 scratch row (L2-resident for the passes below); block first-argmax gives
//            the greedy token and the row maximum.
//   top-k    radix select of the k-th largest order-preserving uint32 key, 4 bits per pass:
//            every thread counts, in registers, the keys of the current prefix window whose
//            next digit is >= d (d = 0..15), then one block reduction (no atomics, no sort).
//            As soon as the keys >= the running lower bound fit in shared memory (at most
//            kCandidates; top-k 50..200 after two or three passes), they are compacted there
//            and every later pass (the rest of top-k, top-p, the draw) runs on shared memory.
//   top-p    the same digit search on the softmax mass above each key (restricted to the
//            top-k survivors); its first pass also sums the normaliser Z.
//   draw     Gumbel-max over the kept set {s >= threshold} with the counter-based noise of
//            sampling.uniform_noise (same uint32 hash, bit for bit); tokens that cannot win
//            even with the largest noise are skipped without computing it.
//   state    seen[slot, token] = 1, open modality advanced, generated += 1, out[row] = token.
// No host sync, fixed launch shape: safe inside a CUDA graph.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace anygpt {
namespace sampling {

constexpr int kDigitBits = 4;
constexpr int kBins = 1 << kDigitBits;
constexpr int kPasses = 32 / kDigitBits;
constexpr int kCandidates = 4096;  // shared-memory candidate list: 32 KiB of (score, token id)
constexpr int kNoIndex = 0x7fffffff;
// Bounds of the Gumbel noise -log(-log(u)) for u in [2^-24, 1 - 2^-24]: [-2.8115, 16.6355].
constexpr float kGumbelMin = -2.9f;
constexpr float kGumbelMax = 16.7f;

struct Args {
  const float* logits;
  int64_t logits_row_stride;
  const int64_t* slots;
  int64_t* out;
  float* scratch;  // [batch, vocab]; unused (may be null) when !random
  const float* temperature;
  const int64_t* top_k;
  const float* top_p;
  const float* repetition_penalty;
  const int64_t* min_new_tokens;
  const int64_t* seeds;
  int64_t* generated;
  int64_t* open_modality;
  const uint8_t* stop_mask;  // [num_slots, vocab] bool bytes
  uint8_t* seen;             // [num_slots, vocab] bool bytes
  const uint8_t* allowed;    // [num_states, vocab] bool bytes
  const int64_t* opens;      // [vocab]
  const int64_t* closes;     // [num_states]
  int64_t num_slots;
  int64_t num_states;
  int64_t vocab;
  bool random, use_top_k, use_top_p, use_penalty;
};

// lowbias32, products mod 2^32: sampling._hash32's twin.
__device__ __forceinline__ uint32_t mix32(uint32_t x) {
  x = (x ^ (x >> 16)) * 0x7FEB352Du;
  x = (x ^ (x >> 15)) * 0x846CA68Bu;
  return x ^ (x >> 16);
}

// float -> uint32 with the same order; -0.0 is canonicalised to +0.0 (they compare equal).
__device__ __forceinline__ uint32_t order_key(float x) {
  uint32_t bits = __float_as_uint(x);
  if (bits == 0x80000000u) bits = 0u;
  return (bits >> 31) ? ~bits : (bits | 0x80000000u);
}

// Gumbel noise of token v: -log(-log(u)), u = sampling.unit_interval(hash(row_key, v)).
__device__ __forceinline__ float gumbel(uint32_t row_key, int64_t v) {
  const uint32_t bits = mix32(row_key ^ mix32(static_cast<uint32_t>(v) + 0x27D4EB2Fu));
  const float u = (static_cast<float>(bits >> 9) + 0.5f) * (1.0f / 8388608.0f);
  return -logf(-logf(u));
}

__device__ __forceinline__ bool better(float value, int index, float best, int best_index) {
  return value > best || (value == best && index < best_index);
}

// Block-wide first argmax: the largest value, the lowest index among equals. `sv`/`si` hold
// one entry per warp. All threads return the result.
template <int kThreads>
__device__ __forceinline__ void block_argmax(float& value, int& index, float* sv, int* si) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const float other = __shfl_xor_sync(0xffffffffu, value, offset);
    const int other_index = __shfl_xor_sync(0xffffffffu, index, offset);
    if (better(other, other_index, value, index)) value = other, index = other_index;
  }
  if (lane == 0) sv[warp] = value, si[warp] = index;
  __syncthreads();
  if (warp == 0) {
    value = lane < kThreads / 32 ? sv[lane] : -INFINITY;
    index = lane < kThreads / 32 ? si[lane] : kNoIndex;
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
      const float other = __shfl_xor_sync(0xffffffffu, value, offset);
      const int other_index = __shfl_xor_sync(0xffffffffu, index, offset);
      if (better(other, other_index, value, index)) value = other, index = other_index;
    }
    if (lane == 0) sv[0] = value, si[0] = index;
  }
  __syncthreads();
  value = sv[0];
  index = si[0];
  __syncthreads();  // sv/si may be reused right after
}

// Sums kBins per-thread values over the block into `total` (shared, kBins entries), in a fixed
// order (deterministic). `partial` holds kThreads / 32 * kBins entries.
template <int kThreads, typename T>
__device__ __forceinline__ void block_sum_bins(T (&values)[kBins], T* partial, T* total) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int d = 0; d < kBins; ++d) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) values[d] += __shfl_xor_sync(0xffffffffu, values[d], offset);
  }
  if (lane == 0) {
#pragma unroll
    for (int d = 0; d < kBins; ++d) partial[warp * kBins + d] = values[d];
  }
  __syncthreads();
  if (threadIdx.x < kBins) {
    T sum = 0;
    for (int w = 0; w < kThreads / 32; ++w) sum += partial[w * kBins + threadIdx.x];
    total[threadIdx.x] = sum;
  }
  __syncthreads();
}

// The scores a pass reads: the row in global scratch, or the shared candidate list.
struct Source {
  const float* row;       // global scores [vocab] when count < 0
  const float* cand_s;    // shared scores
  const int* cand_v;      // shared token ids
  int count;              // candidates in shared memory, or -1
  int64_t vocab;
  __device__ __forceinline__ int64_t size() const { return count < 0 ? vocab : count; }
  __device__ __forceinline__ float score(int64_t i) const { return count < 0 ? __ldcg(row + i) : cand_s[i]; }
  __device__ __forceinline__ int64_t token(int64_t i) const { return count < 0 ? i : cand_v[i]; }
};

template <int kThreads>
__global__ void __launch_bounds__(kThreads) sample_kernel(Args a) {
  __shared__ float cand_s[kCandidates];
  __shared__ int cand_v[kCandidates];
  __shared__ float red_v[32];
  __shared__ int red_i[32];
  __shared__ union {
    int count[32 * kBins];
    float mass[32 * kBins];
  } partial;
  __shared__ int count_total[kBins];
  __shared__ float mass_total[kBins];
  __shared__ int cand_count;
  __shared__ int warp_taken[kThreads / 32];

  const int64_t row = blockIdx.x;
  const int64_t vocab = a.vocab;
  int64_t slot = a.slots[row];
  const bool valid = slot >= 0 && slot < a.num_slots;
  if (!valid) slot = 0;  // read slot 0 (memory-safe), write -1 and no state
  const float temperature = a.temperature[slot];
  const int64_t generated = a.generated[slot];
  const bool suppress_stop = generated < a.min_new_tokens[slot];
  int64_t state = a.open_modality[slot];
  state = state < 0 ? 0 : (state >= a.num_states ? a.num_states - 1 : state);
  const bool sampled = a.random && temperature != 0.0f;
  const float divisor = sampled ? temperature : 1.0f;
  const float penalty = a.use_penalty ? a.repetition_penalty[slot] : 1.0f;

  const float* __restrict__ x_row = a.logits + row * a.logits_row_stride;
  float* __restrict__ s_row = sampled ? a.scratch + row * vocab : nullptr;
  const uint8_t* __restrict__ seen_row = a.seen + slot * vocab;
  const uint8_t* __restrict__ stop_row = a.stop_mask + slot * vocab;
  const uint8_t* __restrict__ allowed_row = a.allowed + state * vocab;

  // -- pass 1: penalty, masks, scores; first argmax ------------------------------------------
  constexpr int kUnroll = 4;
  float best = -INFINITY;
  int best_index = kNoIndex;
  for (int64_t base = 0; base < vocab; base += static_cast<int64_t>(kThreads) * kUnroll) {
    float x[kUnroll];
    uint8_t keep[kUnroll], seen[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t v = base + static_cast<int64_t>(u) * kThreads + threadIdx.x;
      const bool ok = v < vocab;
      x[u] = ok ? x_row[v] : 0.0f;
      keep[u] = ok ? (allowed_row[v] && !(suppress_stop && stop_row[v])) : 0;
      seen[u] = ok && a.use_penalty ? seen_row[v] : 0;
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t v = base + static_cast<int64_t>(u) * kThreads + threadIdx.x;
      if (v >= vocab) continue;
      float value = x[u];
      if (value != value) value = -INFINITY;  // NaN reads as -inf
      if (seen[u]) value = value < 0.0f ? value * penalty : value / penalty;
      if (!keep[u]) value = -INFINITY;
      const float s = sampled ? value / divisor : value;
      if (sampled) s_row[v] = s;
      if (s > best) best = s, best_index = static_cast<int>(v);  // v rises: first max per thread
    }
  }
  block_argmax<kThreads>(best, best_index, red_v, red_i);
  int token = best_index == kNoIndex ? 0 : best_index;  // an all -inf row gives 0, like torch.argmax
  const float row_max = best;

  if (sampled) {
    Source src{s_row, cand_s, cand_v, -1, vocab};
    uint32_t threshold = 0;
    // -- top-k: the largest key K with count(key >= K) >= k ----------------------------------
    const int64_t k = a.use_top_k ? a.top_k[slot] : 0;
    if (k > 0 && k < vocab) {
      uint32_t prefix = 0, window = 0;
      int64_t above = 0;  // keys above the window (all kept)
      for (int step = 0; step < kPasses; ++step) {
        const int shift = 32 - kDigitBits * (step + 1);
        int ge[kBins];
#pragma unroll
        for (int d = 0; d < kBins; ++d) ge[d] = 0;
        for (int64_t i = threadIdx.x; i < src.size(); i += kThreads) {
          const uint32_t key = order_key(src.score(i));
          if ((key & window) != prefix) continue;
          const int digit = static_cast<int>((key >> shift) & (kBins - 1));
#pragma unroll
          for (int d = 0; d < kBins; ++d) ge[d] += digit >= d;
        }
        block_sum_bins<kThreads>(ge, partial.count, count_total);
        int d = kBins - 1;
        while (d > 0 && above + count_total[d] < k) --d;
        const int64_t lower_count = above + count_total[d];  // keys >= the new lower bound
        above += d + 1 < kBins ? count_total[d + 1] : 0;
        prefix |= static_cast<uint32_t>(d) << shift;
        window |= static_cast<uint32_t>(kBins - 1) << shift;
        if (src.count < 0 && step + 1 < kPasses && lower_count <= kCandidates) {
          // Compact the keys >= prefix (every later survivor) into shared memory.
          // Candidates land in vocabulary order (a scan over the warps, no atomics), so the
          // float sums of top-p below add them in the same order on every call and replay.
          if (threadIdx.x == 0) cand_count = 0;
          __syncthreads();
          const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
          for (int64_t base = 0; base < vocab; base += kThreads) {
            const int64_t v = base + threadIdx.x;
            const float s = v < vocab ? __ldcg(s_row + v) : -INFINITY;
            const bool take = v < vocab && order_key(s) >= prefix;
            const unsigned ballot = __ballot_sync(0xffffffffu, take);
            if (lane == 0) warp_taken[warp] = __popc(ballot);
            __syncthreads();
            if (take) {
              int at = cand_count + __popc(ballot & ((1u << lane) - 1u));
              for (int w = 0; w < warp; ++w) at += warp_taken[w];
              cand_s[at] = s;
              cand_v[at] = static_cast<int>(v);
            }
            __syncthreads();
            if (threadIdx.x == 0) {
              for (int w = 0; w < kThreads / 32; ++w) cand_count += warp_taken[w];
            }
            __syncthreads();
          }
          src.count = cand_count;
        }
      }
      threshold = prefix;
    }
    // -- top-p: the largest key K with mass(key >= K) >= top_p * Z, over the top-k set -------
    const float top_p = a.use_top_p ? a.top_p[slot] : 1.0f;
    if (top_p < 1.0f && row_max > -INFINITY && row_max < INFINITY) {
      uint32_t prefix = 0, window = 0;
      float need = 0.0f, above = 0.0f;
      for (int step = 0; step < kPasses; ++step) {
        const int shift = 32 - kDigitBits * (step + 1);
        float ge[kBins];
#pragma unroll
        for (int d = 0; d < kBins; ++d) ge[d] = 0.0f;
        for (int64_t i = threadIdx.x; i < src.size(); i += kThreads) {
          const float s = src.score(i);
          const uint32_t key = order_key(s);
          if (key < threshold || (key & window) != prefix) continue;
          const int digit = static_cast<int>((key >> shift) & (kBins - 1));
          const float weight = expf(s - row_max);
#pragma unroll
          for (int d = 0; d < kBins; ++d) ge[d] += digit >= d ? weight : 0.0f;
        }
        block_sum_bins<kThreads>(ge, partial.mass, mass_total);
        if (step == 0) need = top_p * mass_total[0];  // top_p * Z
        int d = kBins - 1;
        while (d > 0 && !(above + mass_total[d] >= need)) --d;
        above += d + 1 < kBins ? mass_total[d + 1] : 0.0f;
        prefix |= static_cast<uint32_t>(d) << shift;
        window |= static_cast<uint32_t>(kBins - 1) << shift;
      }
      threshold = threshold > prefix ? threshold : prefix;
    }
    const uint32_t top_key = order_key(row_max);
    threshold = threshold < top_key ? threshold : top_key;  // the row maximum is always kept
    // -- Gumbel-max over the kept set ----------------------------------------------------------
    const uint32_t row_key = mix32(mix32(static_cast<uint32_t>(a.seeds[slot]) ^ 0x9E3779B9u) +
                                   static_cast<uint32_t>(generated) * 0x632BE5ABu + 0x85EBCA6Bu);
    // s + g <= s + kGumbelMax < row_max + kGumbelMin <= (the row maximum's noisy score): such a
    // token cannot win (rounding is monotone, so the strict order survives it).
    const float bound = row_max + kGumbelMin;
    best = -INFINITY;
    best_index = kNoIndex;
    for (int64_t i = threadIdx.x; i < src.size(); i += kThreads) {
      const float s = src.score(i);
      if (order_key(s) < threshold || s + kGumbelMax < bound) continue;
      const int64_t v = src.token(i);
      const float noisy = s + gumbel(row_key, v);
      if (better(noisy, static_cast<int>(v), best, best_index)) best = noisy, best_index = static_cast<int>(v);
    }
    block_argmax<kThreads>(best, best_index, red_v, red_i);
    token = best_index == kNoIndex ? 0 : best_index;
  }

  // -- state updates ---------------------------------------------------------------------------
  if (threadIdx.x == 0) {
    if (!valid) {
      a.out[row] = -1;
      return;
    }
    a.out[row] = token;
    a.seen[slot * vocab + token] = 1;
    const int64_t opened = a.opens[token];
    a.open_modality[slot] = opened >= 0 ? opened : (token == a.closes[state] ? 0 : state);
    a.generated[slot] = generated + 1;
  }
}

}  // namespace sampling
}  // namespace anygpt

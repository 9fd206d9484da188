// Fused rotate-half RoPE of q and k plus the paged KV-cache append, as a raw-pointer CUDA kernel
// template. Contract: anygpt_rope_kv_append_cuda in c_api.h.
//
// Work decomposition, and why:
//  - One token's work is Hq + 2 * Hkv "head rows": Hq q rows rotated in place, Hkv k rows rotated in
//    place and written to k_cache, Hkv v rows copied to v_cache. Every head row splits into half / VEC items of
//    the same shape: an item owns elements [j, j + VEC) and [j + half, j + half + VEC) of the row,
//    exactly the pairs that rotate-half mixes, so one thread reads and writes both halves and the
//    in-place q and k updates have no cross-thread hazard. VEC = 16 bytes / sizeof(T) when every pointer is
//    16-byte aligned and every stride and half are multiples of VEC (the fused-qkv views of a LLaMA
//    projection are), else 1 (same kernel, scalar accesses).
//  - Grid (token, row group): a CTA owns one token and a group of head rows. It first builds the
//    token's cos/sin table (half entries, accurate cosf / sinf of float32 position * inv_freq[j]) in
//    shared memory, so the transcendental work is done once per CTA rather than once per head, then
//    each thread handles one item. Cutting a token's rows over several CTAs gives a batch-1 decode
//    step about a dozen CTAs instead of one, and long prefills get one CTA per (token, row group).
//  - The rotation is computed with explicitly rounded float32 multiplies and adds (no FMA
//    contraction), so the result equals a float32 reference that computes x1*c - x2*s and
//    x2*c + x1*s, then rounds once to the dtype. V is copied bit for bit.
//  - a slot outside [0, num_slots) (slot < 0 marks padding) skips both cache writes of token i;
//    q and k are still rotated.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "anygpt/cuda_float.cuh"

namespace anygpt {
namespace rope {

constexpr int kThreads = 128;  // CTA size target; a CTA holds whole head rows

struct Params {
  void* q;                      // (i, h, d) at q + i * q_token_stride + h * head_dim + d
  void* k;
  const void* v;
  const int64_t* positions;     // [num_tokens]
  const int64_t* slot_mapping;  // [num_tokens]; outside [0, num_slots): no cache write
  void* k_cache;                // [slots, Hkv, head_dim]
  void* v_cache;
  const float* inv_freq;        // [head_dim / 2]
  int64_t q_token_stride;
  int64_t k_token_stride;
  int64_t v_token_stride;
  int64_t num_slots;  // cache rows: a slot past them is skipped, never written out of bounds
  int num_q_heads;
  int num_kv_heads;
  int head_dim;
  int rows_per_cta;  // head rows a CTA covers
};

// kVec elements of T at p, widened to float / rounded from float; kVec * sizeof(T) is 16 or kVec is 1.
template <typename T, int kVec>
__device__ __forceinline__ void load_floats(const T* p, float (&f)[kVec]) {
  if constexpr (kVec == 1) {
    f[0] = to_float(*p);
  } else {
    static_assert(kVec * sizeof(T) == 16, "vector accesses are 16 bytes");
    union {
      uint4 raw;
      T elems[kVec];
    } u;
    u.raw = *reinterpret_cast<const uint4*>(p);
#pragma unroll
    for (int i = 0; i < kVec; ++i) f[i] = to_float(u.elems[i]);
  }
}

template <typename T, int kVec>
__device__ __forceinline__ void store_floats(T* p, const float (&f)[kVec]) {
  if constexpr (kVec == 1) {
    *p = from_float<T>(f[0]);
  } else {
    union {
      uint4 raw;
      T elems[kVec];
    } u;
#pragma unroll
    for (int i = 0; i < kVec; ++i) u.elems[i] = from_float<T>(f[i]);
    *reinterpret_cast<uint4*>(p) = u.raw;
  }
}

// Bit-exact copy of kVec elements.
template <typename T, int kVec>
__device__ __forceinline__ void copy_elems(T* dst, const T* src) {
  if constexpr (kVec == 1) {
    *dst = *src;
  } else {
    *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
  }
}

// Grid (num_tokens, ceil((Hq + 2 Hkv) / rows_per_cta)), blockDim = rows_per_cta * (half / kVec);
// dynamic shared memory: head_dim floats (cos then sin).
template <typename T, int kVec>
__global__ void __launch_bounds__(kThreads) rope_kv_append_kernel(const Params p) {
  extern __shared__ float table[];
  const int half = p.head_dim / 2;
  float* cos_table = table;
  float* sin_table = table + half;
  const int64_t token = blockIdx.x;
  const float position = static_cast<float>(p.positions[token]);  // round to nearest, like torch .float()
  for (int j = threadIdx.x; j < half; j += blockDim.x) {
    const float f = __fmul_rn(position, p.inv_freq[j]);
    cos_table[j] = cosf(f);
    sin_table[j] = sinf(f);
  }
  __syncthreads();

  const int items = half / kVec;  // per head row
  const int row = blockIdx.y * p.rows_per_cta + static_cast<int>(threadIdx.x) / items;
  const int j = (static_cast<int>(threadIdx.x) % items) * kVec;
  const int total_rows = p.num_q_heads + 2 * p.num_kv_heads;
  if (row >= total_rows) return;
  const int64_t slot = p.slot_mapping[token];
  const bool store = slot >= 0 && slot < p.num_slots;

  if (row >= p.num_q_heads + p.num_kv_heads) {  // v row: copy to the cache
    if (!store) return;
    const int h = row - p.num_q_heads - p.num_kv_heads;
    const T* src = static_cast<const T*>(p.v) + token * p.v_token_stride + h * p.head_dim;
    T* dst = static_cast<T*>(p.v_cache) + (slot * p.num_kv_heads + h) * p.head_dim;
    copy_elems<T, kVec>(dst + j, src + j);
    copy_elems<T, kVec>(dst + j + half, src + j + half);
    return;
  }

  T* src;         // rotated in place
  T* dst = nullptr;  // and, for a k row with a slot, into the cache
  if (row < p.num_q_heads) {  // q row
    src = static_cast<T*>(p.q) + token * p.q_token_stride + row * p.head_dim;
  } else {  // k row
    const int h = row - p.num_q_heads;
    src = static_cast<T*>(p.k) + token * p.k_token_stride + h * p.head_dim;
    if (store) dst = static_cast<T*>(p.k_cache) + (slot * p.num_kv_heads + h) * p.head_dim;
  }
  float x1[kVec];
  float x2[kVec];
  load_floats<T, kVec>(src + j, x1);
  load_floats<T, kVec>(src + j + half, x2);
  float y1[kVec];
  float y2[kVec];
#pragma unroll
  for (int i = 0; i < kVec; ++i) {
    const float c = cos_table[j + i];
    const float s = sin_table[j + i];
    y1[i] = __fsub_rn(__fmul_rn(x1[i], c), __fmul_rn(x2[i], s));
    y2[i] = __fadd_rn(__fmul_rn(x2[i], c), __fmul_rn(x1[i], s));
  }
  store_floats<T, kVec>(src + j, y1);
  store_floats<T, kVec>(src + j + half, y2);
  if (dst != nullptr) {
    store_floats<T, kVec>(dst + j, y1);
    store_floats<T, kVec>(dst + j + half, y2);
  }
}

}  // namespace rope
}  // namespace anygpt

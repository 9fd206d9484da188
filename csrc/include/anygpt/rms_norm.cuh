// RMSNorm (optionally fused with the residual add) as a raw-pointer CUDA kernel template.
// One CUDA block per row, in 16-byte vectors where the row's pointers allow; the row is read
// twice (sum of squares, then scale), which for hidden <= 8192 hits L1/L2 on the second pass.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "anygpt/cuda_float.cuh"

namespace anygpt {

template <int kThreads>
__device__ __forceinline__ float block_sum(float value, float* shared) {
  static_assert(kThreads % 32 == 0 && kThreads <= 1024, "kThreads must be a multiple of 32, at most 1024");
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) value += __shfl_xor_sync(0xffffffffu, value, offset);
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (lane == 0) shared[warp] = value;
  __syncthreads();
  constexpr int kWarps = kThreads / 32;
  if (warp == 0) {  // only warp 0 reads the partials: another warp's read could race its write of shared[0]
    value = lane < kWarps ? shared[lane] : 0.0f;
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) value += __shfl_xor_sync(0xffffffffu, value, offset);
    if (lane == 0) shared[0] = value;
  }
  __syncthreads();
  return shared[0];
}

// 16 bytes of T, moved by one 16-byte load or store.
template <typename T>
struct alignas(16) Pack16 {
  static constexpr int kSize = 16 / static_cast<int>(sizeof(T));
  T v[kSize];
};

__device__ __forceinline__ bool aligned16(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

// Contract: see anygpt_rms_norm_cpu in c_api.h (same rounding points as HF LlamaRMSNorm).
// A row whose x, out, residual and weight all start on 16 bytes moves its first hidden / kVec * kVec
// elements in 16-byte vectors and the rest (under kVec) one by one; any other row goes element by
// element. Both passes give thread t the same vectors and elements, so the second pass re-reads
// only residual elements this thread wrote itself: no barrier needed.
template <typename T, int kThreads>
__global__ void __launch_bounds__(kThreads)
    rms_norm_kernel(T* __restrict__ out, T* __restrict__ residual, const T* __restrict__ x,
                    const T* __restrict__ weight, int64_t hidden, int64_t x_row_stride, float eps) {
  using Pack = Pack16<T>;
  constexpr int kVec = Pack::kSize;
  __shared__ float shared[32];
  const int64_t row = blockIdx.x;
  const T* x_row = x + row * x_row_stride;
  T* out_row = out + row * hidden;
  T* res_row = residual ? residual + row * hidden : nullptr;
  const bool vectors_ok = aligned16(x_row) && aligned16(out_row) && aligned16(weight) &&
                          (res_row == nullptr || aligned16(res_row));
  const int64_t vectors = vectors_ok ? hidden / kVec : 0;

  float sum_squares = 0.0f;
  for (int64_t v = threadIdx.x; v < vectors; v += kThreads) {
    Pack h = reinterpret_cast<const Pack*>(x_row)[v];
    if (res_row) {
      Pack* res_vector = reinterpret_cast<Pack*>(res_row) + v;
      const Pack r = *res_vector;
#pragma unroll
      for (int j = 0; j < kVec; ++j) h.v[j] = from_float<T>(to_float(h.v[j]) + to_float(r.v[j]));
      *res_vector = h;
    }
#pragma unroll
    for (int j = 0; j < kVec; ++j) sum_squares = fmaf(to_float(h.v[j]), to_float(h.v[j]), sum_squares);
  }
  for (int64_t i = vectors * kVec + threadIdx.x; i < hidden; i += kThreads) {
    float h = to_float(x_row[i]);
    if (res_row) {
      const T rounded = from_float<T>(h + to_float(res_row[i]));
      res_row[i] = rounded;
      h = to_float(rounded);
    }
    sum_squares = fmaf(h, h, sum_squares);
  }
  // 1/sqrtf (both correctly rounded), not rsqrtf (2 ulp): the same numbers as the CPU twin.
  const float inv_rms = 1.0f / sqrtf(block_sum<kThreads>(sum_squares, shared) / static_cast<float>(hidden) + eps);
  const T* h_row = res_row ? res_row : x_row;
  for (int64_t v = threadIdx.x; v < vectors; v += kThreads) {
    const Pack h = reinterpret_cast<const Pack*>(h_row)[v];
    const Pack w = reinterpret_cast<const Pack*>(weight)[v];
    Pack o;
#pragma unroll
    for (int j = 0; j < kVec; ++j)
      o.v[j] = from_float<T>(to_float(w.v[j]) * to_float(from_float<T>(to_float(h.v[j]) * inv_rms)));
    reinterpret_cast<Pack*>(out_row)[v] = o;
  }
  for (int64_t i = vectors * kVec + threadIdx.x; i < hidden; i += kThreads) {
    const float normed = to_float(from_float<T>(to_float(h_row[i]) * inv_rms));
    out_row[i] = from_float<T>(to_float(weight[i]) * normed);
  }
}

}  // namespace anygpt

// RMSNorm (optionally fused with the residual add) as a raw-pointer CUDA kernel template.
// One CUDA block per row; the row is read twice (sum of squares, then scale), which for
// hidden <= 8192 hits L1/L2 on the second pass.
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
  value = lane < kWarps ? shared[lane] : 0.0f;
  if (warp == 0) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) value += __shfl_xor_sync(0xffffffffu, value, offset);
    if (lane == 0) shared[0] = value;
  }
  __syncthreads();
  return shared[0];
}

// Contract: see anygpt_rms_norm_cpu in c_api.h (same rounding points as HF LlamaRMSNorm).
template <typename T, int kThreads>
__global__ void __launch_bounds__(kThreads)
    rms_norm_kernel(T* __restrict__ out, T* __restrict__ residual, const T* __restrict__ x,
                    const T* __restrict__ weight, int64_t hidden, int64_t x_row_stride, float eps) {
  __shared__ float shared[32];
  const int64_t row = blockIdx.x;
  const T* x_row = x + row * x_row_stride;
  T* out_row = out + row * hidden;
  T* res_row = residual ? residual + row * hidden : nullptr;

  float sum_squares = 0.0f;
  for (int64_t i = threadIdx.x; i < hidden; i += kThreads) {
    float h = to_float(x_row[i]);
    if (res_row) {
      const T rounded = from_float<T>(h + to_float(res_row[i]));
      res_row[i] = rounded;
      h = to_float(rounded);
    }
    sum_squares += h * h;
  }
  // 1/sqrtf (both correctly rounded), not rsqrtf (2 ulp): the same numbers as the CPU twin.
  const float inv_rms = 1.0f / sqrtf(block_sum<kThreads>(sum_squares, shared) / static_cast<float>(hidden) + eps);
  // Each thread re-reads only the residual elements it wrote itself: no barrier needed.
  const T* h_row = res_row ? res_row : x_row;
  for (int64_t i = threadIdx.x; i < hidden; i += kThreads) {
    const float normed = to_float(from_float<T>(to_float(h_row[i]) * inv_rms));
    out_row[i] = from_float<T>(to_float(weight[i]) * normed);
  }
}

}  // namespace anygpt

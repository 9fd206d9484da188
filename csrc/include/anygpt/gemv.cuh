// Decode GEMV as a raw-pointer CUDA kernel template: y [m, n] = x [m, k] @ W [n, k]^T for m <= 16
// rows, W 16-bit (or float32) or weight-only quantized (int8 / e4m3 per output channel, int4 in
// groups of 128 with zero points; formats in anygpt_engine/quantization.py), dequantized in
// registers. Fused: the RMSNorm prologue and the residual-add or SiLU(gate) * up epilogue
// (contract: anygpt_gemv_cuda in c_api.h; the same numbers as ops.linear's reference up to the
// order of the float32 sums).
//
// row_warps warps per output row (two rows, n and n_out + n, for SiLU * up): their lanes stream
// the row in 16-byte vectors, interleaved along k, so each weight byte is read once, by one
// 16-byte load. More than one warp per row is split-K inside the CTA, for launches with few
// rows (a tensor-parallel shard): the warps' sums meet in shared memory and are added in warp
// order, so the result does not depend on timing. The CTA stages x (normalized when asked) in
// shared memory as float32, kSharedFloats at a time, for all its warps.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <cstdint>

#include "anygpt/cuda_float.cuh"

namespace anygpt {
namespace gemv {

constexpr int kSharedFloats = 8192;  // 32 KB of x per CTA: kMaxM rows x (8192 / kMaxM) columns
constexpr int kGroup = 128;          // int4 group along k
constexpr int kMaxWarps = 16;        // 512 threads
enum Format { kDtype = 0, kInt8 = 1, kFp8 = 2, kInt4 = 3 };
enum Epilogue { kNone = 0, kResidual = 1, kSiluMul = 2 };

struct Params {
  void* out;                // [m, n_out], rows out_stride apart; the residual itself with kResidual
  const void* x;            // [m, k], rows x_stride apart
  const void* weight;       // [rows, k] of T / int8 / e4m3, or [rows, k / 2] packed int4
  const void* scales;       // float32 [rows] (int8, e4m3) or float16 [rows, k / 128] (int4)
  const uint8_t* zeros;     // uint8 [rows, k / 128] (int4)
  const void* norm_weight;  // [k] of T, or null: no RMSNorm prologue
  int64_t m, n_out, k, x_stride, out_stride;
  float eps;
  int epilogue;
  int row_warps;  // warps per output row: a power of two dividing the CTA's warps
};

// Values per 16-byte weight vector.
template <typename T, int kFormat>
constexpr int values_per_vector() {
  return kFormat == kDtype ? 16 / static_cast<int>(sizeof(T)) : kFormat == kInt4 ? 32 : 16;
}

__device__ __forceinline__ void decode(const uint4& raw, float* out, float*) {
  const float* v = reinterpret_cast<const float*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) out[i] = v[i];
}

__device__ __forceinline__ void decode(const uint4& raw, float* out, __half*) {
  const __half2* v = reinterpret_cast<const __half2*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __half22float2(v[i]);
    out[2 * i] = f.x;
    out[2 * i + 1] = f.y;
  }
}

__device__ __forceinline__ void decode(const uint4& raw, float* out, __nv_bfloat16*) {
  const __nv_bfloat162* v = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __bfloat1622float2(v[i]);
    out[2 * i] = f.x;
    out[2 * i + 1] = f.y;
  }
}

// The vector's values as float32: exact for every format (int4 as its raw 0..15 codes).
template <typename T, int kFormat>
__device__ __forceinline__ void decode_vector(const uint4& raw, float* out) {
  if constexpr (kFormat == kDtype) {
    decode(raw, out, static_cast<T*>(nullptr));
  } else if constexpr (kFormat == kInt8) {
    const int8_t* v = reinterpret_cast<const int8_t*>(&raw);
#pragma unroll
    for (int i = 0; i < 16; ++i) out[i] = static_cast<float>(v[i]);
  } else if constexpr (kFormat == kFp8) {
    const __nv_fp8_e4m3* v = reinterpret_cast<const __nv_fp8_e4m3*>(&raw);
#pragma unroll
    for (int i = 0; i < 16; ++i) out[i] = static_cast<float>(v[i]);
  } else {
    const uint8_t* v = reinterpret_cast<const uint8_t*>(&raw);
#pragma unroll
    for (int i = 0; i < 16; ++i) {  // element 2i in the low nibble, 2i + 1 in the high one
      out[2 * i] = static_cast<float>(v[i] & 0xF);
      out[2 * i + 1] = static_cast<float>(v[i] >> 4);
    }
  }
}

__device__ __forceinline__ float warp_sum(float value) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) value += __shfl_xor_sync(0xffffffffu, value, offset);
  return value;
}

// acc[mm] += x[mm, c0 + e] . dequant(W[row, c0 + e]) over this lane's vectors of the staged chunk
// (lane `lane` of the row's `lanes`: vectors lane, lane + lanes, ...).
template <typename T, int kFormat, int kMaxM, int kChunk>
__device__ __forceinline__ void accumulate_row(const Params& p, int64_t row, int64_t c0, int len, const float* xs,
                                               int lane, int lanes, float* acc) {
  constexpr int kValues = values_per_vector<T, kFormat>();
  constexpr int kElementBytes = kFormat == kDtype ? static_cast<int>(sizeof(T)) : 1;
  const char* row_bytes = static_cast<const char*>(p.weight) +
                          (kFormat == kInt4 ? row * (p.k / 2) : row * p.k * kElementBytes);
#pragma unroll 4
  for (int e = lane * kValues; e < len; e += lanes * kValues) {
    const int64_t col = c0 + e;
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(
        row_bytes + (kFormat == kInt4 ? col / 2 : col * kElementBytes)));
    float w[kValues];
    decode_vector<T, kFormat>(raw, w);
    if constexpr (kFormat == kInt4) {  // (q - zero) * scale: exact in float32
      const int64_t group = row * (p.k / kGroup) + col / kGroup;
      const float zero = static_cast<float>(p.zeros[group]);
      const float scale = __half2float(static_cast<const __half*>(p.scales)[group]);
#pragma unroll
      for (int j = 0; j < kValues; ++j) w[j] = (w[j] - zero) * scale;
    }
#pragma unroll
    for (int mm = 0; mm < kMaxM; ++mm) {
      if (mm < p.m) {
        const float4* xv = reinterpret_cast<const float4*>(xs + mm * kChunk + e);
        float sum = acc[mm];
#pragma unroll
        for (int j = 0; j < kValues / 4; ++j) {
          const float4 v = xv[j];
          sum = fmaf(w[4 * j], v.x, sum);
          sum = fmaf(w[4 * j + 1], v.y, sum);
          sum = fmaf(w[4 * j + 2], v.z, sum);
          sum = fmaf(w[4 * j + 3], v.w, sum);
        }
        acc[mm] = sum;
      }
    }
  }
}

// The bound keeps every instantiation launchable at the largest block the launcher accepts.
template <typename T, int kFormat, int kMaxM>
__global__ void __launch_bounds__(kMaxWarps * 32) gemv_kernel(Params p) {
  constexpr int kChunk = kSharedFloats / kMaxM;
  __shared__ __align__(16) float xs[kMaxM * kChunk];
  __shared__ float inv_rms[kMaxM];
  __shared__ float sums[kMaxWarps][2][kMaxM];  // each warp's sums, added in warp order per row
  const int warps = static_cast<int>(blockDim.x) / 32;
  const int warp = static_cast<int>(threadIdx.x) / 32;
  const int lane = static_cast<int>(threadIdx.x) % 32;
  const int part = warp % p.row_warps;  // this warp's share of its row's k
  const int64_t n = static_cast<int64_t>(blockIdx.x) * (warps / p.row_warps) + warp / p.row_warps;
  const bool active = n < p.n_out;
  const T* x = static_cast<const T*>(p.x);
  const T* norm = static_cast<const T*>(p.norm_weight);

  if (norm != nullptr) {  // 1 / sqrt(mean(x^2) + eps) per row, correctly rounded as ops.rms_norm
    for (int mm = warp; mm < p.m; mm += warps) {
      float squares = 0.0f;
      for (int64_t i = lane; i < p.k; i += 32) {
        const float v = to_float(x[mm * p.x_stride + i]);
        squares = fmaf(v, v, squares);
      }
      squares = warp_sum(squares);
      if (lane == 0) inv_rms[mm] = 1.0f / sqrtf(squares / static_cast<float>(p.k) + p.eps);
    }
    __syncthreads();
  }

  const int rows = p.epilogue == kSiluMul ? 2 : 1;
  float acc[2][kMaxM];
#pragma unroll
  for (int mm = 0; mm < kMaxM; ++mm) acc[0][mm] = acc[1][mm] = 0.0f;
  for (int64_t c0 = 0; c0 < p.k; c0 += kChunk) {
    const int len = static_cast<int>(p.k - c0 < kChunk ? p.k - c0 : kChunk);
    __syncthreads();  // every warp is done with the previous chunk
    for (int i = threadIdx.x; i < p.m * len; i += blockDim.x) {
      const int mm = i / len;
      const int c = i % len;
      float v = to_float(x[mm * p.x_stride + c0 + c]);
      if (norm != nullptr) {  // HF's rounding points: round(w * round(x * inv_rms))
        v = to_float(from_float<T>(v * inv_rms[mm]));
        v = to_float(from_float<T>(to_float(norm[c0 + c]) * v));
      }
      xs[mm * kChunk + c] = v;
    }
    __syncthreads();
    if (active) {
      const int row_lane = part * 32 + lane;
      const int lanes = p.row_warps * 32;
      accumulate_row<T, kFormat, kMaxM, kChunk>(p, n, c0, len, xs, row_lane, lanes, acc[0]);
      if (rows == 2) accumulate_row<T, kFormat, kMaxM, kChunk>(p, p.n_out + n, c0, len, xs, row_lane, lanes, acc[1]);
    }
  }
#pragma unroll
  for (int mm = 0; mm < kMaxM; ++mm) {
    if (mm >= p.m) break;
    const float s0 = warp_sum(acc[0][mm]);
    const float s1 = rows == 2 ? warp_sum(acc[1][mm]) : 0.0f;
    if (lane == 0) {
      sums[warp][0][mm] = s0;
      sums[warp][1][mm] = s1;
    }
  }
  __syncthreads();
  if (!active || part != 0) return;

  float channel_scale[2] = {1.0f, 1.0f};
  if constexpr (kFormat == kInt8 || kFormat == kFp8) {
    const float* scales = static_cast<const float*>(p.scales);
    channel_scale[0] = scales[n];
    if (rows == 2) channel_scale[1] = scales[p.n_out + n];
  }
  T* out = static_cast<T*>(p.out);
  for (int mm = lane; mm < p.m; mm += 32) {
    float y0 = sums[warp][0][mm];
    float y1 = sums[warp][1][mm];
    for (int w = 1; w < p.row_warps; ++w) {
      y0 += sums[warp + w][0][mm];
      y1 += sums[warp + w][1][mm];
    }
    y0 *= channel_scale[0];
    y1 *= channel_scale[1];
    T* target = out + mm * p.out_stride + n;
    float y = to_float(from_float<T>(y0));
    if (p.epilogue == kSiluMul) {  // torch's 16-bit ops: silu rounded, then the product rounded
      const float silu = to_float(from_float<T>(y / (1.0f + expf(-y))));
      y = silu * to_float(from_float<T>(y1));
    } else if (p.epilogue == kResidual) {
      y += to_float(*target);
    }
    *target = from_float<T>(y);
  }
}

}  // namespace gemv
}  // namespace anygpt

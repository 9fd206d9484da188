// Host launcher of the decode GEMV: checks every argument, picks the instantiation for the dtype,
// weight format and row count (1, 2, 4, 8 or 16 accumulators) and the warps per output row, and
// launches one kernel.
#include <cmath>
#include <cstdint>

#include "anygpt/c_api.h"
#include "anygpt/cuda_check.cuh"
#include "anygpt/gemv.cuh"

namespace anygpt {
namespace {

constexpr const char* kOp = "gemv";

bool aligned16(const void* ptr) { return reinterpret_cast<std::uintptr_t>(ptr) % 16 == 0; }

int element_bytes(int dtype) { return dtype == ANYGPT_FLOAT32 ? 4 : 2; }

// Elements of one 16-byte weight vector: k must be a multiple of it.
int vector_values(int dtype, int format) {
  return format == gemv::kDtype ? 16 / element_bytes(dtype) : format == gemv::kInt4 ? 32 : 16;
}

anygpt_status check_args(const void* out, const void* x, const void* weight, const void* scales, const uint8_t* zeros,
                         int64_t m, int64_t n_out, int64_t k, int64_t x_row_stride, int64_t out_row_stride, float eps,
                         int dtype, int format, int epilogue, int threads, int row_warps) {
  using ll = long long;
  if (dtype != ANYGPT_FLOAT32 && dtype != ANYGPT_FLOAT16 && dtype != ANYGPT_BFLOAT16)
    return fail(ANYGPT_ERROR_UNSUPPORTED_DTYPE, "%s: dtype code %d, expected float32, float16 or bfloat16", kOp, dtype);
  if (format < ANYGPT_WEIGHT_DTYPE || format > ANYGPT_WEIGHT_INT4)
    return fail(ANYGPT_ERROR_INVALID_ARGUMENT, "%s: weight_format=%d, expected 0 (dtype), 1 (int8), 2 (fp8 e4m3) or "
                "3 (int4)", kOp, format);
  if (epilogue < ANYGPT_EPILOGUE_NONE || epilogue > ANYGPT_EPILOGUE_SILU_MUL)
    return fail(ANYGPT_ERROR_INVALID_ARGUMENT, "%s: epilogue=%d, expected 0 (none), 1 (residual) or 2 (silu_mul)", kOp,
                epilogue);
  if (m < 0 || m > ANYGPT_GEMV_MAX_ROWS)
    return fail(ANYGPT_ERROR_INVALID_ARGUMENT, "%s: m=%lld, expected 0..%d rows", kOp, (ll)m, ANYGPT_GEMV_MAX_ROWS);
  if (n_out < 0 || n_out >= (int64_t{1} << 31))  // a block per row at most: gridDim.x <= 2^31 - 1
    return fail(ANYGPT_ERROR_INVALID_ARGUMENT, "%s: n_out=%lld, expected 0..2^31 - 1", kOp, (ll)n_out);
  const int values = vector_values(dtype, format);
  if (k <= 0 || k % values != 0)
    return fail(ANYGPT_ERROR_INVALID_ARGUMENT, "%s: k=%lld, expected a positive multiple of %d (16-byte weight vectors)",
                kOp, (ll)k, values);
  if (format == ANYGPT_WEIGHT_INT4 && k % gemv::kGroup != 0)
    return fail(ANYGPT_ERROR_INVALID_ARGUMENT, "%s: k=%lld, expected a multiple of the int4 group size %d", kOp, (ll)k,
                gemv::kGroup);
  if (x_row_stride < k)
    return fail(ANYGPT_ERROR_INVALID_ARGUMENT, "%s: x_row_stride=%lld, expected >= k=%lld", kOp, (ll)x_row_stride,
                (ll)k);
  if (out_row_stride < n_out)
    return fail(ANYGPT_ERROR_INVALID_ARGUMENT, "%s: out_row_stride=%lld, expected >= n_out=%lld", kOp,
                (ll)out_row_stride, (ll)n_out);
  if (!(eps >= 0.0f) || !std::isfinite(eps))
    return fail(ANYGPT_ERROR_INVALID_ARGUMENT, "%s: eps=%g, expected a finite value >= 0", kOp, eps);
  if (threads != 64 && threads != 128 && threads != 256 && threads != 512)
    return fail(ANYGPT_ERROR_INVALID_ARGUMENT, "%s: threads=%d, expected 64, 128, 256 or 512", kOp, threads);
  if (row_warps < 1 || row_warps > threads / 32 || (row_warps & (row_warps - 1)) != 0)
    return fail(ANYGPT_ERROR_INVALID_ARGUMENT, "%s: row_warps=%d, expected a power of two from 1 to threads / 32 = %d",
                kOp, row_warps, threads / 32);
  if (m == 0 || n_out == 0) return ANYGPT_OK;  // nothing is dereferenced; empty tensors may have null pointers
  if (out == nullptr || x == nullptr || weight == nullptr)
    return fail(ANYGPT_ERROR_INVALID_ARGUMENT, "%s: out, x and weight must be non-null pointers", kOp);
  if (format != ANYGPT_WEIGHT_DTYPE && scales == nullptr)
    return fail(ANYGPT_ERROR_INVALID_ARGUMENT, "%s: scales must be a non-null pointer for a quantized weight", kOp);
  if (format == ANYGPT_WEIGHT_INT4 && zeros == nullptr)
    return fail(ANYGPT_ERROR_INVALID_ARGUMENT, "%s: zeros must be a non-null pointer for an int4 weight", kOp);
  if (!aligned16(weight))
    return fail(ANYGPT_ERROR_INVALID_ARGUMENT, "%s: weight=%p is not 16-byte aligned (rows are read as 16-byte "
                "vectors)", kOp, weight);
  return ANYGPT_OK;
}

// The instantiation's accumulator rows for m rows (1, 2, 4, 8 or 16).
int max_rows(int64_t m) {
  int rows = 1;
  while (rows < m) rows *= 2;
  return rows;
}

// At most row_warps warps per row, and no more than the staged x chunk has 32-lane rows of 16-byte
// vectors for (more warps would idle).
int effective_row_warps(int row_warps, int64_t m, int64_t k, int dtype, int format) {
  const int64_t chunk = gemv::kSharedFloats / max_rows(m);
  const int64_t vectors = (k < chunk ? k : chunk) / vector_values(dtype, format);
  while (row_warps > 1 && int64_t{row_warps} * 32 > vectors) row_warps /= 2;
  return row_warps;
}

template <typename T, int kFormat>
void launch_rows(const gemv::Params& params, unsigned blocks, int threads, cudaStream_t stream) {
  if (params.m <= 1) gemv::gemv_kernel<T, kFormat, 1><<<blocks, threads, 0, stream>>>(params);
  else if (params.m <= 2) gemv::gemv_kernel<T, kFormat, 2><<<blocks, threads, 0, stream>>>(params);
  else if (params.m <= 4) gemv::gemv_kernel<T, kFormat, 4><<<blocks, threads, 0, stream>>>(params);
  else if (params.m <= 8) gemv::gemv_kernel<T, kFormat, 8><<<blocks, threads, 0, stream>>>(params);
  else gemv::gemv_kernel<T, kFormat, 16><<<blocks, threads, 0, stream>>>(params);
}

template <typename T>
void launch_format(int format, const gemv::Params& params, unsigned blocks, int threads, cudaStream_t stream) {
  switch (format) {
    case gemv::kDtype: launch_rows<T, gemv::kDtype>(params, blocks, threads, stream); break;
    case gemv::kInt8: launch_rows<T, gemv::kInt8>(params, blocks, threads, stream); break;
    case gemv::kFp8: launch_rows<T, gemv::kFp8>(params, blocks, threads, stream); break;
    default: launch_rows<T, gemv::kInt4>(params, blocks, threads, stream); break;
  }
}

}  // namespace
}  // namespace anygpt

extern "C" anygpt_status anygpt_gemv_cuda(void* out, const void* x, const void* weight, const void* scales,
                                          const uint8_t* zeros, const void* norm_weight, int64_t m, int64_t n_out,
                                          int64_t k, int64_t x_row_stride, int64_t out_row_stride, float eps,
                                          anygpt_dtype dtype, anygpt_weight_format weight_format,
                                          anygpt_gemv_epilogue epilogue, int threads, int row_warps,
                                          void* stream) {
  using namespace anygpt;
  anygpt_status status = check_args(out, x, weight, scales, zeros, m, n_out, k, x_row_stride, out_row_stride, eps,
                                    dtype, weight_format, epilogue, threads, row_warps);
  if (status != ANYGPT_OK) return status;
  status = require_cuda_device(kOp);
  if (status != ANYGPT_OK) return status;
  if (m == 0 || n_out == 0) return ok();
  row_warps = effective_row_warps(row_warps, m, k, dtype, weight_format);
  const gemv::Params params{out, x, weight, scales, zeros, norm_weight, m, n_out, k, x_row_stride, out_row_stride,
                            eps, static_cast<int>(epilogue), row_warps};
  const int rows_per_block = threads / 32 / row_warps;
  const unsigned blocks = static_cast<unsigned>((n_out + rows_per_block - 1) / rows_per_block);
  const auto cuda_stream = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case ANYGPT_FLOAT32: launch_format<float>(weight_format, params, blocks, threads, cuda_stream); break;
    case ANYGPT_FLOAT16: launch_format<__half>(weight_format, params, blocks, threads, cuda_stream); break;
    case ANYGPT_BFLOAT16: launch_format<__nv_bfloat16>(weight_format, params, blocks, threads, cuda_stream); break;
  }
  return check_launch(kOp);
}

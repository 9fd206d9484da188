// Host launcher of the CUDA RMSNorm kernel: picks the instantiation for dtype and block size.
#include "anygpt/c_api.h"
#include "anygpt/cuda_check.cuh"
#include "anygpt/rms_norm.cuh"

namespace anygpt {
namespace {

template <typename T, int kThreads>
void launch(void* out, void* residual, const void* x, const void* weight, int64_t rows, int64_t hidden,
            int64_t x_row_stride, float eps, cudaStream_t stream) {
  rms_norm_kernel<T, kThreads><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(
      static_cast<T*>(out), static_cast<T*>(residual), static_cast<const T*>(x), static_cast<const T*>(weight),
      hidden, x_row_stride, eps);
}

template <typename T>
anygpt_status launch_threads(int threads, void* out, void* residual, const void* x, const void* weight,
                             int64_t rows, int64_t hidden, int64_t x_row_stride, float eps, cudaStream_t stream) {
  switch (threads) {
    case 128: launch<T, 128>(out, residual, x, weight, rows, hidden, x_row_stride, eps, stream); break;
    case 256: launch<T, 256>(out, residual, x, weight, rows, hidden, x_row_stride, eps, stream); break;
    case 512: launch<T, 512>(out, residual, x, weight, rows, hidden, x_row_stride, eps, stream); break;
    case 1024: launch<T, 1024>(out, residual, x, weight, rows, hidden, x_row_stride, eps, stream); break;
    default:
      return fail(ANYGPT_ERROR_INVALID_ARGUMENT, "rms_norm: threads_per_row=%d, expected 128, 256, 512 or 1024",
                  threads);
  }
  return check_launch("rms_norm");
}

}  // namespace
}  // namespace anygpt

extern "C" anygpt_status anygpt_rms_norm_cuda(void* out, void* residual, const void* x, const void* weight,
                                              int64_t rows, int64_t hidden, int64_t x_row_stride, float eps,
                                              anygpt_dtype dtype, int threads_per_row, void* stream) {
  using namespace anygpt;
  anygpt_status status = check_rms_norm_args(out, x, weight, rows, hidden, x_row_stride, eps, dtype);
  if (status != ANYGPT_OK) return status;
  if (rows > 0x7fffffff) return fail(ANYGPT_ERROR_INVALID_ARGUMENT, "rms_norm: rows=%lld exceeds the grid limit", (long long)rows);
  status = require_cuda_device("rms_norm");
  if (status != ANYGPT_OK) return status;
  if (rows == 0) return ok();
  const auto cuda_stream = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case ANYGPT_FLOAT32:
      return launch_threads<float>(threads_per_row, out, residual, x, weight, rows, hidden, x_row_stride, eps, cuda_stream);
    case ANYGPT_FLOAT16:
      return launch_threads<__half>(threads_per_row, out, residual, x, weight, rows, hidden, x_row_stride, eps, cuda_stream);
    case ANYGPT_BFLOAT16:
      return launch_threads<__nv_bfloat16>(threads_per_row, out, residual, x, weight, rows, hidden, x_row_stride, eps,
                                           cuda_stream);
  }
  return fail(ANYGPT_ERROR_UNSUPPORTED_DTYPE, "rms_norm: unsupported dtype %d", dtype);
}

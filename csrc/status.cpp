#include "anygpt/status.hpp"

#include <cmath>
#include <cstdio>

namespace anygpt {
namespace {
thread_local std::string last_error;
}

anygpt_status fail(anygpt_status status, const char* format, ...) {
  char buffer[1024];
  va_list args;
  va_start(args, format);
  std::vsnprintf(buffer, sizeof(buffer), format, args);
  va_end(args);
  last_error = buffer;
  return status;
}

anygpt_status ok() {
  last_error.clear();
  return ANYGPT_OK;
}

anygpt_status check_rms_norm_args(const void* out, const void* x, const void* weight, int64_t rows,
                                  int64_t hidden, int64_t x_row_stride, float eps, int dtype) {
  if (rows < 0) return fail(ANYGPT_ERROR_INVALID_ARGUMENT, "rms_norm: rows=%lld, expected >= 0", (long long)rows);
  // Empty tensors may have null data pointers; with no rows nothing is dereferenced.
  if (rows > 0 && (out == nullptr || x == nullptr || weight == nullptr))
    return fail(ANYGPT_ERROR_INVALID_ARGUMENT, "rms_norm: out, x and weight must be non-null pointers");
  if (hidden <= 0)
    return fail(ANYGPT_ERROR_INVALID_ARGUMENT, "rms_norm: hidden=%lld, expected > 0", (long long)hidden);
  if (x_row_stride < hidden)
    return fail(ANYGPT_ERROR_INVALID_ARGUMENT, "rms_norm: x_row_stride=%lld, expected >= hidden=%lld",
                (long long)x_row_stride, (long long)hidden);
  if (!(eps >= 0.0f) || !std::isfinite(eps))
    return fail(ANYGPT_ERROR_INVALID_ARGUMENT, "rms_norm: eps=%g, expected a finite value >= 0", eps);
  if (dtype != ANYGPT_FLOAT32 && dtype != ANYGPT_FLOAT16 && dtype != ANYGPT_BFLOAT16)
    return fail(ANYGPT_ERROR_UNSUPPORTED_DTYPE, "rms_norm: dtype code %d, expected float32, float16 or bfloat16",
                dtype);
  return ANYGPT_OK;
}

}  // namespace anygpt

extern "C" const char* anygpt_last_error(void) { return anygpt::last_error.c_str(); }

extern "C" int anygpt_built_with_cuda(void) {
#ifdef ANYGPT_WITH_CUDA
  return 1;
#else
  return 0;
#endif
}

#ifndef ANYGPT_WITH_CUDA
extern "C" anygpt_status anygpt_cuda_device_count(int* count) {
  if (count) *count = 0;
  return anygpt::fail(ANYGPT_ERROR_NO_CUDA, "anygpt_engine was built without CUDA kernels (no nvcc at build time)");
}

extern "C" anygpt_status anygpt_rms_norm_cuda(void*, void*, const void*, const void*, int64_t, int64_t, int64_t,
                                              float, anygpt_dtype, int, void*) {
  return anygpt::fail(ANYGPT_ERROR_NO_CUDA, "rms_norm: anygpt_engine was built without CUDA kernels (no nvcc at build time)");
}

extern "C" anygpt_status anygpt_gemv_cuda(void*, const void*, const void*, const void*, const uint8_t*, const void*,
                                          int64_t, int64_t, int64_t, int64_t, int64_t, float, anygpt_dtype,
                                          anygpt_weight_format, anygpt_gemv_epilogue, int, int, void*) {
  return anygpt::fail(ANYGPT_ERROR_NO_CUDA, "gemv: anygpt_engine was built without CUDA kernels (no nvcc at build time)");
}

extern "C" anygpt_status anygpt_maskgit_step_cuda(int64_t*, uint8_t*, float*, int32_t*, const void*, anygpt_dtype,
                                                  const float*, const int64_t*, const int64_t*, const int64_t*,
                                                  const int64_t*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                                                  int64_t, float, int, int, int, void*) {
  return anygpt::fail(ANYGPT_ERROR_NO_CUDA,
                      "maskgit_step: anygpt_engine was built without CUDA kernels (no nvcc at build time)");
}

extern "C" anygpt_status anygpt_paged_decode_attention_cuda(void*, const void*, const void*, const void*,
                                                            const int64_t*, const int64_t*, float*, float*, int64_t,
                                                            int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                                                            int64_t, float, anygpt_dtype, int, void*) {
  return anygpt::fail(ANYGPT_ERROR_NO_CUDA,
                      "paged_decode_attention: anygpt_engine was built without CUDA kernels (no nvcc at build time)");
}

extern "C" anygpt_status anygpt_rope_kv_append_cuda(void*, void*, const void*, const int64_t*, const int64_t*,
                                                    void*, void*, const float*, int64_t, int64_t, int64_t, int64_t,
                                                    int64_t, int64_t, int64_t, int64_t, anygpt_dtype, void*) {
  return anygpt::fail(ANYGPT_ERROR_NO_CUDA,
                      "rope_kv_append: anygpt_engine was built without CUDA kernels (no nvcc at build time)");
}

extern "C" anygpt_status anygpt_sample_tokens_cuda(const float*, int64_t, const int64_t*, int64_t*, float*,
                                                   const float*, const int64_t*, const float*, const float*,
                                                   const int64_t*, const int64_t*, int64_t*, int64_t*,
                                                   const uint8_t*, uint8_t*, const uint8_t*, const int64_t*,
                                                   const int64_t*, int64_t, int64_t, int64_t, int64_t, int, int, int,
                                                   int, int, void*) {
  return anygpt::fail(ANYGPT_ERROR_NO_CUDA,
                      "sample_tokens: anygpt_engine was built without CUDA kernels (no nvcc at build time)");
}
#endif

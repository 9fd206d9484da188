// Plain C ABI of the anygpt_engine kernels: raw pointers, sizes and a stream, no torch.
// Any serving stack can link libanygpt_kernels and call these without Python.
#pragma once
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum {
  ANYGPT_OK = 0,
  ANYGPT_ERROR_INVALID_ARGUMENT = 1,  // a size, stride or pointer is wrong; see anygpt_last_error()
  ANYGPT_ERROR_UNSUPPORTED_DTYPE = 2,
  ANYGPT_ERROR_NO_CUDA = 3,           // built without CUDA, or no usable device/driver
  ANYGPT_ERROR_CUDA = 4,              // a CUDA runtime call failed
} anygpt_status;

typedef enum {
  ANYGPT_FLOAT32 = 0,
  ANYGPT_FLOAT16 = 1,
  ANYGPT_BFLOAT16 = 2,
} anygpt_dtype;

// Message of the last failed call on this thread ("" after a success).
const char* anygpt_last_error(void);

// 1 when the library was compiled with its CUDA kernels.
int anygpt_built_with_cuda(void);

// Number of visible CUDA devices; ANYGPT_ERROR_NO_CUDA with a message when none can be used.
anygpt_status anygpt_cuda_device_count(int* count);

// RMSNorm over rows of `hidden` elements, with HF LlamaRMSNorm rounding:
//   out = weight * round_dtype(h * rsqrt(mean(h^2) + eps)),  h = float(x)
// With a non-null `residual` (fused add, as between transformer sub-blocks):
//   residual <- round_dtype(x + residual);  h = float(residual)   (in place)
// x rows are `x_row_stride` elements apart; out and residual are contiguous [rows, hidden].
// All tensors share `dtype`; accumulation is float32.
anygpt_status anygpt_rms_norm_cpu(void* out, void* residual, const void* x, const void* weight,
                                  int64_t rows, int64_t hidden, int64_t x_row_stride, float eps,
                                  anygpt_dtype dtype);

// Same contract on a CUDA stream (`stream` is a cudaStream_t, 0 for the default stream).
// `threads_per_row` is the CUDA block size (a multiple of 32, at most 1024), from the tuning table.
anygpt_status anygpt_rms_norm_cuda(void* out, void* residual, const void* x, const void* weight,
                                   int64_t rows, int64_t hidden, int64_t x_row_stride, float eps,
                                   anygpt_dtype dtype, int threads_per_row, void* stream);

#ifdef __cplusplus
}
#endif

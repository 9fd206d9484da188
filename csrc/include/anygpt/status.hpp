// Internal helpers for reporting errors through the C ABI.
#pragma once
#include <cstdarg>
#include <string>

#include "anygpt/c_api.h"

namespace anygpt {

// Records `message` as this thread's last error and returns `status`.
anygpt_status fail(anygpt_status status, const char* format, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;

// Clears the last error and returns ANYGPT_OK.
anygpt_status ok();

// Argument checks shared by the CPU and CUDA entry points of RMSNorm.
anygpt_status check_rms_norm_args(const void* out, const void* x, const void* weight, int64_t rows,
                                  int64_t hidden, int64_t x_row_stride, float eps, int dtype);

}  // namespace anygpt

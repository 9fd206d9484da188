// C++ CPU twin of the CUDA RMSNorm kernel: same contract, same rounding points.
#include <cmath>

#include "anygpt/c_api.h"
#include "anygpt/host_float.hpp"
#include "anygpt/status.hpp"

namespace anygpt {
namespace {

template <typename T>
void rms_norm_rows(T* out, T* residual, const T* x, const T* weight, int64_t rows, int64_t hidden,
                   int64_t x_row_stride, float eps) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* x_row = x + r * x_row_stride;
    T* out_row = out + r * hidden;
    T* res_row = residual ? residual + r * hidden : nullptr;
    float sum_squares = 0.0f;
    for (int64_t i = 0; i < hidden; ++i) {
      float h = to_float(x_row[i]);
      if (res_row) {
        // Round the sum to the storage dtype first, exactly as an unfused add would.
        res_row[i] = from_float<T>(h + to_float(res_row[i]));
        h = to_float(res_row[i]);
      }
      sum_squares += h * h;
    }
    const float inv_rms = 1.0f / std::sqrt(sum_squares / static_cast<float>(hidden) + eps);
    const T* h_row = res_row ? res_row : x_row;
    for (int64_t i = 0; i < hidden; ++i) {
      const float normed = to_float(from_float<T>(to_float(h_row[i]) * inv_rms));
      out_row[i] = from_float<T>(to_float(weight[i]) * normed);
    }
  }
}

}  // namespace
}  // namespace anygpt

extern "C" anygpt_status anygpt_rms_norm_cpu(void* out, void* residual, const void* x, const void* weight,
                                             int64_t rows, int64_t hidden, int64_t x_row_stride, float eps,
                                             anygpt_dtype dtype) {
  using namespace anygpt;
  const anygpt_status status = check_rms_norm_args(out, x, weight, rows, hidden, x_row_stride, eps, dtype);
  if (status != ANYGPT_OK) return status;
  switch (dtype) {
    case ANYGPT_FLOAT32:
      rms_norm_rows(static_cast<float*>(out), static_cast<float*>(residual), static_cast<const float*>(x),
                    static_cast<const float*>(weight), rows, hidden, x_row_stride, eps);
      break;
    case ANYGPT_FLOAT16:
      rms_norm_rows(static_cast<Half*>(out), static_cast<Half*>(residual), static_cast<const Half*>(x),
                    static_cast<const Half*>(weight), rows, hidden, x_row_stride, eps);
      break;
    case ANYGPT_BFLOAT16:
      rms_norm_rows(static_cast<BFloat16*>(out), static_cast<BFloat16*>(residual), static_cast<const BFloat16*>(x),
                    static_cast<const BFloat16*>(weight), rows, hidden, x_row_stride, eps);
      break;
  }
  return ok();
}

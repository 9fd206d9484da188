// Turns CUDA runtime errors into anygpt_status with a message.
#pragma once
#include <cuda_runtime.h>

#include "anygpt/status.hpp"

namespace anygpt {

// Fails with ANYGPT_ERROR_NO_CUDA when no device/driver can be used, so a CUDA call on a
// CPU-only machine reports that plainly instead of a raw CUDA error code.
inline anygpt_status require_cuda_device(const char* op) {
  // Probed once per process: the answer cannot change, and the hot path stays a load.
  static const cudaError_t probe = [] {
    int count = 0;
    cudaError_t err = cudaGetDeviceCount(&count);
    if (err == cudaSuccess && count == 0) err = cudaErrorNoDevice;
    cudaGetLastError();  // clear the sticky error
    return err;
  }();
  if (probe != cudaSuccess)
    return fail(ANYGPT_ERROR_NO_CUDA, "%s: no usable CUDA device (%s)", op, cudaGetErrorString(probe));
  return ANYGPT_OK;
}

inline anygpt_status check_launch(const char* op) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return fail(ANYGPT_ERROR_CUDA, "%s: kernel launch failed: %s", op, cudaGetErrorString(err));
  return ok();
}

}  // namespace anygpt

#include "anygpt/c_api.h"
#include "anygpt/cuda_check.cuh"

extern "C" anygpt_status anygpt_cuda_device_count(int* count) {
  if (count == nullptr) return anygpt::fail(ANYGPT_ERROR_INVALID_ARGUMENT, "cuda_device_count: count is null");
  *count = 0;
  const anygpt_status status = anygpt::require_cuda_device("cuda_device_count");
  if (status != ANYGPT_OK) return status;
  cudaGetDeviceCount(count);
  return anygpt::ok();
}
